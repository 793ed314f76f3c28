"""GGUF files (llama.cpp's format) as a checkpoint source, through the `gguf` package.

`load_gguf(path)` reads a llama-family GGUF file lazily (the file is memory
mapped; a tensor is read when a strategy places it) and maps its tensor types
onto hetflow's weight formats without re-quantizing where they match:

  GGUF type   hetflow format    how
  F32         float32           as stored
  F16         float32           widened exactly (or any format by re-quantizing)
  BF16        bfloat16          as stored
  Q8_0        int8-g32          values and float16 scales as stored
  Q4_0        int4              nibbles, in GGUF's block order, and scales as stored
  Q4_1        int4-asym         nibbles, scales and minimums as stored

Asking for another format (`weights="int8"` on a Q4_0 file) dequantizes each
tensor with the gguf package and quantizes it again, one tensor at a time.
Embeddings and norms are always widened to the compute dtype (see
hetflow/models/formats.py). llama.cpp's converter permutes the rows of q and k for
its RoPE layout; they are permuted back here (rows only, so quantized blocks
stay intact). `save_gguf` writes a model as such a file (with the same
permutation), for tests and for running llama.cpp on the same weights.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hetflow.checkpoints.hf import CheckpointError
from hetflow.models.config import ModelConfig
from hetflow.models.formats import WeightFormat, group_major
from hetflow.models.model import Model, parameter_shapes

# hetflow leaf under layers/<i>/<half> -> GGUF tensor name (llama.cpp's llama names).
_LAYER = {
    "attn/norm": "blk.{i}.attn_norm.weight",
    "attn/q": "blk.{i}.attn_q.weight",
    "attn/k": "blk.{i}.attn_k.weight",
    "attn/v": "blk.{i}.attn_v.weight",
    "attn/o": "blk.{i}.attn_output.weight",
    "mlp/norm": "blk.{i}.ffn_norm.weight",
    "mlp/gate": "blk.{i}.ffn_gate.weight",
    "mlp/up": "blk.{i}.ffn_up.weight",
    "mlp/down": "blk.{i}.ffn_down.weight",
}
# Mixtral (llama.cpp's "llama" architecture with experts): the experts of a layer are one
# 3-D tensor per projection, and the router is ffn_gate_inp.
_MOE_LAYER = {
    "mlp/norm": "blk.{i}.ffn_norm.weight",
    "mlp/router": "blk.{i}.ffn_gate_inp.weight",
    "mlp/gate": "blk.{i}.ffn_gate_exps.weight",
    "mlp/up": "blk.{i}.ffn_up_exps.weight",
    "mlp/down": "blk.{i}.ffn_down_exps.weight",
}
_GLOBAL = {"embed/tokens": "token_embd.weight", "head/norm": "output_norm.weight",
           "head/lm_head": "output.weight"}
_ARCHES = ("llama", "mistral")


def _types():
  import gguf
  return gguf.GGMLQuantizationType


def _matching_format(ggml_type) -> WeightFormat | None:
  """The hetflow format a GGUF tensor type maps to without re-quantizing."""
  t = _types()
  return {t.F32: WeightFormat("float32"), t.F16: WeightFormat("float32"),
          t.BF16: WeightFormat("bfloat16"), t.Q8_0: WeightFormat("int8", 32),
          t.Q4_0: WeightFormat("int4", 32), t.Q4_1: WeightFormat("int4", 32, True)}.get(ggml_type)


def gguf_names(config: ModelConfig) -> dict[str, str]:
  """hetflow parameter name -> GGUF tensor name, for a llama-family (or Mixtral) config."""
  names = dict(_GLOBAL)
  if config.tie_word_embeddings:
    del names["head/lm_head"]
  layer = dict(_LAYER)
  if config.arch == "mixtral":
    layer = {k: v for k, v in layer.items() if not k.startswith("mlp/")} | _MOE_LAYER
  for i in range(config.num_layers):
    names.update({f"layers/{i}/{leaf}": g.format(i=i) for leaf, g in layer.items()})
  return names


def _file_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """A tensor's numpy shape in a GGUF file from hetflow's: kernels [..., in, out] are
  stored as rows [..., out, in] (Mixtral's experts: one [out, in] matrix per expert)."""
  if len(shape) >= 2 and name != "embed/tokens":
    return tuple(shape[:-2]) + (shape[-1], shape[-2])
  return tuple(shape)


def _rope_rows(config: ModelConfig, name: str) -> int | None:
  """Heads whose rows llama.cpp's converter permuted (q: H, k: G), else None."""
  leaf = name.rsplit("/", 1)[-1]
  if name.startswith("layers/") and leaf == "q":
    return config.num_heads
  if name.startswith("layers/") and leaf == "k":
    return config.num_kv_heads
  return None


def _permute(rows: np.ndarray, heads: int, inverse: bool) -> np.ndarray:
  """llama.cpp's q/k row permutation (convert_hf_to_gguf's `permute`) or its inverse."""
  half = rows.shape[0] // heads // 2
  if inverse:
    split = rows.reshape(heads, half, 2, *rows.shape[1:])
  else:
    split = rows.reshape(heads, 2, half, *rows.shape[1:])
  return np.ascontiguousarray(split.swapaxes(1, 2).reshape(rows.shape))


class GGUFSource:
  """Hands out hetflow-named tensors from a memory-mapped GGUF file."""

  def __init__(self, path: str, config: ModelConfig, reader):
    self.path = path
    self.config = config
    self._names = gguf_names(config)
    self._tensors = {t.name: t for t in reader.tensors}

  def tensor_type(self, name: str):
    return self._tensors[self._names[name]].tensor_type

  def get(self, name: str, dtype) -> np.ndarray:
    """Tensor `name` dequantized, in hetflow's layout ([in, out] kernels), as `dtype`."""
    import gguf

    t = self._tensors[self._names[name]]
    if t.tensor_type == _types().BF16:
      rows = np.asarray(t.data).view(ml_dtypes.bfloat16)
    else:
      rows = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    rows = rows.reshape(tuple(int(d) for d in reversed(t.shape)))
    heads = _rope_rows(self.config, name)
    if heads is not None:
      rows = _permute(rows, heads, inverse=True)
    if rows.ndim >= 2 and name != "embed/tokens":
      # GGUF holds [out, in] rows like HF; hetflow's float kernels are [in, out]
      rows = np.swapaxes(rows, -1, -2)
    return np.ascontiguousarray(rows, dtype=dtype)

  def get_stored(self, name: str, fmt: WeightFormat) -> dict[str, np.ndarray] | None:
    """The kernel's leaves in `fmt` straight from the file, or None if its type differs."""
    t = self._tensors[self._names[name]]
    if _matching_format(t.tensor_type) != fmt or fmt.plain:
      return None
    data = np.asarray(t.data)
    types = _types()
    heads = _rope_rows(self.config, name)
    if heads is not None:  # rows are output channels; blocks stay whole
      data = _permute(data, heads, inverse=True)
    if t.tensor_type == types.BF16:
      return {"q": np.ascontiguousarray(data.view(ml_dtypes.bfloat16))}
    blocks = data.reshape(*data.shape[:-1], -1, {types.Q8_0: 34, types.Q4_0: 18, types.Q4_1: 20}[
        t.tensor_type])  # [..., out, G, block]
    leaves = {"scale": np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]}
    if t.tensor_type == types.Q8_0:
      leaves["q"] = blocks[..., 2:].view(np.int8)
    elif t.tensor_type == types.Q4_0:
      leaves["q"] = blocks[..., 2:]
    else:
      leaves["min"] = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
      leaves["q"] = blocks[..., 4:]
    return group_major(leaves)


