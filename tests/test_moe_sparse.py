"""Sparse experts (issue 14): mixtral-*-sparse models and the moe_sparse strategy, on tiny models,
in every weight format (issue 11). On a mesh: tests/test_mesh.py."""

import dataclasses

import numpy as np
import pytest

import hetflow
from hetflow import Budget, Engine, simulate
from hetflow.hardware import get_profile
from hetflow.memory import bundle_store
from hetflow.memory.budget import BudgetExceeded
from hetflow.memory.buffers import round_up
from hetflow.memory.store import StoreMismatchError
from hetflow.models import formats, native
from hetflow.sparsity import bundles, experts
from hetflow.strategy import NotApplicable
from hetflow.testing.neuron_cache import assert_cache_holds_its_records
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
    # Every read record admitted to the cold region (whose slots are then checked against
    # the store, as in every cached case below).
    dict(cache_bytes="256KiB", hot_fraction=0.0, admission="all", pipeline=False),
], ids=["whole-cache", "small-cache-audit", "no-cache", "lru", "cold-admit-all"])
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
  # The benchmark's sparse limit: the records computed, and every other weight a token
  # multiplies (attention, norms, routers, head; not the token table, not the experts).
  assert d.get("computed_bytes") >= d.get("read_neurons") * 3 * c.hidden_size * 4  # unpadded
  fixed = sum(a.size * a.dtype.itemsize for name, a in model.shapes.items()
              if name != "embed/tokens" and name.split("/")[-1] not in ("gate", "up", "down"))
  assert s.details["fixed_bytes_per_token"] == fixed
  if neurons.get("cache_bytes") == 0:
    assert d.get("read_neurons") == d.get("predicted") > 0  # no cache: every one is read
  else:
    cached = assert_cache_holds_its_records(engine.strategy._inner)
    assert cached > 0 or neurons.get("audit")  # 64 KiB holds no whole hot cluster
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
  with pytest.raises(ValueError, match="embed_tier='disk'"):
    MoESparseOptions(neurons=dict(embed_tier="disk"))


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


# -- weight formats -------------------------------------------------------------------------

ATOL = 1e-5  # float32 summation order (tests/test_neuron_formats.py's tolerance)


def _neuron_calls() -> int:
  return int(native._registered.hetflow_neuron_calls()) if native._registered else 0


@pytest.fixture(scope="module")
def formatted(model):
  """weights -> (model, resident's tokens, prompt logits, one-token logits), once per format."""
  made = {}
  ids = np.random.default_rng(1).integers(3, model.config.vocab_size, (2, 10))

  def get(weights):
    if weights not in made:
      m = hetflow.synthetic_model(NAME, weights=weights, **SPEC)
      with Engine(m, "resident") as engine:
        made[weights] = (m, engine.generate(ids, max_new_tokens=NEW_TOKENS,
                                            stop_tokens=()).tokens,
                         engine.forward(ids), engine.forward(ids[:, :1]))
    return (ids, *made[weights])

  return get


@pytest.mark.parametrize("kernels", ["native", "xla"])
@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int8-g32", "int4", "int4-asym"])
def test_formats_match_resident_of_the_same_format(weights, kernels, formatted, tmp_path,
                                                   monkeypatch):
  """Same weights, same tokens: the expert neurons' records hold resident's quantized values
  (neuron_cluster's codec), computed by the native record kernels or the XLA fallback;
  greedy tokens equal resident's, logits within float32 summation order."""
  if kernels == "native" and not native.enabled():
    pytest.skip("no C++ compiler: the native kernels are not built here")
  if kernels == "xla":
    if weights not in ("int8", "int4"):
      pytest.skip("the fallback's formulation is the same for every kind; int8 and int4"
                  " cover it")
    monkeypatch.setenv("HETFLOW_NATIVE", "0")
  ids, model, tokens, logits, first = formatted(weights)
  before = _neuron_calls()
  options = MoESparseOptions(neurons=dict(cache_bytes="64KiB", cluster_size=8,
                                          store_dir=str(tmp_path / "store")))
  with Engine(model, MoESparse(options)) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(ids), logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine.forward(ids[:, :1]), first, atol=ATOL, rtol=0)
    s = out.stats["strategy"]
    assert engine.strategy.store.weights == model.weights
    assert s.decode.disk_bytes > 0 and s.details["cache"]["hot_hits"] > 0
    # The plan counts the format's records and the fixed region's stored bytes.
    assert engine.placement.settings.inner.settings.sizes.record == (
        engine.strategy.store.record_nbytes)
  if kernels == "native":
    assert _neuron_calls() > before
  else:
    assert _neuron_calls() == before


