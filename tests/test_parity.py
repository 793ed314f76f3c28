"""Parity with HF transformers on tiny random models saved with save_pretrained.

Tolerances are fixed (max abs error <= 1e-4 on logits of order one): never
loosen them to make a test pass.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

import hetflow  # noqa: E402
from hetflow.models import forward_reference  # noqa: E402
from hetflow.testing import HF_TINY_CONFIGS, save_tiny_hf  # noqa: E402

ATOL = 1e-4
VARIANTS = sorted(HF_TINY_CONFIGS)


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param) / "hf"
  hf = save_tiny_hf(request.param, str(directory))
  return request.param, hf, hetflow.load_model(str(directory))


def _ids(batch=2, length=11, vocab=128, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def test_logits_end_to_end(pair):
  _, hf, model = pair
  ids = _ids()
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  assert np.abs(want).max() > 0.5  # logits of order one, so 1e-4 means something
  got = np.asarray(forward_reference(model, ids))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_each_block_matches(pair):
  """Hidden states after every decoder block equal HF's."""
  _, hf, model = pair
  ids = _ids(batch=1)
  with torch.no_grad():
    hidden = hf(torch.tensor(ids), output_hidden_states=True).hidden_states
  fn, params = model.functions, model.params()
  mask = jnp.ones(ids.shape, bool)
  positions = jnp.arange(ids.shape[1])[None]
  x = fn.embed(params["embed"], jnp.asarray(ids), positions)
  np.testing.assert_allclose(np.asarray(x), hidden[0].numpy(), atol=ATOL, rtol=0)
  for i in range(model.config.num_layers - 1):  # HF's last entry is after the final norm
    layer = params["layers"][str(i)]
    x, _ = fn.attention(layer["attn"], x, fn.new_cache(1, ids.shape[1]), 0, positions, mask)
    x = fn.ffn(layer["mlp"], x)
    np.testing.assert_allclose(np.asarray(x), hidden[i + 1].numpy(), atol=ATOL, rtol=0)


def test_prefill_plus_decode_equals_full_forward(pair):
  _, _, model = pair
  ids = _ids(batch=2, length=10)
  full = np.asarray(forward_reference(model, ids))
  engine = hetflow.Engine(model)
  cfg, fn = model.config, model.functions
  # Drive the engine's loop by hand: prefill 6 tokens, then 4 single-token steps.
  caches = [fn.new_cache(2, 10) for _ in range(cfg.num_layers)]
  mask = jnp.ones((2, 10), bool)
  logits = [engine._run("prefill", jnp.asarray(ids[:, :6]), jnp.tile(jnp.arange(6), (2, 1)),
                        caches, 0, mask, last_only=False)]
  for t in range(6, 10):
    logits.append(engine._run("decode", jnp.asarray(ids[:, t:t + 1]), jnp.full((2, 1), t),
                              caches, t, mask, last_only=False))
  np.testing.assert_allclose(np.concatenate([np.asarray(part) for part in logits], 1), full,
                             atol=ATOL, rtol=0)


def test_greedy_generation_equals_transformers(pair):
  name, hf, model = pair
  ids = _ids(batch=1, length=7, seed=1)
  with torch.no_grad():
    want = hf.generate(torch.tensor(ids), max_new_tokens=12, do_sample=False,
                       eos_token_id=None, pad_token_id=0, min_new_tokens=12)[0, 7:].numpy()
  got = hetflow.Engine(model).generate(ids, max_new_tokens=12, stop_tokens=()).tokens[0]
  np.testing.assert_array_equal(got, want, err_msg=name)


def test_padded_batch_generation_equals_unpadded(pair):
  """Left padding changes nothing: each prompt generates as it would alone."""
  _, _, model = pair
  engine = hetflow.Engine(model)
  prompts = [[5, 9, 13, 2, 7, 1, 30], [11, 4, 8]]
  batch = engine.generate(prompts, max_new_tokens=6, stop_tokens=()).tokens
  for row, prompt in zip(batch, prompts):
    alone = engine.generate([prompt], max_new_tokens=6, stop_tokens=()).tokens[0]
    np.testing.assert_array_equal(row, alone)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load(tmp_path, dtype):
  """bf16/fp16 stored checkpoints load, and compute in float32 by default."""
  import transformers

  save_tiny_hf("llama-gqa", str(tmp_path / "hf"), dtype=getattr(torch, dtype))
  model = hetflow.load_model(str(tmp_path / "hf"))
  # HF's own float32 load of the same file (a .float() of the half model would
  # keep its RoPE buffer rounded to half precision).
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                         dtype=torch.float32)
  ids = _ids(batch=1)
  with torch.no_grad():
    want = hf(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(forward_reference(model, ids)), want, atol=ATOL, rtol=0)
  assert model.tensor("layers/0/mlp/up").dtype == np.float32
  bf16 = hetflow.load_model(str(tmp_path / "hf"), dtype=jnp.bfloat16)
  assert bf16.tensor("layers/0/mlp/up").dtype == jnp.bfloat16
