"""Full-size configs build abstractly on the CPU, without allocating weights."""

import jax
import jax.numpy as jnp
import pytest

import hetflow


@pytest.mark.parametrize("name,billions", [("llama-2-7b", 6.74), ("opt-30b", 29.97),
                                           ("mixtral-8x7b", 46.7), ("llama-1b", 1.10)])
def test_full_size_shapes(name, billions):
  model = hetflow.synthetic_model(name, dtype=jnp.bfloat16)
  params = sum(s.size for s in model.shapes.values())
  assert abs(params / 1e9 - billions) / billions < 0.01
  assert model.nbytes == 2 * params


@pytest.mark.parametrize("name", ["llama-2-7b", "opt-30b", "mixtral-8x7b"])
def test_full_size_forward_eval_shape(name):
  """The whole forward traces with abstract weights: nothing is allocated."""
  model = hetflow.synthetic_model(name, dtype=jnp.bfloat16)
  fn = model.functions
  abstract = {n: s for n, s in model.shapes.items()}
  from hetflow.models import unflatten
  tree = unflatten(abstract)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)

  def forward(params, ids):
    b, t = ids.shape
    positions = jnp.arange(t)[None]
    mask = jnp.ones((b, t), bool)
    x = fn.embed(params["embed"], ids, positions)
    layer = params["layers"]["0"]
    x, _ = fn.attention(layer["attn"], x, fn.new_cache(b, t), 0, positions, mask)
    x = fn.ffn(layer["mlp"], x)
    tokens = params["embed"]["tokens"] if model.config.tie_word_embeddings else None
    return fn.head(params.get("head", {}), tokens, x)

  out = jax.eval_shape(forward, tree, ids)
  assert out.shape == (1, 8, model.config.vocab_size)
