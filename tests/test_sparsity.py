"""Tests for hetflow.sparsity and the synthetic sparse models (tiny shapes only)."""

import os

import numpy as np
import pytest

import hetflow
from hetflow.bench.audit import GUESS_SOURCES, guess_quality, reference_tokens
from hetflow.checkpoints import sparse
from hetflow.memory import ReaderPool, aligned_empty, bundle_store
from hetflow.sparsity import bundles, predictor, stats
from hetflow.sparsity.cache import SegmentedCache

NAMES = ("llama-tiny-sparse", "opt-tiny-sparse")


@pytest.fixture(scope="module", params=NAMES)
def recorded(request):
  model = hetflow.synthetic_model(request.param, sparsity=0.9, hotness="zipf:1.1", seed=0)
  ids = stats.calibration_ids(model.config, 1024, seed=3)
  s, samples = stats.record_activations(model, ids, samples=True)
  return model, s, samples


def test_zipf_frequencies_mean_and_order():
  p = sparse.zipf_frequencies(1000, 0.1, 1.1, 0.95)
  assert abs(p.mean() - 0.1) < 1e-6
  assert np.all(np.diff(p) <= 0) and p.max() <= 0.95
  assert np.allclose(sparse.zipf_frequencies(10, 0.3, 0.0, 0.95), 0.3)


def test_sparse_names_and_errors():
  assert hetflow.synthetic_model("llama-tiny-sparse").config.hidden_act == "drelu"
  assert hetflow.synthetic_model("opt-tiny-sparse").config.hidden_act == "relu"
  # Mixtral shapes are sparse MoE models now (issue 14, tests/test_moe_sparse.py).
  assert hetflow.synthetic_model("mixtral-tiny-sparse").config.hidden_act == "drelu"
  with pytest.raises(ValueError, match="unknown sparse synthetic model"):
    hetflow.synthetic_model("nosuch-tiny-sparse")
  with pytest.raises(ValueError):
    hetflow.synthetic_model("llama-tiny-sparse", hotness="pareto")
  with pytest.raises(TypeError):
    hetflow.synthetic_model("llama-tiny", sparsity=0.5)


def test_measured_sparsity_and_hotness_follow_the_target(recorded):
  model, s, samples = recorded
  # Held-out prompts (not the calibration ones): sparsity near the target,
  # per-neuron frequency following the law, and the zeros are exact.
  assert np.all(np.abs(s.density - 0.1) < 0.05), s.density
  for layer in range(model.config.num_layers):
    target = model.source.target_frequencies(layer)
    assert np.corrcoef(s.frequency[layer], target)[0, 1] > 0.6
  top = np.sort(s.frequency[0])[::-1]
  assert top[:19].sum() > top[-96:].sum()  # skewed: top 10% fire more than bottom half


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_hits_the_target_density(name):
  """Per-layer density within 10% (relative) of the target, over 32 held-out prompts."""
  model = hetflow.synthetic_model(name, sparsity=0.9, hotness="zipf:1.1", seed=0)
  ids = np.concatenate([stats.calibration_ids(model.config, 1024, seed=s) for s in (3, 4, 5, 6)])
  s, _ = stats.record_activations(model, ids)
  assert np.all(np.abs(s.density - 0.1) <= 0.01), s.density


def test_silu_models_are_refused_without_threshold():
  model = hetflow.synthetic_model("llama-tiny")
  with pytest.raises(ValueError, match="no exact zeros"):
    stats.check_sparse(model.config)
  assert stats.check_sparse(model.config, 0.01) == 0.01


def test_stats_save_load(tmp_path, recorded):
  _, s, _ = recorded
  path = os.path.join(tmp_path, "stats.npz")
  s.save(path)
  t = stats.ActivationStats.load(path)
  assert t.tokens == s.tokens and np.array_equal(t.counts, s.counts)
  assert np.array_equal(t.hot_order(), s.hot_order())


def test_coactivation_counts():
  model = hetflow.synthetic_model("opt-tiny-sparse")
  ids = stats.calibration_ids(model.config, 128)
  s, _ = stats.record_activations(model, ids, coactivation=True)
  co = s.coactivation[0]
  assert np.array_equal(np.diag(co), s.counts[0]) and np.array_equal(co, co.T)


