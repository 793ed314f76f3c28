"""Loading local Hugging Face checkpoint directories, lazily.

A directory holds config.json and one or many *.safetensors files (sharded
ones with model.safetensors.index.json). `load_model` reads the config and
every shard's header, checks that each tensor hetflow needs is present with
the expected shape, and returns a Model whose tensors are read only when a
strategy places them. Every problem is reported before anything is placed,
in one error that names the file or field and what was expected.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from hetflow.checkpoints import hf_names
from hetflow.models.model import Model, parameter_shapes


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be loaded, and why."""


# safetensors dtypes hetflow converts to the compute dtype. Integer, bool and
# float8 tensors are quantized or index data: casting them to float would load
# without error and generate garbage, so they are refused by name.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}; copy the file again.") from None
  except (OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f"cannot read {path}: {e}") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object"
                          " ({...}); it is not an HF config: copy the checkpoint's own file.")
  return value


def _shard_files(directory: str) -> list[str]:
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise CheckpointError(
          f"{index} lists shard(s) {missing} that are not in {directory}; copy the"
          " complete checkpoint (every file the index names).")
    return [os.path.join(directory, f) for f in files]
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(
        f"no *.safetensors files in {directory}; hetflow reads safetensors"
        " checkpoints (convert .bin files with transformers' save_pretrained).")
  return [os.path.join(directory, f) for f in files]


class SafetensorsSource:
  """Hands out hetflow-named tensors from memory-mapped safetensors shards."""

  def __init__(self, files: list[str], table: dict[str, tuple[tuple[str, ...], bool]]):
    self._table = table
    self._handles = {}
    self.location: dict[str, str] = {}  # HF name -> shard path
    for path in files:
      try:
        handle = safe_open(path, framework="numpy")
      except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); the shard may be"
            " truncated or corrupt: copy it again.") from None
      self._handles[path] = handle
      for key in handle.keys():
        self.location[key] = path
    self._check_sizes()

  def _check_sizes(self):
    """A truncated shard keeps its header; compare its size to what it promises."""
    for path in self._handles:
      with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
      end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                default=0)
      size = os.path.getsize(path)
      if size < 8 + header_len + end:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + header_len + end} bytes"
            f" but the file has {size}; copy the shard again.")

  def hf_shape(self, hf_name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.location[hf_name]].get_slice(hf_name).get_shape())

  def hf_dtype(self, hf_name: str) -> str:
    """The stored safetensors dtype, e.g. "BF16", "I8", "BOOL"."""
    return self._handles[self.location[hf_name]].get_slice(hf_name).get_dtype()

  def get(self, name: str, dtype) -> np.ndarray:
    hf, transpose = self._table[name]
    parts = []
    for key in hf:
      array = self._handles[self.location[key]].get_tensor(key)
      parts.append(array.T if transpose else array)
    array = parts[0] if len(parts) == 1 else np.stack(parts)
    return np.ascontiguousarray(array, dtype=dtype)


def load_hf(directory: str, dtype: Any = jnp.float32, weights: str | None = None) -> Model:
  """Loads a local HF checkpoint directory lazily (`hetflow.load_model` also reads GGUF).

  Args:
    directory: holds config.json, *.safetensors (and the index json when
      sharded), optionally tokenizer.json.
    dtype: compute dtype; stored bf16/fp16/fp32 tensors convert to it when
      they are placed.
    weights: weight format of the linear kernels ("float32", "bfloat16",
      "int8", "int8-g32", "int4", "int4-asym", ...; hetflow/models/formats.py).
      Each kernel is quantized once, tensor by tensor, as a strategy places
      it. None: float32.

  Returns:
    A Model whose tensors are read from the memory-mapped shards on demand.

  Raises:
    CheckpointError: naming the missing or bad file, field or tensor.
  """
  directory = os.fspath(directory)
  if os.path.isfile(directory):
    raise CheckpointError(
        f"checkpoint {directory!r} is a file; pass the directory that holds config.json and"
        f" the *.safetensors files (here perhaps {os.path.dirname(directory) or '.'!r}).")
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist.")
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(
        f"{config_path} is missing; a checkpoint directory needs the HF config.json"
        " next to its *.safetensors files.")
  hf_config = _read_json(config_path)
  try:
    config = hf_names.config_from_hf(hf_config,
                                     name=os.path.basename(os.path.normpath(directory)))
  except (KeyError, ValueError) as e:
    message = f"missing field {e}" if isinstance(e, KeyError) else str(e)
    raise CheckpointError(f"{config_path}: {message}") from None
  table = hf_names.hf_names(config)
  source = SafetensorsSource(_shard_files(directory), table)
  _check_tensors(config, source, table, dtype, hf_config.get("quantization_config"))
  return Model(config=config, source=source, dtype=dtype,
               tokenizer=_load_tokenizer(directory), description=directory,
               weights=weights or "float32")


def _check_tensors(config, source: SafetensorsSource, table, dtype, quantization=None):
  problems, not_float = [], 0
  for name, spec in parameter_shapes(config, jnp.dtype(dtype)).items():
    hf, transpose = table[name]
    for key in hf:
      if key not in source.location:
        problems.append(f"tensor {key} (for {name}) is missing")
        continue
      stored = source.hf_dtype(key)
      if stored not in FLOAT_DTYPES:
        not_float += 1
        problems.append(f"tensor {key} in {os.path.basename(source.location[key])} has dtype"
                        f" {stored}, not a float type")
        continue
      shape = source.hf_shape(key)
      want = spec.shape[1:] if len(hf) > 1 else spec.shape
      want = tuple(reversed(want)) if transpose else tuple(want)
      if shape != want:
        problems.append(f"tensor {key} in {os.path.basename(source.location[key])}"
                        f" has shape {list(shape)}, expected {list(want)} from config.json")
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    hint = ""
    if not_float:
      method = (f" (config.json's quantization_config says"
                f" {quantization.get('quant_method', 'quantized')!r})"
                if isinstance(quantization, dict) else "")
      hint = (f"\nhetflow reads float checkpoints ({', '.join(FLOAT_DTYPES)}); {not_float}"
              f" tensor(s) are quantized or not weights{method}. Dequantize first (load it"
              " with transformers and save_pretrained in float16 or bfloat16).")
    raise CheckpointError(
        f"checkpoint does not match its config ({len(problems)} problem(s)):\n  {shown}{more}"
        f"{hint}")


class UnreadableTokenizer:
  """Stands in for a tokenizer.json that exists but cannot be read.

  Loading goes on (token-id prompts need no tokenizer); text prompts, and
  decoding to text, raise a CheckpointError naming the file.

  Attributes:
    path: the tokenizer.json.
    reason: why it could not be read.
    readable: always False (the engine then returns no text).
  """

  readable = False

  def __init__(self, path: str, reason: str):
    self.path = path
    self.reason = reason

  def _refuse(self, *args, **kwargs):
    raise CheckpointError(
        f"{self.path} could not be read ({self.reason}); copy a working tokenizer.json there,"
        " or pass token ids instead of text.")

  encode = decode = _refuse


def _load_tokenizer(directory: str):
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.exists(path):
    return None
  from tokenizers import Tokenizer
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # the tokenizers library raises a bare Exception
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    warnings.warn(f"{path} could not be read ({reason}); the model loads without a tokenizer:"
                  " token-id prompts work, text prompts raise.", stacklevel=3)
    return UnreadableTokenizer(path, reason)