def _blocks(leaves: dict[str, np.ndarray], ggml_type) -> np.ndarray:
  """A kernel's stored leaves as the GGUF tensor of `ggml_type` (uint8 rows [..., out, bytes]):
  `get_stored`'s inverse, so a kernel already in the file's format is written as it is."""
  types = _types()
  q = np.asarray(leaves["q"])
  if ggml_type == types.BF16:
    return np.ascontiguousarray(q).view(np.uint8)  # [..., out, in] -> [..., out, 2 * in]
  parts = [np.swapaxes(np.asarray(leaves["scale"], np.float16), -1, -2)[..., None]]
  if ggml_type == types.Q4_1:
    parts.append(np.swapaxes(np.asarray(leaves["min"], np.float16), -1, -2)[..., None])
  parts = [p.view(np.uint8) for p in parts] + [np.moveaxis(q, -3, -2).view(np.uint8)]
  blocks = np.concatenate(parts, axis=-1)  # [..., out, G, block]
  return np.ascontiguousarray(blocks.reshape(*blocks.shape[:-2], -1))


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _float(value) -> float:
  """A float32 metadata value as the decimal it was written from (1e-05, not 9.99e-06)."""
  return float(f"{float(value):.7g}")


def _config(reader, path: str) -> ModelConfig:
  arch = _field(reader, "general.architecture")
  if arch not in _ARCHES:
    raise CheckpointError(
        f"{path}: general.architecture={arch!r}; hetflow reads llama-family GGUF files"
        f" ({', '.join(_ARCHES)}). Load the model's HF checkpoint directory instead.")

  def need(key):
    value = _field(reader, f"{arch}.{key}")
    if value is None:
      raise CheckpointError(f"{path}: metadata {arch}.{key} is missing; the file is not a"
                            " complete llama.cpp model (convert it again).")
    return int(value)

  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise CheckpointError(f"{path}: tensor token_embd.weight is missing.")
  if "rope_freqs.weight" in tensors:
    raise CheckpointError(
        f"{path}: the file scales RoPE with a rope_freqs tensor (Llama 3.1 style), which"
        " hetflow does not read from GGUF; load the HF checkpoint directory instead.")
  d, heads = need("embedding_length"), need("attention.head_count")
  experts = _field(reader, f"{arch}.expert_count")
  scaling = None
  if _field(reader, f"{arch}.rope.scaling.type") == "linear":
    scaling = {"rope_type": "linear", "factor": _float(_field(reader, f"{arch}.rope.scaling.factor"))}
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  bos = _field(reader, "tokenizer.ggml.bos_token_id")
  pad = _field(reader, "tokenizer.ggml.padding_token_id")
  moe: dict[str, Any] = {"arch": "llama"}
  if experts:
    moe = dict(arch="mixtral", num_experts=int(experts),
               experts_per_token=int(_field(reader, f"{arch}.expert_used_count", 2)))
  return ModelConfig(
      name=os.path.splitext(os.path.basename(path))[0],
      vocab_size=int(tensors["token_embd.weight"].shape[1]), hidden_size=d,
      intermediate_size=need("feed_forward_length"), num_layers=need("block_count"),
      num_heads=heads,
      num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
      head_dim=int(_field(reader, f"{arch}.rope.dimension_count", d // heads)),
      max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
      norm_eps=_float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=_float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      rope_scaling=scaling, tie_word_embeddings="output.weight" not in tensors,
      bos_token_id=None if bos is None else int(bos),
      eos_token_id=None if eos is None else int(eos),
      pad_token_id=None if pad is None else int(pad), **moe)


def natural_format(source: GGUFSource, config: ModelConfig) -> WeightFormat:
  """The format most block kernels are stored in (what `weights=None` loads)."""
  fmt = WeightFormat("int8")  # any quantized format: it only selects the kernel names
  counts = collections.Counter(source.tensor_type(n) for n in gguf_names(config)
                               if n.startswith("layers/") and fmt.applies(n))
  common = counts.most_common(1)[0][0]
  match = _matching_format(common)
  if match is None:
    raise CheckpointError(
        f"{source.path}: its kernels are {common.name}, which has no hetflow format; pass"
        " weights= (e.g. 'int4' or 'int8') to re-quantize them from their values.")
  return match


def load_gguf(path: str, dtype: Any = jnp.float32, weights: str | None = None) -> Model:
  """Loads a llama-family GGUF file lazily (see the module docstring).

  Args:
    path: the *.gguf file.
    dtype: compute dtype of activations, embeddings and norms.
    weights: the kernels' format; None: the format the file's kernels are in
      (F16 files load as float32).

  Returns:
    A Model whose tensors are read from the memory-mapped file on demand.

  Raises:
    CheckpointError: naming the file and what is wrong with it.
  """
  import gguf

  path = os.fspath(path)
  try:
    reader = gguf.GGUFReader(path, "r")
  except (ValueError, OSError) as e:
    raise CheckpointError(f"{path} is not a readable GGUF file ({e}); copy it again.") from None
  config = _config(reader, path)
  source = GGUFSource(path, config, reader)
  missing = [g for n, g in gguf_names(config).items() if g not in source._tensors]
  if missing:
    raise CheckpointError(f"{path}: tensors {missing[:5]} are missing"
                          f"{f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''}.")
  problems = []
  for name, spec in parameter_shapes(config, jnp.float32).items():
    t = source._tensors[source._names[name]]
    want = _file_shape(name, tuple(spec.shape))
    got = tuple(int(v) for v in reversed(t.shape))
    if got != want:
      problems.append(f"{t.name} has shape {list(got)}, expected {list(want)}")
  if problems:
    raise CheckpointError(f"{path}: tensors do not match the file's metadata:\n  "
                          + "\n  ".join(problems[:10]))
  fmt = WeightFormat.parse(weights) if weights is not None else natural_format(source, config)
  return Model(config=config, source=source, dtype=dtype, description=path, weights=fmt.name)


_FILE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def save_gguf(model: Model, path: str, file_type: str = "F32") -> str:
  """Writes `model` (llama family) as a GGUF file llama.cpp can read (atomically).

  Kernels (and an untied LM head) are stored as `file_type`; embeddings and
  norms as F32. q and k rows are permuted as llama.cpp's converter does.
  Where the model's format is the file type's (int4 and Q4_0, int8-g32 and
  Q8_0, int4-asym and Q4_1, bfloat16 and BF16), its kernels are written as
  stored, not re-quantized (the same bits: the rules are GGUF's).
  The file has no tokenizer vocabulary (tokenizer model "none": llama.cpp
  loads it and runs token ids).

  Args:
    model: a llama-family Model (its float tensors are written).
    path: the file to create; must not exist.
    file_type: "F32", "F16", "BF16", "Q8_0", "Q4_0" or "Q4_1".

  Returns:
    The path.
  """
  import gguf

  path = os.fspath(path)
  if file_type not in _FILE_TYPES:
    raise ValueError(f"file_type={file_type!r}; expected one of {_FILE_TYPES}.")
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; choose a new file.")
  c = model.config
  if (c.arch not in ("llama", "mixtral") or c.attention_bias or c.mlp_bias
      or c.rope_scaling is not None or c.sliding_window is not None
      or c.hidden_act != "silu"):
    raise ValueError(f"save_gguf writes plain llama and Mixtral models (SiLU, no biases, no"
                     f" RoPE scaling or sliding window); {c.name} is not one.")
  qtype = getattr(gguf.GGMLQuantizationType, file_type)
  kernel = WeightFormat("int8")  # selects the kernel names
  names = gguf_names(c)

  as_stored = not model.format.plain and _matching_format(qtype) == model.format

  def stored(name: str) -> np.ndarray:
    """One tensor as the file holds it: [out, in] rows, q/k permuted, quantized."""
    heads = _rope_rows(c, name)
    if as_stored and kernel.applies(name):  # the model's own blocks, not re-quantized
      blocks = _blocks(model.param(name), qtype)
      return blocks if heads is None else _permute(blocks, heads, inverse=False)
    array = np.asarray(model.tensor(name), np.float32)
    if array.ndim >= 2 and name != "embed/tokens":
      array = np.ascontiguousarray(np.swapaxes(array, -1, -2))
    if heads is not None:
      array = _permute(array, heads, inverse=False)
    if kernel.applies(name) and file_type != "F32":
      return gguf.quants.quantize(array, qtype)
    return array

  partial = f"{path}.partial-{os.getpid()}"
  writer = gguf.GGUFWriter(partial, "llama")
  try:
    writer.add_name(c.name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.arch == "mixtral":
      writer.add_expert_count(c.num_experts)
      writer.add_expert_used_count(c.experts_per_token)
    writer.add_tokenizer_model("none")  # llama.cpp then loads it with placeholder tokens
    for key, value in (("bos", c.bos_token_id), ("eos", c.stop_tokens[0] if c.stop_tokens
                                                 else None), ("pad", c.pad_token_id)):
      if value is not None:
        getattr(writer, f"add_{key}_token_id")(int(value))
    # Tensor infos first (shapes only), then one tensor at a time: the writer never holds
    # more than one tensor, so a 7B model is written in the memory of its largest tensor.
    for name, g in names.items():
      shape = _file_shape(name, tuple(model.logical_shapes[name].shape))
      if kernel.applies(name) and file_type != "F32":
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(g, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=qtype)
      else:
        writer.add_tensor_info(g, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in names:
      writer.write_tensor_data(stored(name))
    writer.close()
    os.rename(partial, path)
  except BaseException:
    writer.close()
    if os.path.exists(partial):
      os.remove(partial)
    raise
  return path