def test_predictor_trains_reports_and_round_trips(tmp_path, recorded):
  model, _, samples = recorded
  options = predictor.TrainOptions(ranks=(16, 32), steps=300, target_recall=0.95)
  p = predictor.train_predictors(samples, options, progress=None)
  assert len(p.reports) == model.config.num_layers
  for r in p.reports:
    assert r.recall >= 0.9  # held-out recall near the target
    assert r.predicted_density < 0.6  # and far from predicting everything
  p.save(os.path.join(tmp_path, "pred"))
  q = predictor.LowRankPredictor.load(os.path.join(tmp_path, "pred"))
  p.place(None)
  q.place(None)
  x = samples.inputs[1][:8][None]
  assert np.array_equal(np.asarray(p.predict(1, x)), np.asarray(q.predict(1, x)))


def test_svd_and_exact_gate_predictors():
  """Weight-derived predictors: the exact gate misses nothing, its SVD is close."""
  model = hetflow.synthetic_model("llama-tiny-sparse", sparsity=0.9, hotness="zipf:1.1", seed=0)
  ids = stats.calibration_ids(model.config, 1024, seed=3)
  _, samples = stats.record_activations(model, ids, samples=True)
  exact = {i: predictor.exact_gate_params(model.config, model.group_tensors(f"layers/{i}/mlp"))
           for i in range(model.config.num_layers)}
  options = predictor.TrainOptions(ranks=(8, 16), method="svd", target_recall=0.99,
                                   exact_layers=(0,))
  p = predictor.train_predictors(samples, options, progress=None, exact=exact)
  assert p.ranks[0] == 0 and p.reports[0].recall == 1.0  # exact: gate > 0 is necessary
  for r in p.reports[1:]:
    assert r.recall >= 0.98 and r.predicted_density < 0.35
  with pytest.raises(ValueError, match="dReLU"):
    opt = hetflow.synthetic_model("opt-tiny-sparse")
    predictor.exact_gate_params(opt.config, opt.group_tensors("layers/0/mlp"))


def test_guess_quality_from_earlier_residuals():
  """The look-ahead audit: from the FFN's own input the exact gate predictor misses nothing
  (gate > 0 is necessary for dReLU to fire); from earlier residuals it is only a guess."""
  model = hetflow.synthetic_model("llama-tiny-sparse", sparsity=0.9, hotness="zipf:1.1", seed=0)
  c = model.config
  exact = predictor.LowRankPredictor(
      [predictor.exact_gate_params(c, model.group_tensors(f"layers/{i}/mlp"))
       for i in range(c.num_layers)], thresholds=[0.0] * c.num_layers)
  exact.place(None)
  reference = reference_tokens(model, prompts=2, prompt_tokens=8, new_tokens=6)
  got = guess_quality(model, exact, reference, prompt_tokens=8)
  assert np.all(got["ffn_input"]["recall"] == 1.0)
  assert np.all((got["ffn_input"]["precision"] > 0) & (got["ffn_input"]["precision"] <= 1))
  assert np.isnan(got["previous_ffn_input"]["recall"][0])  # layer 0 has no block before
  for k in GUESS_SOURCES:
    rates = np.concatenate([got[k]["recall"][1:], got[k]["precision"][1:]])
    assert np.all((rates >= 0) & (rates <= 1)), k
  # Earlier residuals are guesses: somewhere they miss what the FFN's input would not.
  assert got["block_input"]["recall"].min() < 1.0
  assert np.all(got["true_per_token"] > 0) and len(got["true_per_token"]) == c.num_layers


def test_bundle_store_layouts(tmp_path):
  model = hetflow.synthetic_model("llama-tiny-sparse")
  f, d = model.config.intermediate_size, model.config.hidden_size
  order = np.stack([np.random.default_rng(i).permutation(f) for i in range(3)])
  reader = ReaderPool(4)
  gate, up, down = (model.tensor(f"layers/1/mlp/{m}") for m in ("gate", "up", "down"))
  for layout in ("bundled", "split"):
    store = bundle_store.write_store(os.path.join(tmp_path, layout), model, order,
                                     bundles.neuron_matrices(model.config), layout)
    assert store.record_nbytes % 4096 == 0 and store.neuron_nbytes == 3 * d * 4
    positions = np.array([0, 1, 2, 7, 9, 10])
    reqs = store.requests(positions)
    if layout == "bundled":
      assert len(reqs) == 3  # runs 0-2, 7, 9-10 coalesce
    else:
      assert len(reqs) == 3 * len(positions)
    buf = aligned_empty(len(positions) * store.record_nbytes)
    reader.read_many(store.file(1), buf, reqs).result()
    rec = buf.view(np.float32).reshape(len(positions), -1)
    stride = store.row_stride // 4
    for j, p in enumerate(positions):
      n = order[1, p]
      np.testing.assert_array_equal(rec[j, :d], gate[:, n])
      np.testing.assert_array_equal(rec[j, stride:stride + d], up[:, n])
      np.testing.assert_array_equal(rec[j, 2 * stride:2 * stride + d], down[n])
  reader.close()
  assert bundle_store.runs(np.array([3, 4, 5, 8]), max_run=2) == [(3, 2), (5, 1), (8, 1)]


