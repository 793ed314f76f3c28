"""A model = a config + a lazy source of weights, and its jitted half-functions.

Weights are never all materialised at once by hetflow itself: a `WeightSource`
hands out one named tensor at a time (memory-mapped from safetensors, or
generated for synthetic models), and a strategy decides when and where each
one is placed. Names are the stable flat paths of hetflow.models.modules,
e.g. "embed/tokens", "layers/3/mlp/up", "head/lm_head".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.models import modules
from hetflow.models.config import ModelConfig

Tree = dict[str, Any]


class WeightSource(Protocol):
  """Where a model's tensors come from; `get` materialises one tensor."""

  def get(self, name: str, dtype) -> np.ndarray:
    """Returns tensor `name` (hetflow layout) as a numpy array of `dtype`."""


def _ffn_module(config: ModelConfig):
  return modules.MoEFFNHalf if config.arch == "mixtral" else modules.DenseFFNHalf


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  return {f"{prefix}/{k}": v for k, v in tree.items()}


@functools.lru_cache(maxsize=64)
def parameter_shapes(config: ModelConfig, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
  """Every parameter's name, shape and dtype, derived from the Flax modules.

  Uses jax.eval_shape, so full-size configs (70B and up) cost nothing.
  """
  b, t, s = 1, 1, 1
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  x = jax.ShapeDtypeStruct((b, t, config.hidden_size), dtype)
  cache_leaf = jax.ShapeDtypeStruct((b, s, config.num_kv_heads, config.head_dim), dtype)
  mask = jax.ShapeDtypeStruct((b, s), jnp.bool_)
  key = jax.random.key(0)

  def init(module, *args):
    return jax.eval_shape(module(config, dtype).init, key, *args)["params"]

  shapes = _flatten(init(modules.Embed, ids, ids), "embed")
  attn = init(modules.AttentionHalf, x, (cache_leaf, cache_leaf), 0, ids, mask)
  mlp = init(_ffn_module(config), x)
  for i in range(config.num_layers):
    shapes.update(_flatten(attn, f"layers/{i}/attn"))
    shapes.update(_flatten(mlp, f"layers/{i}/mlp"))
  head_args = (x, jax.ShapeDtypeStruct((config.vocab_size, config.embed_dim), dtype))
  shapes.update(_flatten(init(modules.Head, *head_args), "head"))
  return shapes


def group_of(name: str) -> str:
  """The placement group of a parameter: "embed", "head", "layers/3/attn", ..."""
  parts = name.split("/")
  return "/".join(parts[:3]) if parts[0] == "layers" else parts[0]


def unflatten(flat: Mapping[str, Any]) -> Tree:
  """{"layers/3/mlp/up": a} -> {"layers": {"3": {"mlp": {"up": a}}}}."""
  tree: Tree = {}
  for name, value in flat.items():
    node = tree
    *path, leaf = name.split("/")
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


@dataclasses.dataclass
class Model:
  """A loaded (or synthetic) model: config, lazy weights, optional tokenizer.

  Attributes:
    config: the architecture.
    source: hands out tensors by stable name (see module docstring).
    dtype: compute dtype; tensors are converted to it when materialised.
    tokenizer: a `tokenizers.Tokenizer` when the checkpoint has one, else None.
    description: where the weights came from, for logs and tables.
  """

  config: ModelConfig
  source: WeightSource
  dtype: Any = jnp.float32
  tokenizer: Any = None
  description: str = ""

  @property
  def shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    return parameter_shapes(self.config, jnp.dtype(self.dtype))

  def tensor(self, name: str) -> np.ndarray:
    """Materialises one tensor in the compute dtype (host numpy array)."""
    return self.source.get(name, jnp.dtype(self.dtype))

  def group_names(self) -> list[str]:
    """Placement groups in execution order: embed, layers/i/{attn,mlp}, head."""
    groups = ["embed"]
    for i in range(self.config.num_layers):
      groups += [f"layers/{i}/attn", f"layers/{i}/mlp"]
    return groups + ["head"]

  def group_tensors(self, group: str) -> dict[str, np.ndarray]:
    """Materialises every tensor of one group, keyed by leaf name."""
    prefix = group + "/"
    return {n[len(prefix):]: self.tensor(n) for n in self.shapes if n.startswith(prefix)}

  def group_nbytes(self, group: str) -> int:
    prefix = group + "/"
    return sum(s.size * s.dtype.itemsize for n, s in self.shapes.items()
               if n.startswith(prefix))

  @property
  def nbytes(self) -> int:
    return sum(s.size * s.dtype.itemsize for s in self.shapes.values())

  def kv_cache_nbytes(self, tokens: int | None = None, batch: int = 1,
                      layers: int | None = None) -> int:
    """Bytes of the KV cache (keys and values) the engine allocates.

    Args:
      tokens: positions per row; None: the model's max positions (the reserve
        every strategy plans by default).
      batch: rows.
      layers: layers counted; None: all of them.
    """
    c = self.config
    tokens = c.max_position_embeddings if tokens is None else tokens
    layers = c.num_layers if layers is None else layers
    return 2 * layers * batch * tokens * c.num_kv_heads * c.head_dim * jnp.dtype(self.dtype).itemsize

  def params(self) -> Tree:
    """Every tensor, as a nested tree of numpy arrays (materialises all)."""
    return unflatten({n: self.tensor(n) for n in self.shapes})

  @functools.cached_property
  def functions(self) -> "ModelFunctions":
    return ModelFunctions(self.config, jnp.dtype(self.dtype))


class ModelFunctions:
  """The jitted pieces the engine composes; each compiled once per shape.

  One jitted function per block kind (docs/architecture.md, the engine seam): `attention` and `ffn`
  take one layer's parameters as arguments, so the same executable serves
  every layer wherever its weights live.
  """

  def __init__(self, config: ModelConfig, dtype):
    self.config = config
    self.dtype = dtype
    embed = modules.Embed(config, dtype)
    attn = modules.AttentionHalf(config, dtype)
    ffn = _ffn_module(config)(config, dtype)
    head = modules.Head(config, dtype)
    self.embed = jax.jit(lambda p, ids, pos: embed.apply({"params": p}, ids, pos))
    # The cache is donated: XLA updates it in place instead of copying it.
    self.attention = jax.jit(
        lambda p, x, cache, index, pos, mask: attn.apply(
            {"params": p}, x, cache, index, pos, mask),
        donate_argnums=(2,))
    self.ffn = jax.jit(lambda p, x: ffn.apply({"params": p}, x))
    self.head = jax.jit(lambda p, tokens, x: head.apply({"params": p}, x, tokens))
    self.ffn_module = ffn

  def new_cache(self, batch: int, slots: int, sharding=None):
    """A zeroed KV cache for one layer: (k, v), each [B, S, G, K]."""
    shape = (batch, slots, self.config.num_kv_heads, self.config.head_dim)
    make = lambda: jnp.zeros(shape, self.dtype, device=sharding)
    return (make(), make())


def forward_reference(model: Model, ids, attention_mask=None):
  """Full-sequence logits with all weights resident; the plainest composition.

  Used by tests as the ground truth the engine and every strategy must match.
  """
  fn = model.functions
  params = model.params()
  ids = jnp.asarray(ids)
  b, t = ids.shape
  mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  x = fn.embed(params["embed"], ids, positions)
  for i in range(model.config.num_layers):
    layer = params["layers"][str(i)]
    x, _ = fn.attention(layer["attn"], x, fn.new_cache(b, t), 0, positions, mask)
    x = fn.ffn(layer["mlp"], x)
  tokens = params["embed"]["tokens"] if model.config.tie_word_embeddings else None
  return fn.head(params.get("head", {}), tokens, x)
