"""Deterministic random models by named shape, with no files to download.

`synthetic_model(name, seed)` returns a Model whose tensors are generated on
demand from (seed, tensor name), so even a 30B shape costs nothing until a
strategy places its weights, and the same name and seed give the same bits
everywhere. `save_hf` writes any Model as an HF checkpoint directory
(config.json + safetensors shards + index), so every loading path can be
exercised on synthetic files.

Weights are scaled by 1/sqrt(fan_in) so activations and logits stay of order
one: greedy tokens then have clear margins, which the strategy invariance
tests rely on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from hetflow.checkpoints import hf_names
from hetflow.models.config import ModelConfig
from hetflow.models.model import Model, parameter_shapes

_LLAMA_1B = dict(arch="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                 num_layers=22, num_heads=32, num_kv_heads=4, head_dim=64,
                 max_position_embeddings=2048, norm_eps=1e-5, bos_token_id=1,
                 eos_token_id=2)
_LLAMA_TINY = dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=192,
                   num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=256, eos_token_id=2, bos_token_id=1)


_MISTRAL_7B = dict(_LLAMA_1B, hidden_size=4096, intermediate_size=14336, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                   rope_theta=1e6)


def _opt(d, layers, heads, ffn=None, vocab=50272, **kw):
  return dict(arch="opt", vocab_size=vocab, hidden_size=d, intermediate_size=ffn or 4 * d,
              num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
              hidden_act="relu", tie_word_embeddings=True, word_embed_proj_dim=d,
              bos_token_id=2, eos_token_id=2, pad_token_id=1, **kw)


# Named shapes. Tiny ones are a few MB, for tests; the rest match real models.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-tiny": _LLAMA_TINY,
    "llama-tiny-relu": dict(_LLAMA_TINY, hidden_act="relu"),
    "llama-tiny-drelu": dict(_LLAMA_TINY, hidden_act="drelu"),
    "opt-tiny": _opt(64, 3, 4, vocab=512, max_position_embeddings=256),
    "mixtral-tiny": dict(_LLAMA_TINY, arch="mixtral", intermediate_size=96, num_experts=4,
                         experts_per_token=2, rope_theta=1e6),
    "llama-1b": _LLAMA_1B,  # TinyLlama-1.1B
    "llama-2-7b": dict(_LLAMA_1B, hidden_size=4096, intermediate_size=11008, num_layers=32,
                       num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "llama-2-70b": dict(_LLAMA_1B, hidden_size=8192, intermediate_size=28672, num_layers=80,
                        num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=4096),
    "mistral-7b": dict(_LLAMA_1B, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                       rope_theta=1e6),
    "mixtral-8x7b": dict(_LLAMA_1B, arch="mixtral", hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                         max_position_embeddings=32768, rope_theta=1e6, num_experts=8,
                         experts_per_token=2),
    # PowerInfer-2's models (docs/papers.md): Mistral-7B / Mixtral-8x7B shapes whose FFNs
    # use dReLU (ReLU on gate and up). Published activation sparsities live with the
    # neuron_cluster cost model (hetflow/sparsity/cache_model.py, PUBLISHED_LAWS).
    "turbosparse-mistral-7b": dict(_MISTRAL_7B, hidden_act="drelu"),
    "bamboo-7b": dict(_MISTRAL_7B, hidden_act="drelu"),
    "turbosparse-mixtral-47b": dict(_MISTRAL_7B, arch="mixtral", hidden_act="drelu",
                                    num_experts=8, experts_per_token=2),
    "opt-125m": _opt(768, 12, 12),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
}


def synthetic_config(name: str) -> ModelConfig:
  if name not in SHAPES:
    raise ValueError(f"unknown synthetic model {name!r}; known: {sorted(SHAPES)}.")
  return ModelConfig(name=name, **SHAPES[name])


class SyntheticSource:
  """Generates each tensor from (seed, name): same bits on every call."""

  def __init__(self, config: ModelConfig, seed: int,
               transform: Callable[[str, np.ndarray], np.ndarray] | None = None):
    self.config = config
    self.seed = seed
    self.transform = transform  # e.g. sparsity shaping, applied after generation
    self._shapes = parameter_shapes(config, jnp.float32)

  def get(self, name: str, dtype) -> np.ndarray:
    shape = self._shapes[name].shape
    digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("norm",):
      array = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    elif leaf.endswith("_bias"):
      array = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    else:
      # Embedding rows get std 1/sqrt(width) so tied LM heads give O(1) logits.
      fan_in = shape[-1] if leaf in ("tokens", "positions") else shape[-2]
      array = rng.standard_normal(shape, dtype=np.float32)
      array *= np.float32(1.0 / np.sqrt(fan_in))
    if self.transform is not None:
      array = self.transform(name, array)
    return array.astype(dtype, copy=False)


def dense_model(name: str, seed: int = 0, dtype: Any = jnp.float32) -> Model:
  """A deterministic random model of a named dense shape (see SHAPES).

  `hetflow.synthetic_model` (hetflow/checkpoints/named.py) also knows the
  sparse ones.
  """
  config = synthetic_config(name)
  return Model(config=config, source=SyntheticSource(config, seed), dtype=dtype,
               description=f"synthetic {name} (seed {seed})")


def save_hf(model: Model, directory: str, dtype: Any = None,
            max_shard_bytes: int = 2 << 30, progress: bool = False) -> str:
  """Writes `model` as an HF checkpoint directory (atomically).

  Args:
    model: any Model (synthetic or loaded).
    directory: created; must not exist yet.
    dtype: stored dtype (e.g. jnp.bfloat16); the model's dtype by default.
    max_shard_bytes: shards are split at this size; >1 shard writes the index.
    progress: show a progress bar.

  Returns:
    The directory.
  """
  from safetensors.numpy import save_file
  from tqdm.auto import tqdm

  directory = os.fspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} exists; choose a new directory.")
  dtype = jnp.dtype(dtype or model.dtype)
  partial = directory + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    table = hf_names.hf_names(model.config)
    # Each shard is written as soon as it is full, so at most one shard is in
    # memory; shards get their final "-of-N" names once N is known.
    written: list[tuple[str, list[str], int]] = []  # (temp file, keys, bytes)
    current, size = {}, 0

    def flush():
      nonlocal current, size
      path = os.path.join(partial, f"shard-{len(written)}.tmp")
      save_file(current, path, metadata={"format": "pt"})
      written.append((path, list(current), size))
      current, size = {}, 0

    bar = tqdm(total=model.nbytes, unit="B", unit_scale=True, disable=not progress,
               desc=f"writing {os.path.basename(directory)}")
    for name in model.shapes:
      array = model.tensor(name).astype(dtype)
      bar.update(array.nbytes)
      hf, transpose = table[name]
      parts = [array] if len(hf) == 1 else list(array)
      for key, part in zip(hf, parts):
        current[key] = np.ascontiguousarray(part.T if transpose else part)
        size += part.nbytes
      if size >= max_shard_bytes:
        flush()
    if current:
      flush()
    bar.close()
    names = ["model.safetensors"] if len(written) == 1 else [
        f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map = {}
    for file, (temp, keys, _) in zip(names, written):
      os.rename(temp, os.path.join(partial, file))
      weight_map.update({k: file for k in keys})
    if len(written) > 1:
      with open(os.path.join(partial, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(n for _, _, n in written)},
                   "weight_map": weight_map}, f, indent=2)
    hf_config = hf_names.config_to_hf(model.config)
    hf_config["torch_dtype"] = str(dtype)
    with open(os.path.join(partial, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
    os.rename(partial, directory)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return directory
