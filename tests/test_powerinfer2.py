"""neuron_cluster's cost model (strategies/neuron_cluster/cost.py), the PowerInfer-2 shapes and the
planner with it: closed-form cache cases, orderings the paper's ablation implies, counts
against a real run of a tiny sparse model, and the planner's choice and refusals."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import hetflow
from hetflow import hardware, planner, simulate
from hetflow.memory.budget import BudgetExceeded
from hetflow.sparsity import cache_model
from hetflow.strategy import get_strategy
from strategies.neuron_cluster import cost

PHONE = hardware.PROFILES["oneplus12-ufs4"]
NC = get_strategy("neuron_cluster")
TRAINED = dict(predictor="trained", predictor_path="/nonexistent/predictor",
               kv_reserve_tokens=512)


def _decode_tok_s(model, budget_gb, **options):
  placement = NC(dict(TRAINED, **options)).plan(model, hetflow.Budget(device=int(budget_gb * 1e9)),
                                                PHONE)
  return simulate.predict(model, placement, PHONE, 1, 64, 64).decode_tokens_per_s


# -- the cache model --------------------------------------------------------------


def test_cache_extremes_and_coalescing():
  freq = np.full((2, 64), 0.5)
  none = cache_model.estimate_cache(freq, 0)
  assert none.hit_rate == 0 and np.allclose(none.misses, 32)
  full = cache_model.estimate_cache(freq, 128)
  assert full.hit_rate == 1 and full.misses.sum() == 0 and math.isinf(full.cold_horizon)
  # Every record missing every token: one coalesced request per layer.
  ones = cache_model.estimate_cache(np.ones((3, 16)), 0)
  assert np.allclose(ones.requests, 1)
  assert np.allclose(cache_model.estimate_cache(np.ones((3, 16)), 0, coalesce=False).requests, 16)
  # Independent misses at p: runs = n p (1 - p) + p (the first record starts one).
  half = cache_model.estimate_cache(np.full((1, 100), 0.5), 0)
  assert half.requests[0] == pytest.approx(100 * 0.25 + 0.25)


def test_hot_region_takes_the_hottest_clusters_and_cold_lru_follows_che():
  p = np.sort(np.random.default_rng(0).uniform(0, 0.2, (1, 256)))[:, ::-1]
  est = cache_model.estimate_cache(p, 64, hot_fraction=0.5, cluster_size=32)
  assert est.hot_hits[0] == pytest.approx(p[0, :32].sum())
  # A cold region smaller than one token's misses is flushed before the layer comes back.
  small = cache_model.estimate_cache(p, 34, hot_fraction=0.95, cluster_size=32)
  assert small.cold_hits.sum() == 0 and small.cold_horizon == 0
  # More cold slots: more hits; a cold start (few tokens) hits less than steady state.
  more = cache_model.estimate_cache(p, 160, hot_fraction=0.2, cluster_size=32)
  assert more.hit_rate > est.hit_rate
  assert cache_model.estimate_cache(p, 160, 0.2, 32, tokens=3).hit_rate < more.hit_rate


def test_frequency_admission_keeps_the_hottest_cold_neurons():
  p = np.sort(np.random.default_rng(0).uniform(0, 0.3, (2, 128)))[:, ::-1]
  est = cache_model.estimate_cache(p, 96, hot_fraction=1 / 3, cluster_size=32, admission="frequency")
  # 32 hot slots: layer 0's hottest cluster; 64 cold slots: the next 64 hottest neurons.
  rest = np.sort(np.concatenate([p[0, 32:], p[1]]))[::-1]
  assert est.hot_hits.sum() == pytest.approx(p[0, :32].sum())
  assert est.cold_hits.sum() == pytest.approx(rest[:64].sum())
  # From a cold start they have to earn their place first.
  assert cache_model.estimate_cache(p, 96, 1 / 3, 32, tokens=4,
                             admission="frequency").cold_hits.sum() < est.cold_hits.sum()


def test_moe_law_routes_k_of_x_experts():
  model = hetflow.synthetic_model("turbosparse-mixtral-47b", dtype=jnp.float16)
  freq = cache_model.layer_frequencies(model)
  assert freq.shape == (32, 8 * 14336)
  # 85% sparsity per expert, 2 of 8 experts: ~96% of the layer's neurons idle.
  assert freq.mean() == pytest.approx(0.15 * 2 / 8, rel=1e-3)


# -- predictions on the phone -------------------------------------------------------


def test_registered_and_faster_with_more_memory():
  assert get_strategy("neuron_cluster").cost_model is not None
  model = hetflow.synthetic_model("turbosparse-mistral-7b", dtype=jnp.float16)
  speeds = [_decode_tok_s(model, gb) for gb in (5, 8, 12, 16)]
  assert speeds == sorted(speeds) and speeds[-1] > 2 * speeds[0]


def test_ablation_order():
  """Each PowerInfer-2 mechanism helps: bundling, then the cache, then the pipeline."""
  model = hetflow.synthetic_model("bamboo-7b", dtype=jnp.float16)
  stages = [dict(layout="split", coalesce=False, cache_bytes=0, pipeline=False),
            dict(layout="bundled", cache_bytes=0, pipeline=False),
            dict(layout="bundled", cache_bytes=None, pipeline=False),
            dict(layout="bundled", cache_bytes=None, pipeline=True)]
  speeds = [_decode_tok_s(model, 8.85, **s) for s in stages]
  assert all(b > a for a, b in zip(speeds, speeds[1:])), speeds


def test_mixtral_predicted_from_shapes_only():
  model = hetflow.synthetic_model("turbosparse-mixtral-47b", dtype=jnp.float16)
  with pytest.raises(ValueError, match="MoE"):
    NC(TRAINED).plan(model, hetflow.Budget(device=int(19e9)), PHONE)
  placement = cost.shape_placement(model, hetflow.Budget(device=int(19e9)), NC.Options(**TRAINED))
  assert "planned from shapes" in placement.notes[0]
  pred = simulate.predict(model, placement, PHONE, 1, 64, 64)
  assert 0 < pred.decode_tokens_per_s < 100 and pred.bottleneck == "disk"
  with pytest.raises(BudgetExceeded):
    cost.shape_placement(model, hetflow.Budget(device=int(2e9)), NC.Options(**TRAINED))


# -- counts against a real run --------------------------------------------------------


@pytest.mark.parametrize("cache", [0, None])
def test_counts_match_a_real_run(cache, tmp_path, monkeypatch):
  """Bytes and requests per token, and hit rate, from a cold start on llama-tiny-sparse
  (the prompt warming the cache, as the prefill's admission does)."""
  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path))
  model = hetflow.synthetic_model("llama-tiny-sparse", sparsity=0.8, hotness="zipf:1.1")
  # The cost model does not model the look-ahead's guesses (reads on top of the misses).
  options = dict(cache_bytes=cache, kv_reserve_tokens=85, staging_bytes="256KiB",
                 calibration_tokens=512, hot_fraction=0.25, lookahead=False)
  ids = np.random.default_rng(1).integers(3, 512, (1, 8))
  with hetflow.Engine(model, "neuron_cluster", hetflow.Budget(device="3MB"),
                      options=options) as engine:
    st = engine.generate(ids, max_new_tokens=17, stop_tokens=()).stats["strategy"].details
    counts = cost.decode_counts(model, engine.placement, tokens=st["decode_tokens"],
                                freq=engine.strategy.frequency, prompt_tokens=ids.shape[1])
  c, cfg = st["cache"], model.config
  active = st["predicted_density"] * cfg.num_layers * cfg.intermediate_size  # per token
  assert counts.predicted == pytest.approx(active, rel=0.3)
  hits = (c["hot_hits"] + c["cold_hits"]) / st["decode_tokens"]
  assert counts.cache.hit_rate == pytest.approx(hits / active, abs=0.15)
  if cache == 0:  # every active neuron is read: bytes follow the active count
    assert counts.disk_bytes == pytest.approx(st["disk_bytes_per_token"], rel=0.3)
    assert counts.requests == pytest.approx(st["requests_per_token"], rel=0.4)