def test_planar_reads_scatter_records_into_planes(tmp_path):
  """One request per run of records, scattered by one preadv into the gate|up plane and the
  down plane; the same planes as the copy from whole records."""
  model = hetflow.synthetic_model("llama-tiny-sparse")
  f, d = model.config.intermediate_size, model.config.hidden_size
  order = np.stack([np.random.default_rng(i).permutation(f) for i in range(3)])
  gate, up, down = (model.tensor(f"layers/1/mlp/{m}") for m in ("gate", "up", "down"))
  positions = np.array([0, 1, 2, 7, 9, 10])
  for layout in ("bundled", "split"):
    store = bundle_store.write_store(os.path.join(tmp_path, layout), model, order,
                                     bundles.neuron_matrices(model.config), layout)
    assert not store.planar_direct  # 256-byte rows: O_DIRECT cannot scatter them
    planes = store.planes(16)
    assert planes.nbytes == 16 * store.neuron_nbytes
    reqs = store.planar_requests(positions, planes, first_slot=5)
    assert len(reqs) == len(positions) * (1 if layout == "bundled" else 3)  # padded records
    with ReaderPool(4, direct=False) as reader:
      buf = aligned_empty(planes.nbytes)
      reader.read_many(store.file(1), buf, reqs).result()
      assert reader.record().requests == len(reqs)
    with ReaderPool(4) as reader:  # whole records, copied in
      rec = aligned_empty(len(positions) * store.record_nbytes)
      reader.read_many(store.file(1), rec, store.requests(positions)).result()
      copied = aligned_empty(planes.nbytes)
      planes.fill_from_records(copied, 5 + np.arange(len(positions)),
                               rec.reshape(len(positions), -1), store.row_stride, 3)
      if reader.direct:
        with pytest.raises(ValueError, match="O_DIRECT"):
          reader.read_many(store.file(1), aligned_empty(planes.nbytes), reqs)
    for out in (buf, copied):
      a, b = planes.views(out, np.float32, d)
      for j, p in enumerate(positions):
        n = order[1, p]
        np.testing.assert_array_equal(a[5 + j, :d], gate[:, n])
        np.testing.assert_array_equal(a[5 + j, d:], up[:, n])
        np.testing.assert_array_equal(b[5 + j], down[n])


def test_bridge_gaps_reads_small_gaps_where_allowed():
  pos = np.array([1, 3, 4, 8, 20])
  np.testing.assert_array_equal(bundle_store.bridge_gaps(pos, 0), pos)
  np.testing.assert_array_equal(bundle_store.bridge_gaps(pos, 1), [1, 2, 3, 4, 8, 20])
  np.testing.assert_array_equal(bundle_store.bridge_gaps(pos, 3), [1, 2, 3, 4, 5, 6, 7, 8, 20])
  allowed = np.ones(32, bool)
  allowed[6] = False  # e.g. cached: never read twice
  np.testing.assert_array_equal(bundle_store.bridge_gaps(pos, 3, allowed),
                                [1, 2, 3, 4, 5, 7, 8, 20])


