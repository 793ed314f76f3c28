"""Invariants of the `layerwise` strategy on tiny models.

Every tier choice, prefetch depth, resident count and KV tier must give the
greedy tokens of `resident` and its logits within 1e-5; the ledger must stay
within the budget; too small a budget must name the minimum; a damaged layer
file must raise at that layer, not hang or compute on garbage.
"""

import concurrent.futures
import os
import threading

import numpy as np
import pytest

import hetflow
from hetflow import planner
from hetflow.engine import Engine
from hetflow.hardware import PROFILES
from hetflow.memory import Budget, BudgetExceeded, ReadError, format_bytes
from hetflow.memory.store import default_store_dir, write_store
from strategies.layerwise import Layerwise, LayerwiseOptions

MODELS = ("llama-tiny", "opt-tiny", "mixtral-tiny")
PROMPT = [[5, 6, 7, 8, 9, 10]]
NEW = 6


@pytest.fixture(scope="module")
def references(cache_dir):
  """Per model: the Model (shared, so jitted functions compile once), tokens, logits."""
  out = {}
  for name in MODELS:
    model = hetflow.synthetic_model(name)
    with Engine(model, "resident") as engine:
      tokens = engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens
      logits = engine.forward(PROMPT)
    out[name] = (model, tokens, logits)
  return out


def _check(model, tokens, logits, options, budget=None):
  with Engine(model, "layerwise", budget=budget, options=options) as engine:
    out = engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(PROMPT), logits, atol=1e-5, rtol=0)
    # A second generation reuses the ring (and the wrap-around prefetch) correctly.
    np.testing.assert_array_equal(
        engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens, tokens)
    return engine, out


CASES = [
    dict(offload_tier=tier, prefetch_depth=depth) for tier in ("disk", "host") for depth in (0, 1, 2)
] + [
    dict(offload_tier="disk", prefetch_depth=1, resident_layers=1),
    dict(offload_tier="host", prefetch_depth=1, resident_layers=2, kv_cache_tier="host"),
    dict(offload_tier="disk", prefetch_depth=2, kv_cache_tier="host"),
    dict(offload_tier="disk", prefetch_depth=1, resident_layers=3),
]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_resident(references, name, options):
  model, tokens, logits = references[name]
  engine, out = _check(model, tokens, logits, options)
  stats = out.stats["strategy"]
  streamed = model.config.num_layers - options.get("resident_layers", 0)
  # Every decode pass streams every non-resident layer once.
  assert stats.decode.get("streamed_layers", 0) == streamed * (NEW - 1)


@pytest.mark.parametrize("name", MODELS)
def test_auto_fills_the_device_budget_and_stays_within_it(references, name):
  model, tokens, logits = references[name]
  strategy = Layerwise(LayerwiseOptions(resident_layers=2, prefetch_depth=1))
  need = strategy.minimum_budget(model)["device"]
  budget = Budget(device=need)
  options = dict(resident_layers="auto", prefetch_depth=1)
  engine, out = _check(model, tokens, logits, options, budget)
  # Streaming a layer costs a ring slot as large as a layer, so "auto" may keep all.
  assert len(engine.strategy.stats().details["resident_layers"]) >= 2
  for tier, row in out.stats["ledger"]["tiers"].items():
    if row["budget"] is not None:
      assert row["peak"] <= row["budget"], tier


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_minimum_budget_exactly_fits_and_one_byte_less_fails(references, tier):
  model, tokens, logits = references["llama-tiny"]
  options = LayerwiseOptions(offload_tier=tier, prefetch_depth=2)
  minimum = Layerwise(options).minimum_budget(model)
  budget = Budget(device=minimum["device"], host=minimum["host"] or None)
  engine, out = _check(model, tokens, logits, options, budget)
  for row in out.stats["ledger"]["tiers"].values():
    assert row["budget"] is None or row["peak"] <= row["budget"]
  with pytest.raises(BudgetExceeded) as e:
    Engine(model, "layerwise", budget=Budget(device=minimum["device"] - 1), options=options)
  assert e.value.minimum == minimum["device"]
  assert format_bytes(minimum["device"]) in str(e.value)
  if tier == "host":
    with pytest.raises(BudgetExceeded, match="host") as e:
      Engine(model, "layerwise", budget=Budget(host=minimum["host"] - 1), options=options)
    assert e.value.minimum == minimum["host"]


def test_buffers_are_reused_and_reads_wrap_around(references):
  model, tokens, _ = references["llama-tiny"]
  with Engine(model, "layerwise", options=dict(prefetch_depth=1)) as engine:
    s = engine.strategy
    slots = [b.ctypes.data for bufs in s._slots for b in bufs]
    engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=())
    assert [b.ctypes.data for bufs in s._slots for b in bufs] == slots
    # At the end of a pass the next pass's first layers are already in flight.
    assert [layer for _, layer, _ in s._pending] == [0, 1]
    reader = s.stats().reads
    assert reader.direct and reader.requests > 0


