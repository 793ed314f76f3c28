"""Invariance, ledger and compilation tests of the neuron_cluster strategy (tiny models)."""

import collections
import os

import numpy as np
import pytest

import hetflow
from hetflow.engine import Engine
from hetflow.memory import Budget, BudgetExceeded
from hetflow.testing.neuron_cache import assert_cache_holds_its_records

NEW_TOKENS = 16


@pytest.fixture(scope="module", params=("llama-tiny-sparse", "opt-tiny-sparse"))
def reference(request):
  model = hetflow.synthetic_model(request.param, sparsity=0.9, hotness="zipf:1.1", seed=0)
  ids = np.random.default_rng(1).integers(3, model.config.vocab_size, (2, 10))
  engine = Engine(model, "resident")
  out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
  return model, ids, out.tokens, engine.forward(ids)


@pytest.mark.parametrize("options", [
    dict(cache_bytes=0),
    dict(cache_bytes="64KiB", cluster_size=8),
    dict(cache_bytes=None),
    dict(cache_bytes="64KiB", pipeline=False, layout="split"),
    dict(cache_bytes="64KiB", cluster_size=4, hot_policy="lru", swap_margin=0.25,
         admission="all"),
    dict(cache_bytes="64KiB", cluster_size=8, bridge_gap=3, lookahead=False),
    dict(cache_bytes="64KiB", cluster_size=8, gather_ratio=0.0),
], ids=["no-cache", "small-cache", "full-cache", "split-serial", "cluster-lru", "bridged",
        "gathered-hits"])
def test_oracle_matches_resident_exactly(reference, options):
  model, ids, tokens, logits = reference
  with Engine(model, "neuron_cluster", options=options) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(ids), logits, atol=1e-5, rtol=0)
    s = out.stats["strategy"].details
    assert s["decode_tokens"] == NEW_TOKENS - 1
    if options["cache_bytes"] is None:
      assert s["disk_bytes_per_token"] == 0 or s["cache"]["misses"] < s["cache"]["hot_hits"]
      # Cached blocks multiplied whole were started before the predictor's wait (exact too).
      assert any(engine.strategy._whole.values())
    if options.get("bridge_gap"):  # gaps read too: more records than predicted, fewer reads
      assert s["read_neurons_per_token"] > s["late_read_neurons_per_token"]
    if options.get("hot_policy") == "lru":
      assert s["cache"]["cluster_swaps"] > 0 and s["cluster_swap_bytes_per_token"] > 0


def test_prefill_admission_saves_the_first_decode_reads(reference):
  """The records the prompt used, admitted as the dense prefill reads them, hold the
  store's bytes, and the first decode token reads less than without them (same tokens)."""
  model, ids, tokens, _ = reference
  first_token_bytes = {}
  for on in (False, True):
    options = dict(cache_bytes=None, hot_fraction=0.25, prefill_admission=on)
    with Engine(model, "neuron_cluster", options=options) as engine:
      out = engine.generate(ids, max_new_tokens=2, stop_tokens=())  # prefill + one decode step
      np.testing.assert_array_equal(out.tokens, tokens[:, :2])
      strategy = engine.strategy
      first_token_bytes[on] = out.stats["strategy"].decode.disk_bytes
      if on:  # the prompt's records were admitted at the prefill, and hold the right bytes
        assert strategy.cache.counters.admitted > out.stats["strategy"].decode.get("read_neurons")
      assert_cache_holds_its_records(strategy)
  assert first_token_bytes[True] < first_token_bytes[False]


def test_audit_counts_with_the_oracle(reference):
  """The oracle reads exactly the truly active, uncached neurons: no false positives or misses
  (without look-ahead: its guesses are read on top, see the look-ahead tests)."""
  model, ids, tokens, _ = reference
  with Engine(model, "neuron_cluster", options=dict(cache_bytes="64KiB", cluster_size=8,
                                                    audit=True, lookahead=False)) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
  np.testing.assert_array_equal(out.tokens, tokens)
  s = out.stats["strategy"].details
  assert s["ideal_exact"] and s["recall"] == 1.0 and s["precision"] == 1.0
  assert s["missed_neurons_per_token"] == 0 and s["false_positive_bytes_per_token"] == 0
  assert s["ideal_bytes_per_token"] == s["useful_bytes_per_token"] > 0
  assert s["disk_bytes_per_token"] >= s["ideal_bytes_per_token"]


