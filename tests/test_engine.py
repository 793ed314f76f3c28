"""The engine's loop: generation options, stats, registry, budgets."""

import numpy as np
import pytest

import hetflow
from hetflow.models import forward_reference
from hetflow.strategy import Strategy, register_strategy


@pytest.fixture(scope="module")
def engine():
  return hetflow.Engine(hetflow.synthetic_model("llama-tiny"))


def test_forward_equals_reference(engine):
  ids = np.array([[1, 5, 9, 200, 3]])
  np.testing.assert_array_equal(engine.forward(ids),
                                np.asarray(forward_reference(engine.model, ids)))


def test_stop_tokens_end_rows_and_pad(engine):
  prompt = [[7, 8, 9, 10]]
  free = engine.generate(prompt, max_new_tokens=8, stop_tokens=()).tokens[0]
  stop = int(free[2])
  out = engine.generate(prompt, max_new_tokens=8, stop_tokens=[stop], pad_token_id=0)
  first = list(free).index(stop)
  np.testing.assert_array_equal(out.tokens[0, :first + 1], free[:first + 1])
  assert (out.tokens[0, first + 1:] == 0).all()
  assert out.stats["new_tokens"] == first + 1


def test_sampling_is_seeded_and_respects_top_k(engine):
  prompt = [[7, 8, 9, 10]]
  a = engine.generate(prompt, max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=())
  b = engine.generate(prompt, max_new_tokens=10, temperature=1.0, seed=3, stop_tokens=())
  c = engine.generate(prompt, max_new_tokens=10, temperature=1.0, seed=4, stop_tokens=())
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # top_k=1 is greedy whatever the temperature.
  greedy = engine.generate(prompt, max_new_tokens=10, stop_tokens=()).tokens
  topk1 = engine.generate(prompt, max_new_tokens=10, temperature=2.0, top_k=1,
                          stop_tokens=()).tokens
  np.testing.assert_array_equal(greedy, topk1)


def test_top_p_keeps_the_nucleus():
  from hetflow.engine import SamplingOptions, sample

  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  rng = np.random.default_rng(0)
  draws = {int(sample(logits, SamplingOptions(1.0, 0, 0.7, 0), rng)[0]) for _ in range(200)}
  assert draws == {0, 1}


def test_stats_and_no_recompilation_after_warmup(engine):
  prompt = [[7, 8, 9, 10]]
  engine.generate(prompt, max_new_tokens=6, stop_tokens=())  # warm-up
  out = engine.generate(prompt, max_new_tokens=6, stop_tokens=())
  stats = out.stats
  assert stats["recompilations"] == 0
  assert stats["new_tokens"] == 6 and stats["decode_tokens_per_s"] > 0
  # One thread's CPU time cannot exceed the wall time it ran over.
  assert 0 < stats["decode_host_cpu_s"] <= stats["decode_s"]
  assert stats["prefill_s"] > 0
  assert stats["ledger"]["tiers"]["device"]["peak"] >= engine.model.nbytes
  # The KV cache was allocated through the ledger and released afterwards.
  assert stats["ledger"]["tiers"]["device"]["used"] == engine.model.nbytes


def test_budget_too_small_states_the_minimum():
  model = hetflow.synthetic_model("llama-tiny")
  with pytest.raises(hetflow.BudgetExceeded, match="smallest device budget"):
    hetflow.Engine(model, budget=hetflow.Budget(device="100KiB"))


def test_unknown_strategy():
  with pytest.raises(ValueError, match="unknown strategy 'magic'; available:"):
    hetflow.Engine(hetflow.synthetic_model("llama-tiny"), strategy="magic")


def test_registry_refuses_duplicates_and_lists_builtins():
  assert "resident" in hetflow.available_strategies()
  with pytest.raises(ValueError, match="already registered"):
    @register_strategy("resident")
    class Another(Strategy):  # noqa: F841
      pass


def test_third_party_strategy_plugs_in():
  """A strategy defined outside hetflow runs without engine changes."""
  from strategies.resident import Resident

  @register_strategy("test-counting")
  class Counting(Resident):
    fetches = 0

    def fetch(self, layer, half):
      type(self).fetches += 1
      return super().fetch(layer, half)

  model = hetflow.synthetic_model("opt-tiny")
  out = hetflow.Engine(model, strategy="test-counting").generate([[4, 5]], max_new_tokens=3,
                                                                  stop_tokens=())
  want = hetflow.Engine(model).generate([[4, 5]], max_new_tokens=3, stop_tokens=())
  np.testing.assert_array_equal(out.tokens, want.tokens)
  assert Counting.fetches == 3 * 2 * model.config.num_layers


def test_bad_prompts(engine):
  with pytest.raises(ValueError, match="at least one token"):
    engine.generate([[]], max_new_tokens=2)
  with pytest.raises(ValueError, match="tokenizer"):
    engine.generate("hello", max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    engine.generate([[1]], max_new_tokens=0)


def test_kv_cache_over_budget_fails_cleanly():
  """A generation whose KV cache does not fit fails with the tier named, and
  leaves the ledger as it was (nothing half-allocated)."""
  model = hetflow.synthetic_model("llama-tiny")
  room = 10 * 2 * model.config.num_kv_heads * model.config.head_dim * 4  # ~10 tokens, 1 layer
  # No plan-time KV reserve (resident reserves max_position_embeddings by default),
  # so that the engine's own allocation of the cache is what is refused.
  engine = hetflow.Engine(model, budget=hetflow.Budget(device=model.nbytes + room),
                          options=dict(kv_reserve_tokens=0))
  before = engine.ledger.used("device")
  with pytest.raises(hetflow.BudgetExceeded, match="kv_cache"):
    engine.generate([[1, 2, 3]], max_new_tokens=40)
  assert engine.ledger.used("device") == before
  assert engine.generate([[1, 2]], max_new_tokens=1).tokens.shape == (1, 1)