def test_next_layers_reads_are_queued_before_the_previous_ones_finish(references):
  """The disk does not drain between blocks: while layer 0's reads are in flight, layer
  1's are queued behind them (its ring slot is free), and the tokens stay resident's."""
  model, tokens, _ = references["llama-tiny"]
  with Engine(model, "layerwise", options=dict(prefetch_depth=2)) as engine:
    s = engine.strategy
    store, real = s._stores[0], s._pool.read_into
    first = {store.file(f"layers/0/{h}") for h in ("attn", "mlp")}
    second = {store.file(f"layers/1/{h}") for h in ("attn", "mlp")}
    queued = threading.Event()  # a layer-1 read was queued after the last layer-0 one
    seen = []  # per held layer-0 read: was layer 1 queued before it finished?

    def read_into(path, offset, buffer, nbytes=None, chunk=1 << 20):
      if path in first:
        queued.clear()
      elif path in second:
        queued.set()
      future = real(path, offset, buffer, nbytes, chunk=chunk)
      if path not in first:
        return future
      held = concurrent.futures.Future()

      def finish():  # layer 0's read finishes only once layer 1's is queued (or 10 s passed)
        seen.append(queued.wait(10))
        try:
          held.set_result(future.result())
        except BaseException as e:  # noqa: BLE001 - handed to the strategy
          held.set_exception(e)

      threading.Thread(target=finish, daemon=True).start()
      return held

    s._pool.read_into = read_into
    out = engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=())
  np.testing.assert_array_equal(out.tokens, tokens)
  assert seen and all(seen), seen


def _generate_with_deadline(engine, seconds=60):
  result = {}

  def run():
    try:
      result["out"] = engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=())
    except BaseException as e:  # noqa: BLE001 - inspected by the test
      result["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), "generation hung on a damaged store"
  return result


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_layer_file_raises_at_that_layer(references, tmp_path, damage):
  model, tokens, _ = references["llama-tiny"]
  store = write_store(model, str(tmp_path / "store"), progress=False)
  victim = store.file("layers/2/mlp")
  with open(victim, "rb") as f:
    original = f.read()
  with Engine(model, "layerwise", options=dict(store_dir=store.path, prefetch_depth=1)) as engine:
    if damage == "truncate":
      os.truncate(victim, 4096)
    else:
      os.remove(victim)
    result = _generate_with_deadline(engine)
    assert isinstance(result.get("error"), ReadError), result
    assert "layer 2" in str(result["error"])
    # Repaired, the same engine recovers and is exact again.
    with open(victim, "wb") as f:
      f.write(original)
    result = _generate_with_deadline(engine)
    np.testing.assert_array_equal(result["out"].tokens, tokens)


def test_store_of_another_model_is_refused(references, tmp_path):
  model = references["llama-tiny"][0]
  store = write_store(model, str(tmp_path / "store"), progress=False)
  other = hetflow.synthetic_model("llama-tiny", seed=1)
  with pytest.raises(ValueError, match="not from this model"):
    Engine(other, "layerwise", options=dict(store_dir=store.path))


def test_plan_is_pure_and_printable(cache_dir):
  model = hetflow.synthetic_model("llama-1b")  # 4.4 GB: nothing may be materialised
  strategy = Layerwise(LayerwiseOptions(resident_layers="auto", prefetch_depth=2))
  placement = strategy.plan(model, Budget(device="2GiB"), PROFILES["a10-pcie"])
  text = str(placement)
  assert "disk" in text and "resident" in text
  # Predictions are the planner's, printed with the plan they rank.
  ranked = planner.plan(model, Budget(device="2GiB"), PROFILES["a10-pcie"],
                        strategies=["layerwise"])
  assert "predicted decode" in str(ranked[0]) and "disk" in str(ranked[0])
  resident = [g for g, p in placement.groups.items() if g.startswith("layers/") and p.tier == "device"]
  assert 0 < len(resident) < 2 * model.config.num_layers
  assert placement.bytes_per_tier()["device"] <= Budget(device="2GiB").device
  assert not os.path.exists(default_store_dir(model))  # plan() converted nothing
  with pytest.raises(BudgetExceeded) as e:
    strategy.plan(model, Budget(device="100MiB"))
  assert e.value.minimum == strategy.minimum_budget(model)["device"]
  assert "smallest device budget" in str(e.value)


def test_options_are_validated():
  with pytest.raises(ValueError, match="offload_tier"):
    LayerwiseOptions(offload_tier="gpu")
  with pytest.raises(ValueError, match="prefetch_depth"):
    LayerwiseOptions(prefetch_depth=-1)
  with pytest.raises(ValueError, match="resident_layers"):
    LayerwiseOptions(resident_layers="most")


def test_batch_with_padding_matches_resident(references):
  model = references["opt-tiny"][0]
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # left-padded by the engine
  with Engine(model, "resident") as engine:
    want = engine.generate(prompts, max_new_tokens=NEW, stop_tokens=()).tokens
  options = dict(offload_tier="disk", prefetch_depth=1, kv_cache_tier="host")
  with Engine(model, "layerwise", options=options) as engine:
    np.testing.assert_array_equal(
        engine.generate(prompts, max_new_tokens=NEW, stop_tokens=()).tokens, want)