def test_planar_step_matches_the_dense_ffn():
  model = hetflow.synthetic_model("llama-tiny-sparse")
  c = model.config
  w = {m: np.asarray(model.tensor(f"layers/0/mlp/{m}")) for m in ("gate", "up", "down")}
  h = np.random.default_rng(0).standard_normal((1, 2, c.hidden_size)).astype(np.float32)
  a = np.concatenate([w["gate"].T, w["up"].T], 1)  # [F, 2D]
  keep = np.arange(c.intermediate_size) % 3 != 0
  out, fired = bundles.planar_step(c, a, w["down"], h, None, keep)
  z = np.maximum(h @ w["gate"], 0) * np.maximum(h @ w["up"], 0) * keep
  np.testing.assert_allclose(out, z @ w["down"], rtol=1e-4, atol=1e-5)
  assert int(fired) == int((z.reshape(-1, c.intermediate_size) != 0).any(0).sum())
  # A count keeps the first records.
  out, _ = bundles.planar_step(c, a, w["down"], h, None, 7)
  z = np.maximum(h @ w["gate"][:, :7], 0) * np.maximum(h @ w["up"][:, :7], 0)
  np.testing.assert_allclose(out, z @ w["down"][:7], rtol=1e-4, atol=1e-5)
  # pre=True: the last token's gate pre-activations, masked records included.
  out2, fired2, pre = bundles.planar_step(c, a, w["down"], h, None, keep, pre=True)
  np.testing.assert_allclose(pre, (h @ w["gate"])[0, -1], rtol=1e-4, atol=1e-5)
  assert int(fired2) == int(fired)
  # recency: each record's firing count over the tokens, token t weighted recency[t].
  z = np.maximum(h @ w["gate"], 0) * np.maximum(h @ w["up"], 0) * keep
  _, _, (pre2, recent) = bundles.planar_step(c, a, w["down"], h, None, keep, pre=True,
                                              recency=np.array([0.5, 1.0], np.float32))
  np.testing.assert_array_equal(recent, 0.5 * (z[0, 0] != 0) + 1.0 * (z[0, 1] != 0))
  np.testing.assert_array_equal(pre2, pre)


def test_error_feedback_corrects_a_low_rank_score():
  """A neuron whose error was measured is scored by score + s * error: with the
  same residual, exactly the true pre-activation times s; unmeasured neurons keep
  the trained threshold; reset forgets."""
  rng = np.random.default_rng(0)
  d, f = 16, 12
  exact = rng.standard_normal((d, f)).astype(np.float32)
  approx = exact + 0.5 * rng.standard_normal((d, f)).astype(np.float32)
  x = rng.standard_normal(d).astype(np.float32)
  s = float(np.sqrt(np.mean(x * x)))
  fb = predictor.ErrorFeedback(1, f)
  score = x @ approx
  first = fb.select(0, score, s, -0.5, 0.0, 0.0)
  np.testing.assert_array_equal(first, np.flatnonzero(score > -0.5))
  seen = np.array([0, 3, 5, -1, 7])
  fb.observe(0, seen, np.r_[(x @ exact / s)[[0, 3, 5]], 99.0, (x @ exact / s)[7]])
  assert fb.known[0].sum() == 4 and fb.nbytes > 0
  again = fb.select(0, score, s, -0.5, 0.0, 0.0)
  truth = x @ exact
  for j in range(f):
    expected = truth[j] > 0 if j in (0, 3, 5, 7) else score[j] > -0.5
    assert (j in again) == expected, j
  fb.reset()
  np.testing.assert_array_equal(fb.select(0, score, s, -0.5, 0.0, 0.0), first)


