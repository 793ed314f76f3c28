"""moe_sparse with trained per-expert predictors (issue 14), on a tiny sparse MoE.

The predictors come from the users' entry point (`experiments.train_predictor` ->
`train_from_config` on configs/sparse/mixtral_tiny.py), as neuron_cluster's do
(tests/test_neuron_cluster.py). A trained predictor is lossy: what these tests hold it
to is its recall on decode steps it never saw, that a neuron it misses is left out of
the sum and nothing else (every output is the dense computation over exactly the
neurons computed), and the greedy tokens' agreement with resident's.
"""

import importlib.util
import os

import numpy as np
import pytest

import hetflow
from hetflow import Engine
from hetflow.memory.buffers import round_up
from hetflow.sparsity import experts
from strategies.moe_sparse import MoESparse, MoESparseOptions
from strategies.neuron_cluster.strategy import NeuronCluster

NEW_TOKENS = 16


def _config():
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "sparse", "mixtral_tiny.py")
  spec = importlib.util.spec_from_file_location("sparse_mixtral_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
  """(model, what train_from_config returned, the config): trained once per module."""
  from hetflow.bench.train_predictor import train_from_config

  config = _config()
  model = hetflow.config.build_model(config.model)
  return model, train_from_config(config, str(tmp_path_factory.mktemp("pred"))), config


@pytest.fixture(scope="module")
def reference(trained):
  model = trained[0]
  ids = np.random.default_rng(1).integers(3, model.config.vocab_size, (2, 10))
  with Engine(model, "resident") as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
  return ids, out.tokens


def _options(trained, tmp_path, **neurons):
  _, t, _ = trained
  return MoESparseOptions(neurons=dict(dict(
      predictor="trained", predictor_path=t["predictor_path"], stats_path=t["stats_path"],
      store_dir=str(tmp_path / "store")), **neurons))


def test_recall_on_held_out_decode_steps(trained, reference, tmp_path):
  """One predictor per expert; on the decode steps of the test quarter's generations (used
  neither to train nor to set thresholds) and on this test's own prompts (audited at run
  time), the experts' recall is near the 0.99 target at a predicted density well below 1."""
  model, t, config = trained
  c = model.config
  assert config.model.name == c.name and config.train.method == "svd"
  reports = t["test_reports"]
  assert len(reports) == c.num_layers * c.num_experts  # one per expert (virtual layer)
  # An expert no test-quarter token was routed to has nothing to report (NaN densities).
  seen = [r for r in reports if np.isfinite(r["true_density"])]
  assert len(seen) >= len(reports) - 2
  recall = np.array([r["recall"] for r in seen])
  # Each expert's test rows are ~k/X of the quarter's tokens (~64 here), from 16
  # generations: one expert's figure is noisy, the mean over experts is not.
  assert recall.mean() > 0.97 and recall.min() > 0.9, recall
  assert max(r["predicted_density"] for r in seen) < 0.6
  # Decode steps fire more than the calibrated positions: the thresholds were set there.
  assert np.mean([r["true_density"] for r in seen]) > 1 - model.source.sparsity.sparsity

  ids, tokens = reference
  with Engine(model, MoESparse(_options(trained, tmp_path, cache_bytes="32KiB",
                                        audit=True))) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
  s = out.stats["strategy"].details
  print(f"test-quarter recall per expert {np.round(recall, 3)}; on this test's decode"
        f" steps recall {s['recall']:.4f} precision {s['precision']:.3f}, token agreement"
        f" {float((out.tokens == tokens).mean()):.2f}")
  assert s["recall"] > 0.97 and s["computed_recall"] >= s["recall"]
  assert s["useful_bytes_per_token"] <= s["ideal_bytes_per_token"]
  assert 0 < s["predicted_density"] < 0.6


@pytest.mark.parametrize("neurons", [
    dict(cache_bytes=0),
    dict(cache_bytes="32KiB"),
    dict(cache_bytes="32KiB", pipeline=False, feedback=False),
    dict(cache_bytes="32KiB", pipeline=False, staging_bytes="32KiB"),
], ids=["no-cache", "cache", "serial-no-feedback", "serial-rounds"])
def test_misses_cost_reads_never_correctness(trained, reference, neurons, tmp_path,
                                             monkeypatch):
  """Every expert output in decode is exactly the dense FFN over the neurons the strategy
  computed (predicted ones read or cached, and whole cached blocks): a neuron the predictor
  missed is left out, nothing is half-read, stale or counted twice. Misses happen (the
  audit's uncomputed neurons), and what decode reads is predicted neurons' records only."""
  model, _, _ = trained
  c = model.config
  ids, _ = reference
  calls, current = [], []
  partial, compute, gathered = (NeuronCluster.ffn_partial, NeuronCluster._compute,
                                NeuronCluster._gathered)

  def record_run(self, layer, params, x):
    current.clear()
    out = partial(self, layer, params, x)
    if self._phase == "decode":
      calls.append((layer, np.asarray(x), np.asarray(out), list(current)))
    return out

  def record_compute(self, kind, which, start, size, valid, layer, positions, h, params,
                     recency=None):
    current.append(np.asarray(positions)[np.asarray(valid, bool)])
    return compute(self, kind, which, start, size, valid, layer, positions, h, params, recency)

  def record_gathered(self, kind, slots, layer, h):
    current.append(self._slot_pos[np.asarray(slots)])
    return gathered(self, kind, slots, layer, h)

  monkeypatch.setattr(NeuronCluster, "ffn_partial", record_run)
  monkeypatch.setattr(NeuronCluster, "_compute", record_compute)
  monkeypatch.setattr(NeuronCluster, "_gathered", record_gathered)
  with Engine(model, MoESparse(_options(trained, tmp_path, audit=True, **neurons))) as engine:
    engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    s = engine.strategy.stats()
    order = engine.strategy._inner.activation_stats.hot_order()  # store position -> neuron
  d = s.decode
  assert s.details["uncomputed_neurons_per_token"] > 0  # the predictor did miss neurons
  record = round_up(3 * c.hidden_size * 4)
  assert d.disk_bytes == d.get("read_neurons") * record
  assert 0 < d.get("read_neurons") <= d.get("predicted")
  if neurons["cache_bytes"] == 0:
    assert d.get("read_neurons") == d.get("predicted")

  view = experts.ExpertNeurons(model)
  assert len(calls) == d.get("experts_run") > 0
  for v, x, out, parts in calls:
    positions = np.concatenate(parts)
    assert len(np.unique(positions)) == len(positions), v  # none computed twice
    w = {m: view.tensor(f"layers/{v}/mlp/{m}") for m in ("norm", "gate", "up", "down")}
    keep = np.zeros(c.intermediate_size, bool)
    keep[order[v][positions]] = True
    flat = x.reshape(-1, c.hidden_size).astype(np.float64)
    h = flat / np.sqrt((flat ** 2).mean(-1, keepdims=True) + c.norm_eps) * w["norm"]
    act = np.maximum(h @ w["gate"], 0) * np.maximum(h @ w["up"], 0)  # dReLU
    want = (act * keep) @ w["down"]  # an expert's FFN output, before the mixture
    np.testing.assert_allclose(out.reshape(want.shape), want, atol=1e-5, rtol=0,
                               err_msg=f"virtual layer {v}")


def test_greedy_tokens_agree_with_resident(trained, reference, tmp_path):
  """The lossy path's tokens against resident's greedy ones (2 rows x 16 tokens): the
  oracle gives them exactly; the trained predictors (recall ~0.98) agree on at least 90%
  of positions (1.0 measured 2026-11-30: a missed neuron adds little to a routed expert's
  output), and feeding the predictor's error back never costs more than 0.1 of agreement
  (neuron_cluster's rule, tests/test_neuron_cluster.py)."""
  model, _, _ = trained
  ids, tokens = reference
  got = {}
  for name, neurons in (("oracle", dict(predictor="oracle", predictor_path=None)),
                        ("plain", dict(feedback=False)), ("feedback", dict(feedback=True))):
    with Engine(model, MoESparse(_options(trained, tmp_path, cache_bytes="32KiB",
                                          **neurons))) as engine:
      out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    got[name] = float((out.tokens == tokens).mean())
  print(f"token agreement with resident: {got}")
  assert got["oracle"] == 1.0
  assert got["feedback"] >= got["plain"] - 0.1
  assert min(got["plain"], got["feedback"]) >= 0.9