def test_expert_records_hold_residents_values():
  """An expert's kernel in the experts' view is the model's stored kernel taken at that
  expert, and its records decode to exactly resident's (dequantized) rows."""
  model = hetflow.synthetic_model(NAME, weights="int4", **SPEC)
  c = model.config
  view = experts.ExpertNeurons(model)
  layer, e = 1, 5
  v = experts.virtual_layer(c, layer, e)
  stored = model.param(f"layers/{layer}/mlp/gate")
  mine = view.param(f"layers/{v}/mlp/gate")
  assert mine.keys() == stored.keys()
  for k in stored:
    np.testing.assert_array_equal(mine[k], stored[k][e])
    assert view.shapes[f"layers/{v}/mlp/gate/{k}"].shape == mine[k].shape
  assert view.logical_shapes[f"layers/{v}/mlp/gate"].shape == (c.hidden_size,
                                                               c.intermediate_size)
  codec = bundles.record_codec(view)
  a, b, table = codec.encode(view, v, bundles.neuron_matrices(view.config))
  gate = np.asarray(formats.dequantize(stored))[e]  # [D, F]
  down = np.asarray(formats.dequantize(model.param(f"layers/{layer}/mlp/down")))[e]  # [F, D]
  np.testing.assert_array_equal(np.asarray(codec.input_weights(a))[:, 0], gate.T)
  group_of = (np.arange(c.intermediate_size) // codec.group).astype(np.int32)
  f32 = {k: t.astype(np.float32) for k, t in table.items()}
  np.testing.assert_array_equal(np.asarray(codec.down_weights(b, f32, group_of)), down)


def test_store_of_another_format_is_refused(formatted, tmp_path):
  """The format is in the experts' store identity: an explicit store_dir of another format
  is refused (never reused, never deleted); each format has its own default store."""
  path = str(tmp_path / "store")
  ids, int4, *_ = formatted("int4")
  options = MoESparseOptions(neurons=dict(store_dir=path))
  with Engine(int4, MoESparse(options)) as engine:
    store = engine.strategy.store
    assert store.weights == "int4"
    order, mats, view = store.order, engine.strategy._inner.mats, engine.strategy.view
    default = bundle_store.default_store_dir(view, order, mats)
  for other in ("int8", "float32"):
    model = hetflow.synthetic_model(NAME, weights=other, **SPEC)
    with pytest.raises(StoreMismatchError, match="weights"):
      Engine(model, MoESparse(options))
    assert bundle_store.default_store_dir(experts.ExpertNeurons(model), order, mats) != default
  assert bundle_store.BundleStore.open(path).weights == "int4"  # still there, unchanged


def test_plan_counts_stored_bytes_and_refuses_shape_bits_on_a_format():
  """A quantized plan: the fixed region is the stored non-expert leaves (kernels in the
  format, routers and norms float) plus the down tables; records of the format's bytes."""
  f32 = hetflow.synthetic_model(NAME, **SPEC)
  int8 = hetflow.synthetic_model(NAME, weights="int8", **SPEC)
  plans = {m.weights: MoESparse(dict(kv_reserve_tokens=0)).plan(m, Budget()) for m in (f32, int8)}
  fixed = {w: p.settings.fixed_bytes for w, p in plans.items()}
  c = f32.config
  attn = sum(int8.group_nbytes(f"layers/{i}/attn") for i in range(c.num_layers))
  assert attn < sum(f32.group_nbytes(f"layers/{i}/attn") for i in range(c.num_layers))
  routers = c.num_layers * (c.hidden_size * c.num_experts + c.hidden_size) * 4
  rest = sum(int8.group_nbytes(g) for g in ("embed", "head"))
  assert fixed["int8"] == attn + rest + routers < fixed["float32"]
  inner = plans["int8"].settings.inner.settings.sizes
  codec = bundles.record_codec(experts.ExpertNeurons(int8))
  assert inner.record == round_up(codec.a_nbytes + codec.b_nbytes)
  with pytest.raises(NotApplicable, match="shape_weight_bits=4.*weights='int8'"):
    MoESparse(dict(shape_weight_bits=4)).plan(int8, Budget())
