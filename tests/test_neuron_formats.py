"""neuron_cluster in every weight format: records of resident's quantized values, the
sparse step over them (native kernels and the pure-XLA fallback), and the store's format
in its identity (tiny sparse models)."""

import numpy as np
import pytest

import hetflow
from hetflow.engine import Engine
from hetflow.memory import bundle_store
from hetflow.memory.store import StoreMismatchError
from hetflow.models import native
from hetflow.sparsity import bundles
from hetflow.strategy import NotApplicable
from hetflow.testing.neuron_cache import assert_cache_holds_its_records
from strategies.neuron_cluster import cost

NEW_TOKENS = 8
ATOL = 1e-5  # float32 summation order (the parity tests' tolerance)


def _model(weights, name="llama-tiny-sparse"):
  return hetflow.synthetic_model(name, sparsity=0.9, hotness="zipf:1.1", seed=0,
                                 weights=weights)


@pytest.fixture(scope="module")
def ids():
  return np.random.default_rng(1).integers(3, 256, (2, 10))


def _neuron_calls() -> int:
  return int(native._registered.hetflow_neuron_calls()) if native._registered else 0


def _native_available() -> bool:
  return native.enabled()


@pytest.fixture(scope="module")
def references(ids):
  """weights -> (model, resident's tokens, its prompt logits, its one-token logits), made
  once per format for the module."""
  made = {}

  def get(weights):
    if weights not in made:
      model = _model(weights)
      with Engine(model, "resident") as engine:
        made[weights] = (model,
                         engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=()).tokens,
                         engine.forward(ids), engine.forward(ids[:, :1]))
    return made[weights]

  return get


@pytest.mark.parametrize("kernels", ["native", "xla"])
@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int4", "int8-g32", "int4-asym"])
def test_oracle_matches_resident_of_the_same_format(weights, kernels, ids, references,
                                                   monkeypatch):
  """Same weights, same tokens: greedy tokens equal resident's, logits (prompt: the dense
  prefill; one token: the dense step at decode size, native where built) within float32
  summation order; records read from disk, cached and gathered from the cache."""
  if kernels == "native" and not _native_available():
    pytest.skip("no C++ compiler: the native kernels are not built here")
  if kernels == "xla":
    monkeypatch.setenv("HETFLOW_NATIVE", "0")
  if kernels == "xla" and weights in ("int8-g32", "int4-asym"):
    pytest.skip("the fallback's formulation is the same for every kind; bfloat16, int8 and"
                " int4 cover it")
  model, tokens, logits, first = references(weights)
  before = _neuron_calls()
  # The fallback runs gather cached hits more often (gather_ratio 1): both paths are covered.
  options = dict(cache_bytes="64KiB", cluster_size=8, gather_ratio=1.0 if kernels == "xla"
                 else 4.0)
  with Engine(model, "neuron_cluster", options=options) as engine:
    out = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(ids), logits, atol=ATOL, rtol=0)
    np.testing.assert_allclose(engine.forward(ids[:, :1]), first, atol=ATOL, rtol=0)
    s = out.stats["strategy"].details
    assert s["disk_bytes_per_token"] > 0 and s["decode_tokens"] == NEW_TOKENS - 1
    assert s["cache"]["hot_hits"] > 0  # cached blocks computed (whole or gathered) too
    assert engine.strategy.store.weights == model.weights
  if kernels == "native":
    assert _neuron_calls() > before
  else:
    assert _neuron_calls() == before


@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int4"])
def test_opt_records_match_resident(weights, ids):
  """OPT's records (one input row, biases beside them) in each format."""
  model = _model(weights, "opt-tiny-sparse")
  with Engine(model, "resident") as engine:
    tokens = engine.generate(ids, max_new_tokens=NEW_TOKENS, stop_tokens=()).tokens
  with Engine(model, "neuron_cluster", options=dict(cache_bytes="64KiB", cluster_size=8)) as e:
    np.testing.assert_array_equal(e.generate(ids, max_new_tokens=NEW_TOKENS,
                                             stop_tokens=()).tokens, tokens)


@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int8-g32", "int4", "int4-asym"])
def test_native_step_equals_the_fallback(weights, monkeypatch):
  """The native kernels against the XLA formulation on random records (a block of 40,
  some not valid, records of several down-table groups, two input rows)."""
  if not _native_available():
    pytest.skip("no C++ compiler: the native kernels are not built here")
  model = _model(weights)
  c = model.config
  codec = bundles.record_codec(model)
  a, b, table = codec.encode(model, 1, bundles.neuron_matrices(c))
  rng = np.random.default_rng(0)
  pick = rng.choice(c.intermediate_size, 40, replace=False)
  group = codec.group if codec.grouped_down else c.intermediate_size
  args = (a[pick], b[pick], {k: v.astype(np.float32) for k, v in table.items()},
          (pick // group).astype(np.int32),
          rng.standard_normal((2, 1, c.hidden_size)).astype(np.float32), None,
          np.arange(40) < 33)
  step = lambda: bundles.quantized_step(c, codec, *args)  # noqa: E731 (traced fresh each call)
  before = _neuron_calls()
  got, fired = step()
  assert _neuron_calls() > before
  monkeypatch.setenv("HETFLOW_NATIVE", "0")
  want, want_fired = step()
  assert int(fired) == int(want_fired) > 0
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=1e-5)


