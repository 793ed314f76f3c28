"""Sparse experts (issue 14): mixtral-*-sparse models and the moe_sparse strategy, on tiny models."""

import dataclasses

import numpy as np
import pytest

import hetflow
from hetflow import Budget, Engine, simulate
from hetflow.hardware import get_profile
from hetflow.memory.budget import BudgetExceeded
from hetflow.memory.buffers import round_up
from hetflow.sparsity import experts
from hetflow.strategy import NotApplicable
from strategies.moe_offload import MoEOffload
from strategies.moe_sparse import MoESparse, MoESparseOptions

NAME = "mixtral-tiny-8e-sparse"
SPEC = dict(sparsity=0.85, hotness="zipf:1.1", popularity="zipf:0.5", reuse=0.45,
            calibration_tokens=4096)
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model(cache_dir):
  return hetflow.synthetic_model(NAME, **SPEC)


def test_measured_expert_sparsity_lands_within_10_percent_of_the_target(model):
  """Per layer, the density of the routed experts' neurons on fresh 256-token sequences
  (the calibrated positions) within 10% (relative) of 1 - sparsity; hot neurons fire more."""
  c = model.config
  ids = np.random.default_rng(123).integers(3, c.vocab_size, (8, 256))
  acts = experts.record_expert_activations(model, ids)
  counts = acts.stats.counts.reshape(c.num_layers, c.num_experts, -1)
  density = counts.sum((1, 2)) / (acts.routed.sum(1) * c.intermediate_size)
  target = 1 - SPEC["sparsity"]
  assert np.all(np.abs(density / target - 1) <= 0.10), density
  assert acts.routed.sum(1).tolist() == [ids.size * c.experts_per_token] * c.num_layers
  # The hotness law: the hottest tenth of each expert's neurons (by target) fire more
  # often than the coldest half.
  for layer in range(c.num_layers):
    for e in range(c.num_experts):
      p = model.source.target_expert_frequencies(layer, e)
      order = np.argsort(-p)
      f = counts[layer, e] / max(acts.routed[layer, e], 1)
      hot, cold = f[order[:len(p) // 10]].mean(), f[order[len(p) // 2:]].mean()
      assert hot > 3 * cold, (layer, e, hot, cold)


def test_sparse_moe_names_and_bad_arguments(model):
  c = model.config
  assert (c.arch, c.hidden_act, c.num_experts, c.experts_per_token) == ("mixtral", "drelu", 8, 2)
  big = hetflow.synthetic_model("mixtral-1b-sparse")  # shapes only: nothing calibrated
  assert big.config.num_experts == 8 and big.config.hidden_act == "drelu"
  assert big.source.sparsity.sparsity == 0.85 and big.source.spec.reuse == 0.45
  assert hetflow.synthetic_model("llama-tiny-sparse").config.arch == "llama"
  with pytest.raises(TypeError, match="unexpected arguments.*colour"):
    hetflow.synthetic_model(NAME, colour="red")
  with pytest.raises(ValueError, match="sparsity must be in"):
    hetflow.synthetic_model(NAME, sparsity=1.5)


@pytest.fixture(scope="module")
def reference(model):
  ids = np.random.default_rng(1).integers(3, model.config.vocab_size, (2, 10))
  engine = Engine(model, "resident")
  out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
  return ids, out.tokens, engine.forward(ids)


@pytest.mark.parametrize("neurons", [
    dict(),
    dict(cache_bytes="64KiB", audit=True),
    dict(cache_bytes=0, pipeline=False),
    dict(cache_bytes="128KiB", hot_policy="lru", admission="all"),
], ids=["whole-cache", "small-cache-audit", "no-cache", "lru"])
def test_tokens_equal_resident(model, reference, neurons, tmp_path):
  """Oracle predictor: exact. A neuron not cached is read, never skipped."""
  ids, tokens, logits = reference
  options = MoESparseOptions(neurons=dict(neurons, store_dir=str(tmp_path / "store")))
  with Engine(model, MoESparse(options)) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(ids), logits, atol=1e-5, rtol=0)
    s = engine.strategy.stats()
  c = model.config
  d = s.decode
  # Only routed experts run: at most rows * k per layer and token.
  assert 0 < s.details["decode_experts_per_token"] <= len(ids) * c.experts_per_token * c.num_layers
  assert s.reads.bytes == s.prefill.disk_bytes + d.disk_bytes  # the reader's own record
  # What decode reads is the predicted neurons of routed experts that were not cached:
  # whole records (4 KiB-padded on this tiny shape), nothing else.
  record = round_up(3 * c.hidden_size * 4)
  assert d.disk_bytes == d.get("read_neurons") * record
  assert d.get("read_neurons") <= d.get("predicted")
  if neurons.get("cache_bytes") == 0:
    assert d.get("read_neurons") == d.get("predicted") > 0  # no cache: every one is read
  if neurons.get("audit"):
    assert s.details["recall"] == 1.0 and s.details["uncomputed_neurons_per_token"] == 0
    # Only the routed experts' active neurons not in the cache are read.
    assert s.details["disk_bytes_per_token"] == pytest.approx(
        s.details["ideal_bytes_per_token"] * s.details["read_amplification"])
    assert s.details["false_positive_bytes_per_token"] == 0


def test_refuses_dense_experts_and_dense_models():
  with pytest.raises(NotApplicable, match="no exact zeros"):
    MoESparse().plan(hetflow.synthetic_model("mixtral-tiny"), Budget())
  with pytest.raises(NotApplicable, match="no routed experts"):
    MoESparse().plan(hetflow.synthetic_model("llama-tiny-sparse"), Budget())
  with pytest.raises(ValueError, match="lookahead"):
    MoESparseOptions(neurons=dict(lookahead=True))
  with pytest.raises(ValueError, match="neurons="):
    MoESparseOptions(neurons=3)


def test_ledger_within_budget_and_minimum_when_too_small(model, reference, tmp_path):
  ids, tokens, _ = reference
  options = MoESparseOptions(kv_reserve_tokens=32,
                             neurons=dict(cache_bytes=0, store_dir=str(tmp_path / "store")))
  with pytest.raises(BudgetExceeded) as e:
    MoESparse(options).plan(model, Budget(device=model.nbytes // 50))
  minimum = e.value.minimum
  assert model.nbytes // 50 < minimum < model.nbytes
  options = dataclasses.replace(options, neurons=dataclasses.replace(options.neurons,
                                                                     cache_bytes=None))
  budget = Budget(device=minimum + (64 << 10))  # what is left: a 64 KiB neuron cache
  with Engine(model, MoESparse(options), budget=budget) as engine:
    assert engine.placement.settings.inner.settings.cache_slots == 16
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    assert engine.ledger.peak("device") <= budget.device
    assert out.stats["strategy"].decode.disk_bytes > 0


def test_cost_model_predicts_sparse_experts_above_whole_experts():
  """PowerInfer-2's phone at 19 GB: sparse experts read a fraction of whole experts' bytes
  (predicted 2026-11-30: 0.35 tok/s against 0.12; both disk-bound)."""
  model = hetflow.synthetic_model("turbosparse-mixtral-47b", dtype=np.float16)
  profile = get_profile("oneplus12-ufs4")
  budget = Budget(device=int(19e9))
  sparse = MoESparse(dict(kv_reserve_tokens=128, neurons=dict(
      predictor="trained", predictor_path="/nonexistent/predictor"))).plan(model, budget, profile)
  whole = MoEOffload(dict(kv_reserve_tokens=128)).plan(model, budget, profile)
  fast = simulate.predict(model, sparse, profile, 1, 64, 16)
  slow = simulate.predict(model, whole, profile, 1, 64, 16)
  assert np.isfinite(fast.decode_tokens_per_s)
  assert fast.decode_tokens_per_s > 2 * slow.decode_tokens_per_s
  assert fast.bottleneck == slow.bottleneck == "disk"