def test_segmented_cache_masks_follow_its_lrus():
  """cold_valid and hot_range are kept as the cache changes, not recomputed per step:
  after random admissions, evictions and hot swaps they equal a walk over the cache."""
  rng = np.random.default_rng(0)
  cache = SegmentedCache(num_layers=3, num_neurons=96, num_slots=48, hot_slots=24,
                         cluster_size=4, admission="all")
  for index, (layer, cluster) in enumerate([(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]):
    cache.place_hot(index, layer, cluster)
  for step in range(200):
    layer = int(rng.integers(3))
    if step % 17 == 16:  # a hot swap: a cluster whose members may sit in the cold region
      index = int(rng.integers(6))
      owner = cache.hot_owner[index][0]
      cold = [c for c in range(24) if (owner, c) not in cache.hot_index]
      cache.place_hot(index, owner, int(rng.choice(cold)))
    wanted = np.unique(rng.integers(0, 96, 6))
    _, _, missing = cache.lookup(layer, wanted)
    cache.admit(layer, missing)
    for lay in range(3):
      first, n = cache.cold_range(lay)
      walked = np.zeros(n, bool)
      slots = cache.slot_of[lay]
      walked[slots[(slots >= first) & (slots < first + n)] - first] = True
      np.testing.assert_array_equal(cache.cold_valid(lay), walked)
      hot = sorted(i for (l_, _), i in cache.hot_index.items() if l_ == lay)
      assert cache.hot_range(lay) == ((hot[0] * 4, len(hot) * 4) if hot else (0, 0))


def _list_lru_admit(lru, activity, positions, size, admission, admit_min):
  """The cold region's rule on an OrderedDict (position -> slot, oldest first): the
  reference `SegmentedCache`'s recency stamps must reproduce, slot for slot."""
  free = [s for s in range(size - 1, -1, -1) if s not in lru.values()]
  order = list(range(len(positions)))
  if admission == "frequency":
    order = sorted((j for j in order if activity[positions[j]] >= admit_min),
                   key=lambda j: -activity[positions[j]])
  budget, got = len(free) + len(lru), {}
  for j in order:
    p = int(positions[j])
    if budget <= 0:
      break
    if p in lru:
      continue
    if free:
      slot = free.pop()
    else:
      victim, slot = next(iter(lru.items()))
      if admission == "frequency" and activity[victim] >= activity[p]:
        break
      del lru[victim]
    lru[p] = got[p] = slot
    budget -= 1
  return got


@pytest.mark.parametrize("admission", ["all", "frequency"])
def test_cold_recency_stamps_evict_what_a_linked_list_would(admission):
  """Random steps (hits, misses, records already cached offered again) on one layer:
  the cache's slots equal the OrderedDict reference's after every admission."""
  import collections
  rng = np.random.default_rng(1)
  size = 24
  cache = SegmentedCache(num_layers=1, num_neurons=128, num_slots=size, hot_slots=0,
                         admission=admission, decay=0.8, admit_min=1.2)
  lru = collections.OrderedDict()
  for step in range(300):
    wanted = np.unique(np.minimum(rng.zipf(1.3, 30) - 1, 127))
    _, _, missing = cache.lookup(0, wanted)
    for p in wanted:  # the reference's hits move to its recent end, in order
      if p in lru:
        lru.move_to_end(int(p))
    offered = np.concatenate([missing, wanted[:2]]) if step % 3 == 0 else missing
    expected = _list_lru_admit(lru, cache.activity[0], offered, size, admission, 1.2)
    got = cache.admit(0, offered)
    assert {int(p): int(s) for p, s in zip(offered, got) if s >= 0} == expected
    assert {int(p): int(s) for p, s in enumerate(cache.slot_of[0]) if s >= 0} == dict(lru)
  assert cache.counters.evicted > 50


def test_segmented_cache_regions():
  cache = SegmentedCache(num_layers=2, num_neurons=64, num_slots=16, hot_slots=8, cluster_size=4,
                         admission="all")
  freq = np.zeros((2, 64))
  freq[1, 4:8] = 1.0
  freq[0, 0:4] = 0.9
  hot = cache.choose_hot(freq)
  assert hot == [(1, 1), (0, 0)]
  for i, (layer, cl) in enumerate(sorted(hot)):  # the strategy places them in layer order
    cache.place_hot(i, layer, cl)
  assert cache.hot_range(0) == (0, 4) and cache.hot_range(1) == (4, 4)
  assert cache.cold_range(0) == (8, 4) and cache.cold_range(1) == (12, 4)
  pos, slots, missing = cache.lookup(1, np.array([5, 6, 40]))
  assert list(pos) == [5, 6] and all((slots >= 4) & (slots < 8)) and list(missing) == [40]
  got = cache.admit(1, np.array([40, 41, 42, 43, 44]))
  # Layer 1's partition holds 4, in slots 12..15.
  assert ((got >= 12) & (got < 16)).sum() == 4 and got[-1] == -1
  assert cache.cold_valid(1).all() and not cache.cold_valid(0).any()
  cache.lookup(1, np.array([40]))  # 40 becomes the most recently used
  got = cache.admit(0, np.array([50]))  # layer 0's own partition: evicts nothing of layer 1
  assert 8 <= got[0] < 12 and cache.counters.evicted == 0
  got = cache.admit(1, np.array([50]))  # layer 1's partition is full: its LRU (41) goes
  assert 12 <= got[0] < 16 and cache.slot_of[1, 41] == -1 and cache.slot_of[1, 40] >= 0
  assert cache.counters.evicted == 1


def test_frequency_admission_resists_scans():
  """A flood of one-off misses never displaces neurons that keep firing."""
  layers, f = 2, 4096
  cache = SegmentedCache(num_layers=layers, num_neurons=f, num_slots=64, hot_slots=0,
                         cluster_size=4)
  rng = np.random.default_rng(0)
  steady = np.arange(2000, 2016)  # fire on every token
  others = np.setdiff1d(np.arange(f), steady)
  hits = []
  for _ in range(40):
    for layer in range(layers):
      scan = rng.choice(others, 500, replace=False)  # far more than the region holds
      active = np.sort(np.concatenate([steady, scan]))
      pos, _, missing = cache.lookup(layer, active)
      got = cache.admit(layer, missing)
      assert (got >= 0).sum() <= 64 // layers  # one step never takes more than its share
      hits.append(np.isin(steady, pos).all())
  assert all(hits[-2 * layers:])  # the steady neurons stay cached through the flood
  assert cache.counters.rejected > 0.9 * cache.counters.misses
  # Plain LRU under the same flood keeps nothing.
  lru = SegmentedCache(num_layers=1, num_neurons=f, num_slots=64, hot_slots=0, admission="all")
  for _ in range(10):
    active = np.sort(np.concatenate([steady, rng.choice(others, 500, replace=False)]))
    pos, _, missing = lru.lookup(0, active)
    lru.admit(0, missing)
  assert not np.isin(steady, pos).any()


def test_a_prompt_counts_as_decode_steps_for_admission():
  """begin_prompt / admit_prompt: the prompt's tokens enter the admission filter's
  history as that many steps (old activity decayed by decay**tokens), then the
  uncached records it used are offered and admitted by the usual rule (>= admit_min,
  hottest first)."""
  cache = SegmentedCache(num_layers=1, num_neurons=32, num_slots=4, hot_slots=0,
                         cluster_size=4, decay=0.5, admit_min=1.5)
  cache.activity[0, 3] = 8.0  # active in an earlier request
  positions = np.arange(8)
  recent = np.array([0, 2.0, 1.0, 0.5, 1.75, 0, 3.0, 1.5])  # from the step's recency output
  cache.begin_prompt(0, tokens=2)
  offered, slots = cache.admit_prompt(0, positions, recent)
  np.testing.assert_array_equal(offered, [1, 2, 3, 4, 6, 7])
  assert cache.activity[0, 3] == 8.0 * 0.25 + 0.5
  admitted = set(offered[slots >= 0].tolist())
  assert admitted == {1, 3, 4, 6}  # the four hottest of those >= 1.5 (2.5, 1.75, 2, 3)
  # Cached records are not offered again.
  offered, _ = cache.admit_prompt(0, positions, recent)
  assert not set(offered.tolist()) & admitted


def test_cluster_lru_swaps_in_an_active_cluster():
  cache = SegmentedCache(num_layers=2, num_neurons=64, num_slots=12, hot_slots=12,
                         cluster_size=4)
  freq = np.zeros((2, 64))
  freq[0, :8] = 1.0
  freq[1, :4] = 0.5
  for i, (layer, cl) in enumerate(sorted(cache.choose_hot(freq))):
    cache.place_hot(i, layer, cl)
  assert cache.swap_candidate(1) is None  # nothing active yet
  for _ in range(3):
    cache.lookup(0, np.array([0, 1]))  # cluster (0, 0) stays in use, (0, 1) idles
    cache.lookup(1, np.array([20, 21, 22]))  # cluster (1, 5) is busy outside the hot region
  # The victim is layer 1's own least recently used cluster (1, 0): a layer's hot
  # clusters stay contiguous.
  index, cluster = cache.swap_candidate(1)
  assert cluster == 5 and cache.hot_owner[index] == (1, 0)
  first, positions = cache.place_hot(index, 1, cluster)
  assert list(positions) == [20, 21, 22, 23] and cache.slot_of[1, 0] == -1
  assert cache.hot_range(1) == (8, 4)
  pos, slots, missing = cache.lookup(1, np.array([21, 30]))
  assert list(pos) == [21] and slots[0] == first + 1 and list(missing) == [30]
  assert cache.swap_candidate(1) is None  # (1, 5) is in use: no better swap
  assert cache.swap_candidate(0) is None  # layer 0's outsiders are idle


