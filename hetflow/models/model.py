"""A model = a config + a lazy source of weights, and its jitted half-functions.

Weights are never all materialised at once by hetflow itself: a `WeightSource`
hands out one named tensor at a time (memory-mapped from safetensors or GGUF,
or generated for synthetic models), and a strategy decides when and where each
one is placed. Names are the stable flat paths of hetflow.models.modules,
e.g. "embed/tokens", "layers/3/mlp/up", "head/lm_head".

A model's weight format (`Model.weights`, see hetflow/models/formats.py) decides how
its linear kernels are stored: a quantized kernel is a small dict of arrays at
the kernel's path ("layers/3/mlp/up" -> {"q", "scale"}), made once per tensor
as a strategy places it, so the whole model is never widened in memory.
`Model.shapes` lists the stored leaves ("layers/3/mlp/up/q", ...);
`parameter_shapes` the logical (float) ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.models import formats, modules
from hetflow.models.config import ModelConfig

Tree = dict[str, Any]


class WeightSource(Protocol):
  """Where a model's tensors come from; `get` materialises one tensor.

  A source that holds kernels already in some format (a GGUF file) may also
  define `get_stored(name, fmt) -> dict | None`: the kernel's stored leaves in
  `fmt` (a hetflow.models.formats.WeightFormat) when it has them without
  re-quantizing, else None.
  """

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


@functools.lru_cache(maxsize=64)
def stored_shapes(config: ModelConfig, dtype, weights: formats.WeightFormat
                  ) -> dict[str, jax.ShapeDtypeStruct]:
  """Every stored leaf's name, shape and dtype under weight format `weights`.

  Kernels the format applies to become their leaves ("layers/0/mlp/up/q",
  ".../scale"); every other parameter is as in `parameter_shapes`.
  """
  out = {}
  for name, spec in parameter_shapes(config, dtype).items():
    if weights.applies(name):
      try:
        leaves = weights.leaf_shapes(spec.shape)
      except formats.FormatError as e:
        raise formats.FormatError(f"{config.name}: {name}: {e}") from None
      out.update({f"{name}/{leaf}": s for leaf, s in leaves.items()})
    else:
      out[name] = spec
  return out


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
    weights: the weight format of the linear kernels ("float32", "bfloat16",
      "int8", "int8-g32", "int4", "int4-asym", ...; hetflow/models/formats.py).
      Embeddings, norms, biases and the MoE router stay in `dtype`.
  """

  config: ModelConfig
  source: WeightSource
  dtype: Any = jnp.float32
  tokenizer: Any = None
  description: str = ""
  weights: str = "float32"

  def __post_init__(self):
    self.weights = formats.WeightFormat.parse(self.weights).name
    _ = self.shapes  # a format the kernels' shapes do not allow fails here, naming the kernel

  @property
  def format(self) -> formats.WeightFormat:
    """The weight format as an object."""
    return formats.WeightFormat.parse(self.weights)

  @property
  def weights_note(self) -> str:
    """What the weight format covers, for a placement's notes."""
    fmt = self.format
    wide = jnp.dtype(self.dtype).name
    if fmt.plain:
      return f"weights: {wide} throughout"
    return (f"weights: {fmt.name} ({fmt.bits_per_weight:g} bits/weight) for the blocks' linear"
            f" kernels and an untied LM head; embeddings, norms, biases, routers in {wide}")

  @property
  def shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Stored leaves (a quantized kernel contributes one entry per leaf)."""
    return stored_shapes(self.config, jnp.dtype(self.dtype), self.format)

  @property
  def logical_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Parameters as float arrays of the compute dtype, whatever the format."""
    return parameter_shapes(self.config, jnp.dtype(self.dtype))

  def tensor(self, name: str) -> np.ndarray:
    """Materialises one tensor: a parameter as the source holds it (compute dtype),
    or one stored leaf of a quantized kernel ("layers/0/mlp/up/scale").

    For a quantized kernel's own name this is the float value before
    quantization (what `param` stores); strategies place `param`/`group_tensors`.
    """
    if name not in self.logical_shapes and name in self.shapes:
      kernel, leaf = name.rsplit("/", 1)
      return self.param(kernel)[leaf]
    return self.source.get(name, jnp.dtype(self.dtype))

  def param(self, name: str) -> Any:
    """Materialises one parameter as stored: an array, or a kernel's dict of leaves."""
    fmt = self.format
    if not fmt.applies(name):
      return self.tensor(name)
    get_stored = getattr(self.source, "get_stored", None)
    stored = get_stored(name, fmt) if get_stored is not None else None
    if stored is not None:
      return stored
    # bfloat16 is read as bfloat16 (never widened); integer formats widen one
    # tensor at a time while quantizing it.
    dtype = jnp.bfloat16 if fmt.kind == "bfloat16" else jnp.float32
    return fmt.quantize(self.source.get(name, jnp.dtype(dtype)))

  def group_names(self) -> list[str]:
    """Placement groups in execution order: embed, layers/i/{attn,mlp}, head."""
    groups = ["embed"]
    for i in range(self.config.num_layers):
      groups += [f"layers/{i}/attn", f"layers/{i}/mlp"]
    return groups + ["head"]

  def group_tensors(self, group: str) -> dict[str, Any]:
    """Materialises every parameter of one group as stored, keyed by leaf name.

    A quantized kernel is a dict of arrays ({"q", "scale"}); everything else
    an array (disk stores hold its leaves as flat "up/q" names).
    """
    prefix = group + "/"
    return {n[len(prefix):]: self.param(n) for n in self.logical_shapes
            if n.startswith(prefix)}

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
    """Every parameter as stored, as a nested tree (materialises all)."""
    return unflatten({n: self.param(n) for n in self.logical_shapes})

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
    # The pure half-functions of the modules, not Module.apply: a quantized
    # kernel's leaves are a dict where the module declares one array, and the
    # functions dispatch on it (hetflow/models/formats.py).
    self.embed = jax.jit(lambda p, ids, pos: modules.embed(config, p, ids, pos))
    # The cache is donated: XLA updates it in place instead of copying it.
    self.attention = jax.jit(
        lambda p, x, cache, index, pos, mask: modules.attention_half(
            config, p, x, cache, index, pos, mask, modules.named_linear),
        donate_argnums=(2,))
    self.ffn = jax.jit(lambda p, x: modules.ffn_half(config, p, x))
    self.head = jax.jit(lambda p, tokens, x: modules.head(config, p, x, tokens))

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