def test_ledger_peak_stays_within_budget(reference):
  model, ids, tokens, _ = reference
  budget = Budget(device=int(0.6 * model.nbytes) + (2 << 20))
  with Engine(model, "neuron_cluster", budget=budget,
              options=dict(staging_bytes="128KiB")) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    assert engine.ledger.peak("device") <= budget.device
    assert out.stats["strategy"].details["cache_slots"] > 0
  with pytest.raises(BudgetExceeded) as err:
    Engine(model, "neuron_cluster", budget=Budget(device=model.nbytes // 10))
  assert err.value.minimum > model.nbytes // 10


def test_decode_compiles_a_few_shapes_then_stops(reference):
  model, ids, _, _ = reference
  with Engine(model, "neuron_cluster", options=dict(cache_bytes=0)) as engine:
    first = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    second = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    assert second.stats["recompilations"] == 0
    s = second.stats["strategy"].details
    f = model.config.intermediate_size
    assert s["compiled_shapes"] <= 2 * (int(np.log2(f)) + 2)
    assert sum(s["new_shapes_per_token"][NEW_TOKENS - 1:]) == 0  # none in the second run
    assert first.stats["recompilations"] > 0
  # Every decode block shape is compiled at load: a prompt unlike the first compiles nothing
  # (the pool's blocks too: hot, cold and gathered).
  other = np.random.default_rng(7).integers(3, model.config.vocab_size, ids.shape)
  for options in (dict(cache_bytes=0), dict(cache_bytes="64KiB", cluster_size=8),
                  dict(cache_bytes="64KiB", cluster_size=8, gather_ratio=0.0)):
    with Engine(model, "neuron_cluster", options=options) as engine:
      engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
      assert engine.generate(other, max_new_tokens=NEW_TOKENS,
                             stop_tokens=()).stats["recompilations"] == 0, options


def test_trained_predictor_reports_agreement_and_recall(reference, tmp_path):
  """The predictor configs/sparse/tiny.py trains, judged on decode steps that set nothing:
  its report's test quarter (generations used neither to train nor to set thresholds), and
  this test's own prompts, which the training never saw."""
  import importlib.util

  from hetflow.bench.train_predictor import train_from_config

  model, ids, tokens, _ = reference
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "sparse", "tiny.py")
  spec = importlib.util.spec_from_file_location("sparse_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("opt" if model.config.name.startswith("opt") else None)
  assert config.model.name == model.config.name and config.model.seed == 0
  assert config.model.kwargs.to_dict() == dict(sparsity=0.9, hotness="zipf:1.1")
  trained = train_from_config(config, str(tmp_path))
  recall = [r["recall"] for r in trained["test_reports"]]
  with Engine(model, "neuron_cluster", options=dict(
      predictor="trained", predictor_path=trained["predictor_path"],
      stats_path=trained["stats_path"], cache_bytes="32KiB", audit=True)) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
  agreement = float((out.tokens == tokens).mean())
  s = out.stats["strategy"].details
  print(f"{model.config.name}: per-layer recall {np.round(recall, 3)} (test quarter),"
        f" on this test's decode steps {np.round(s['layer_recall'], 3)}, precision"
        f" {np.round(s['layer_precision'], 3)}; token agreement with dense {agreement:.2f}")
  assert min(recall) > 0.95
  assert min(s["layer_recall"]) > 0.95
  assert s["useful_bytes_per_token"] <= s["ideal_bytes_per_token"]
  assert 0.0 <= agreement <= 1.0 and out.stats["strategy"].details["predicted_density"] < 0.6
  if model.config.arch != "llama":  # error feedback needs RMSNorm and an SVD/exact predictor
    return
  # Error feedback (batch-1 decode): the previous token's measured errors sharpen the scores.
  got = {}
  for feedback in (False, True):
    with Engine(model, "neuron_cluster", options=dict(
        predictor="trained", predictor_path=trained["predictor_path"],
        stats_path=trained["stats_path"], cache_bytes="32KiB", audit=True,
        feedback=feedback)) as engine:
      one = engine.generate(ids[:1], max_new_tokens=NEW_TOKENS, stop_tokens=())
      again = engine.generate(ids[:1], max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(again.tokens, one.tokens)  # reset between sequences
    got[feedback] = (one.stats["strategy"].details, float((one.tokens == tokens[:1]).mean()))
  (plain, agree_plain), (fed, agree_fed) = got[False], got[True]
  print(f"batch 1 with feedback: recall {fed['recall']:.4f} (without {plain['recall']:.4f}),"
        f" precision {fed['precision']:.3f} (without {plain['precision']:.3f}), agreement"
        f" {agree_fed:.2f} (without {agree_plain:.2f})")
  assert fed["precision"] > plain["precision"]
  assert fed["recall"] > 0.95 and agree_fed >= agree_plain - 0.1
  # The look-ahead with feedback: the next layer's corrected scores on this layer's input,
  # at most `lookahead_records` uncached records per layer (the surest). The records it
  # reads are computed as well, so what the computation covers can only grow.
  cap = 4
  with Engine(model, "neuron_cluster", options=dict(
      predictor="trained", predictor_path=trained["predictor_path"],
      stats_path=trained["stats_path"], cache_bytes="32KiB", audit=True, lookahead=True,
      lookahead_records=cap)) as engine:
    out = engine.generate(ids[:1], max_new_tokens=NEW_TOKENS, stop_tokens=())
  ahead = out.stats["strategy"].details
  layers = model.config.num_layers
  print(f"look-ahead (cap {cap}): {ahead['ahead_read_neurons_per_token']:.1f} guessed"
        f" records per token, {ahead['ahead_unused_neurons_per_token']:.1f} unused, share of"
        f" misses in flight {ahead['ahead_fraction']:.2f}")
  assert 0 < ahead["ahead_read_neurons_per_token"] <= cap * (layers - 1)
  assert ahead["ahead_fraction"] > 0
  assert ahead["computed_recall"] >= fed["computed_recall"] - 0.02
  assert float((out.tokens == tokens[:1]).mean()) >= agree_fed - 0.1


@pytest.mark.parametrize("guess,staging", [
    ("complement", "256KiB"), ("random", "256KiB"), ("none", "256KiB"),
    ("complement", "64KiB")], ids=["complement", "random", "none", "complement-fills-area"])
def test_lookahead_is_exact_whatever_it_guesses(reference, guess, staging, monkeypatch):
  """The look-ahead reads layer i+1's records before its input exists; a wrong guess
  (here deliberately: every other neuron, random ones, or nothing) costs reads, never
  correctness: the tokens stay resident's. With a small staging buffer the guess fills
  the layer's area, so the misses it left are read over the guessed records: those
  must be computed and admitted first (the cache holds the store's bytes)."""
  from strategies.neuron_cluster.strategy import NeuronCluster

  model, ids, tokens, logits = reference
  f = model.config.intermediate_size
  rng = np.random.default_rng(0)
  wrong = {
      "complement": lambda self, layer, pos: np.setdiff1d(np.arange(f), pos),
      "random": lambda self, layer, pos: np.sort(rng.choice(f, len(pos), replace=False)),
      "none": lambda self, layer, pos: pos[:0],
  }[guess]
  monkeypatch.setattr(NeuronCluster, "_guess", wrong)
  with Engine(model, "neuron_cluster", options=dict(cache_bytes="64KiB", cluster_size=8,
                                                    staging_bytes=staging,
                                                    lookahead=True)) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    assert_cache_holds_its_records(engine.strategy)
    np.testing.assert_allclose(engine.forward(ids), logits, atol=1e-5, rtol=0)
  s = out.stats["strategy"].details
  assert s["late_read_neurons_per_token"] > 0  # what the guess missed was read in time
  if guess != "none":
    assert s["ahead_unused_neurons_per_token"] > 0
  else:
    assert s["ahead_read_neurons_per_token"] == 0 and s["ahead_fraction"] == 0


def test_lookahead_reads_most_misses_ahead(reference):
  """With the real guess (layer i+1's predictor on layer i's input) a good part of each
  layer's misses are already in flight or landed when the layer starts, and the tokens
  stay exact."""
  model, ids, tokens, _ = reference
  runs = {}
  for ahead in (False, True):
    with Engine(model, "neuron_cluster", options=dict(cache_bytes="64KiB", cluster_size=8,
                                                      lookahead=ahead)) as engine:
      out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    runs[ahead] = out.stats["strategy"].details
  assert runs[False]["ahead_fraction"] == 0
  # Layer 0 has nothing to look ahead from (a third of these 3-layer models' misses); the
  # tiny random models' residual streams also change more per layer than real ones.
  assert runs[True]["ahead_fraction"] > 0.25
  # Records computed: every cached one of a layer plus every one read.
  for s in runs.values():
    assert s["computed_neurons_per_token"] >= s["read_neurons_per_token"]


def test_previous_token_lookahead_guesses_the_last_misses(reference, monkeypatch):
  """lookahead_source="previous_token": while layer i's attention computes, its misses at
  the previous decode token are read (every layer's, none at the sequence's first decode
  token); the tokens stay exact."""
  from strategies.neuron_cluster.strategy import NeuronCluster

  model, ids, tokens, logits = reference
  layers = model.config.num_layers
  guessed, missed = [], {}
  real_guess = NeuronCluster._guess

  real_predict = NeuronCluster._predict
  predicted = []  # the layers whose predictor has run, in order

  def spy(self, layer, positions):
    guessed.append(layer)
    np.testing.assert_array_equal(positions, missed[layer])  # the last token's misses
    # Started after the layer before's step, before this layer's predictor: with its
    # attention, not while the layer before still reads.
    assert predicted[-1] == (layer - 1) % layers
    return real_guess(self, layer, positions)

  def predict(self, layer, *args, **kwargs):
    out = real_predict(self, layer, *args, **kwargs)
    predicted.append(layer)
    return out

  monkeypatch.setattr(NeuronCluster, "_guess", spy)
  monkeypatch.setattr(NeuronCluster, "_predict", predict)
  with Engine(model, "neuron_cluster", options=dict(
      cache_bytes="64KiB", cluster_size=8, lookahead=True,
      lookahead_source="previous_token")) as engine:
    st = engine.strategy
    split = st.cache.split

    def record(layer, positions):
      hit, slots, missing = split(layer, positions)
      if st._phase == "decode":
        missed[layer] = missing
      return hit, slots, missing

    st.cache.split = record
    out = engine.generate(ids[:1], max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens[:1])
    assert_cache_holds_its_records(st)
    np.testing.assert_allclose(engine.forward(ids), logits, atol=1e-5, rtol=0)
  decode_steps = NEW_TOKENS - 1
  assert sorted(guessed) == sorted(list(range(layers)) * (decode_steps - 1))
  assert out.stats["strategy"].details["ahead_fraction"] > 0


def test_run_cuts_never_split_a_run():
  from strategies.neuron_cluster.strategy import run_cuts

  pos = np.array([1, 2, 3, 4, 9, 10, 20, 21, 22, 23, 24, 40])
  cuts = run_cuts(pos, [0, 2, 4, 8])
  # 2 falls inside the run 1..4: moved to 4 (the run at 9); 4 stays; 8 inside 20..24 -> 11.
  assert cuts == [0, 4, 4, 11, 12]
  for a in cuts[1:-1]:
    if 0 < a < len(pos):
      assert pos[a] != pos[a - 1] + 1
  assert run_cuts(np.arange(5), [0, 2]) == [0, 5, 5]
  assert run_cuts(pos[:0], [0]) == [0, 0]


def test_piece_starts_group_blocks_into_equal_pieces():
  from strategies.neuron_cluster.strategy import piece_starts

  blocks = [(0, 64), (64, 32), (96, 8)]
  assert piece_starts(blocks, 1) == [0]
  assert piece_starts(blocks, 2) == [0, 64]  # 104 / 2 = 52: the 64 fills the first piece
  assert piece_starts(blocks, 3) == [0, 64]  # per 35: 64 fills one, 32 + 8 the next
  assert piece_starts(blocks, 8) == [0, 64, 96]  # never more pieces than blocks


@pytest.mark.parametrize("pieces", [1, 3])
def test_a_round_is_read_in_at_most_pieces_calls(reference, pieces, monkeypatch):
  """Each decode layer step reads its misses in one call per piece, not one per block,
  and computes each block only once its piece has landed: tokens and logits exact."""
  model, ids, tokens, logits = reference
  from strategies.neuron_cluster import strategy as nc

  calls = []
  real = nc.NeuronCluster._read

  def counted(self, layer, positions, which, first, parallel, phase=None):
    if phase == "decode" and which == "staging":
      calls.append((self._token, layer))
    return real(self, layer, positions, which, first, parallel, phase)

  def begin(self, phase, num_tokens, real_begin=nc.NeuronCluster.begin):
    self._token = getattr(self, "_token", 0) + 1
    return real_begin(self, phase, num_tokens)

  monkeypatch.setattr(nc.NeuronCluster, "_read", counted)
  monkeypatch.setattr(nc.NeuronCluster, "begin", begin)
  options = dict(cache_bytes="64KiB", cluster_size=8, lookahead=False, pieces=pieces,
                 min_bucket=2)
  with Engine(model, "neuron_cluster", options=options) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(ids), logits, atol=1e-5, rtol=0)
    # One round a step: every miss fits the layer's staging area.
    assert engine.strategy.area_cap >= model.config.intermediate_size
  per_step = collections.Counter(calls).values()
  assert max(per_step) <= pieces
  if pieces > 1:  # some step was cut into pieces
    assert max(per_step) > 1


def test_token_table_on_disk_is_exact(reference, tmp_path):
  """embed_tier='disk': each pass reads its tokens' rows, the tokens and logits stay
  resident's, the table is charged to the disk tier and the ledger stays in the budget;
  a tied head (OPT) is refused."""
  from hetflow.strategy import NotApplicable

  model, ids, tokens, logits = reference
  if model.config.tie_word_embeddings:
    with pytest.raises(NotApplicable, match="embed_tier"):
      Engine(model, "neuron_cluster", options=dict(embed_tier="disk"))
    return
  budget = Budget(device=int(0.6 * model.nbytes) + (2 << 20))
  options = dict(staging_bytes="128KiB", store_dir=str(tmp_path / "store"))
  with Engine(model, "neuron_cluster", budget=budget, options=options) as engine:
    slots = engine.placement.settings.cache_slots
  shape = model.shapes["embed/tokens"]
  table = shape.size * np.dtype(shape.dtype).itemsize
  with Engine(model, "neuron_cluster", budget=budget,
              options=dict(options, embed_tier="disk")) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(ids), logits, atol=1e-5, rtol=0)
    assert engine.placement.groups["embed"].tier == "disk"
    assert engine.ledger.peak("device") <= budget.device
    assert engine.ledger.peak("disk") >= table
    # A tiny table is read whole (its 256-byte rows would take a page each): no bytes freed.
    assert engine.placement.settings.cache_slots == slots
    assert out.stats["strategy"].details["decode_tokens"] == NEW_TOKENS - 1
  assert os.path.exists(tmp_path / "store" / "embed" / "manifest.json")


def test_token_table_on_disk_leaves_its_bytes_to_the_cache():
  """llama-1b-sparse at 40% of its bytes (shapes only): the 262 MB table moves to the disk
  tier and the cache gains its bytes less a prompt's rows (a page each: 8 KiB rows)."""
  from strategies.neuron_cluster import cost
  from strategies.neuron_cluster.strategy import NeuronCluster

  model = hetflow.synthetic_model("llama-1b-sparse", sparsity=0.9, hotness="zipf:1.1")
  budget = Budget(device=int(0.4 * model.nbytes))
  options = dict(predictor="trained", predictor_path="/nonexistent", kv_reserve_tokens=372)
  plans = [NeuronCluster(dict(options, embed_tier=t)).plan(model, budget)
           for t in ("device", "disk")]
  table = model.group_nbytes("embed")
  assert plans[1].groups["embed"].tier == "disk" and plans[1].groups["embed"].nbytes == table
  sizes = plans[1].settings.sizes
  assert sizes.embed_rows == 512 * 8192 == cost.embed_rows_nbytes(model, 372)
  assert plans[1].settings.cache_slots == (
      plans[0].settings.cache_slots + (table - sizes.embed_rows) // sizes.record)
  for p in plans:
    assert p.bytes_per_tier()["device"] <= budget.device
  assert plans[1].bytes_per_tier()["disk"] == plans[0].bytes_per_tier()["disk"] + table


def test_perfect_lookahead_script_replays_the_same_decode(tmp_path):
  """scripts/perfect_lookahead.py (smoke): the sets a process selected, replayed a layer
  ahead in identical processes, decode the same tokens (it exits non-zero otherwise) and
  read nearly every miss ahead; the ram mode decodes them too, from a store written
  into `--ram_dir`, which it leaves as it found it."""
  import json
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out, ram = tmp_path / "rows.json", tmp_path / "ram"
  ram.mkdir()
  run = subprocess.run([sys.executable, "scripts/perfect_lookahead.py", "--smoke",
                        "--system=nc_lookahead", "--rounds=1", "--requests=1",
                        "--modes=none,replay,ram", f"--ram_dir={ram}", f"--out={out}"],
                       cwd=root, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = json.loads(out.read_text())
  assert [r["mode"] for r in rows] == ["record", "none", "replay", "ram"]
  assert len({r["tokens"] for r in rows}) == 1
  replay = rows[2]["requests"][0]
  assert replay["records_ahead"] > 0
  assert replay["records_late"] <= 0.1 * replay["records_ahead"]
  assert rows[3]["requests"][0]["mb_read"] > 0  # it read records, as the other modes did
  assert list(ram.iterdir()) == []

  missing = subprocess.run([sys.executable, "scripts/perfect_lookahead.py", "--smoke",
                            "--system=nc_lookahead", "--modes=ram",
                            f"--ram_dir={tmp_path / 'absent'}"],
                           cwd=root, capture_output=True, text=True)
  assert missing.returncode != 0 and "--ram_dir=" in missing.stderr