# -- the planner ------------------------------------------------------------------------


def test_planner_picks_neuron_cluster_for_a_sparse_model_on_a_phone():
  model = hetflow.synthetic_model("llama-1b-sparse", sparsity=0.9, hotness="zipf:1.1")
  ranked = planner.plan(model, hetflow.Budget(device="1.5GiB", host="0"), PHONE,
                        prompt_len=16, new_tokens=16)
  assert ranked[0].strategy == "neuron_cluster" and ranked[0].feasible
  layerwise = next(r for r in ranked if r.strategy == "layerwise" and r.feasible)
  assert ranked[0].prediction.decode_tokens_per_s > 2 * layerwise.prediction.decode_tokens_per_s


def test_planner_refuses_neuron_cluster_for_a_dense_model():
  model = hetflow.synthetic_model("llama-1b")
  ranked = planner.plan(model, hetflow.Budget(device="2GiB"), PHONE)
  refused = [r for r in ranked if r.strategy == "neuron_cluster"]
  assert refused and all(not r.feasible for r in refused)
  assert all(r.reason.startswith("not applicable") and "no exact zeros" in r.reason
             for r in refused)
  with pytest.raises(ValueError, match="no exact zeros"):
    NC().plan(model, hetflow.Budget(device="2GiB"), PHONE)