def test_records_hold_residents_values():
  """A record decodes to exactly the model's stored (quantized) kernels' rows."""
  from hetflow.models import formats
  model = _model("int4")
  c = model.config
  codec = bundles.record_codec(model)
  a, b, table = codec.encode(model, 0, bundles.neuron_matrices(c))
  gate = np.asarray(formats.dequantize(model.param("layers/0/mlp/gate")))  # [D, F]
  down = np.asarray(formats.dequantize(model.param("layers/0/mlp/down")))  # [F, D]
  w_in = np.asarray(codec.input_weights(a))  # [F, 2, D]
  np.testing.assert_array_equal(w_in[:, 0], gate.T)
  group_of = (np.arange(c.intermediate_size) // codec.group).astype(np.int32)
  f32 = {k: v.astype(np.float32) for k, v in table.items()}
  np.testing.assert_array_equal(np.asarray(codec.down_weights(b, f32, group_of)), down)


def test_store_of_another_format_is_refused(tmp_path, ids):
  """The format is in the store's identity: an explicit store_dir of another format is
  refused (never reused, never deleted), and each format has its own default store."""
  path = str(tmp_path / "store")
  with Engine(_model("int4"), "neuron_cluster", options=dict(store_dir=path)) as engine:
    assert engine.strategy.store.weights == "int4"
    int4_default = bundle_store.default_store_dir(
        engine.model, engine.strategy.store.order, engine.strategy.mats)
    order, mats = engine.strategy.store.order, engine.strategy.mats
  for other in ("int8", "float32"):
    with pytest.raises(StoreMismatchError, match="weights"):
      Engine(_model(other), "neuron_cluster", options=dict(store_dir=path))
    assert bundle_store.default_store_dir(_model(other), order, mats) != int4_default
  assert bundle_store.BundleStore.open(path).weights == "int4"  # still there, unchanged


def test_records_are_smaller_and_the_plan_counts_them(ids):
  """Bytes per record by format (llama-tiny-sparse: D = 64, so every record is one 4 KiB
  page; the codec's unpadded bytes give the ratio) and the cost model's record and fixed
  region agree with the store's."""
  f32 = bundles.record_codec(_model("float32"))
  sizes = {w: bundles.record_codec(_model(w)) for w in ("bfloat16", "int8", "int4")}
  useful = {w: k.a_nbytes + k.b_nbytes for w, k in sizes.items()}
  full = f32.a_nbytes + f32.b_nbytes
  assert useful["bfloat16"] == full // 2
  assert useful["int8"] == full // 4 + 8  # two float32 row scales
  assert useful["int4"] < 0.16 * full
  model = _model("int4")
  with Engine(model, "neuron_cluster", options=dict(cache_bytes="64KiB")) as engine:
    s = engine.placement.settings.sizes
    assert s.record == engine.strategy.store.record_nbytes
    c = model.config
    kernels = sum(x.size * x.dtype.itemsize for n, x in model.shapes.items()
                  if n.startswith("layers/") and n.split("/")[3] in ("gate", "up", "down"))
    tables = c.num_layers * sizes["int4"].table_nbytes(c.intermediate_size)
    assert tables > 0 and s.fixed == model.nbytes - kernels + tables


def test_split_layout_is_float32s_ablation():
  with pytest.raises(NotApplicable, match="bundled"):
    Engine(_model("int4"), "neuron_cluster", options=dict(layout="split"))


def test_plan_sizes_of_llama_1b_sparse_by_format():
  """The cost model's record bytes at llama-1b-sparse's shape (no weights made)."""
  got = {}
  for w in ("float32", "bfloat16", "int8", "int4"):
    model = hetflow.synthetic_model("llama-1b-sparse", weights=w)
    got[w] = cost.plan_sizes(model, cost_options()).record
  assert got == {"float32": 24576, "bfloat16": 12288, "int8": 8192, "int4": 4096}


def cost_options():
  from strategies.neuron_cluster.strategy import NeuronClusterOptions
  return NeuronClusterOptions()


def test_a_checkpoint_loaded_as_int4_runs_neuron_cluster(tmp_path, ids):
  """The user's path: an HF checkpoint loaded with weights="int4" (quantized while the
  store is written, tensor by tensor), neuron_cluster giving resident's tokens."""
  path = hetflow.save_hf(_model("float32"), str(tmp_path / "ckpt"))
  model = hetflow.load_model(path, weights="int4")
  with Engine(model, "resident") as engine:
    tokens = engine.generate(ids[:1], max_new_tokens=6, stop_tokens=()).tokens
  with Engine(model, "neuron_cluster", options=dict(cache_bytes="64KiB", cluster_size=8)) as e:
    np.testing.assert_array_equal(e.generate(ids[:1], max_new_tokens=6, stop_tokens=()).tokens,
                                  tokens)
    assert e.strategy.store.weights == "int4"
    # 72-byte records: most of the pool's slices are not aligned for jax to alias them.
    assert assert_cache_holds_its_records(e.strategy) > 0
