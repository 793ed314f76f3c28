"""The disk stores under bad input and faults (issue 12's store items).

Every case asserts the error type, that the message names the input (the path,
the field that differs, the bytes), and that nothing was deleted or left
half-written: the user's files are intact and no `.partial-PID` / `.old-PID`
directory remains.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

import hetflow
from hetflow.engine import Engine
from hetflow.memory import (
  Budget,
  BudgetExceeded,
  InsufficientDiskSpaceError,
  LayerStore,
  NotAStoreError,
  StoreInUseError,
  StoreMismatchError,
  bundle_store,
)
from hetflow.memory import store as store_mod
from hetflow.memory.cache import cache_root
from hetflow.sparsity import bundles, stats
from hetflow.testing.files import snapshot

PROMPT = [[5, 6, 7, 8, 9, 10]]
NEW = 5
SPARSE = dict(sparsity=0.9, hotness="zipf:1.1")


@pytest.fixture(scope="module")
def calibrations(tmp_path_factory):
  """The synthetic sparse models' calibrations, computed once for the module."""
  return tmp_path_factory.mktemp("sparse-calibrations")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch, calibrations):
  """Each test gets its own cache root (default stores are written there)."""
  path = tmp_path / "cache"
  path.mkdir()
  os.symlink(calibrations, path / "sparse")
  monkeypatch.setenv("HETFLOW_CACHE", str(path))
  return path


def _leftovers(directory) -> list[str]:
  """Partial or replaced stores left in `directory` (none may remain)."""
  if not os.path.isdir(directory):
    return []
  return sorted(e for e in os.listdir(directory) if ".partial-" in e or ".old-" in e)


def _user_folder(path):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "thesis.txt"), "w") as f:
    f.write("four years of work")
  return snapshot(path)


def _sparse(seed=0, dtype=jnp.float32, **kw):
  return hetflow.synthetic_model("llama-tiny-sparse", seed=seed, dtype=dtype, **SPARSE, **kw)


@pytest.fixture(scope="module")
def sparse_stats(tmp_path_factory):
  """One stats file (the neuron order) shared by several models, as a user might."""
  model = hetflow.synthetic_model("llama-tiny-sparse", **SPARSE)
  s, _ = stats.record_activations(model, stats.calibration_ids(model.config, 256))
  path = str(tmp_path_factory.mktemp("stats") / "stats.npz")
  s.save(path)
  return path


def _tokens(model, strategy="resident", **options):
  with Engine(model, strategy, options=options or None) as engine:
    return engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens


def _neuron_options(store_dir, stats_path, **kw):
  return dict(store_dir=None if store_dir is None else str(store_dir), stats_path=stats_path,
              cache_bytes=0, **kw)


# -- writers never delete what hetflow did not write ---------------------------------------------


def test_neuron_cluster_refuses_an_ordinary_folder(tmp_path, sparse_stats):
  folder = tmp_path / "papers"
  before = _user_folder(folder)
  with pytest.raises(NotAStoreError, match="not a hetflow store; refusing to delete it") as e:
    Engine(_sparse(), "neuron_cluster", options=_neuron_options(folder, sparse_stats))
  assert str(folder) in str(e.value)
  assert snapshot(folder) == before and _leftovers(tmp_path) == []


def test_neuron_cluster_store_dir_dot_deletes_nothing(tmp_path, monkeypatch, sparse_stats):
  work = tmp_path / "work"
  before = _user_folder(work)
  monkeypatch.chdir(work)
  with pytest.raises(NotAStoreError) as e:
    Engine(_sparse(), "neuron_cluster", options=_neuron_options(".", sparse_stats))
  assert str(work) in str(e.value)
  assert snapshot(work) == before and _leftovers(tmp_path) == []


def test_neuron_cluster_writes_into_an_empty_folder(tmp_path, sparse_stats):
  folder = tmp_path / "empty"
  folder.mkdir()
  model = _sparse()
  want = _tokens(model)
  got = _tokens(model, "neuron_cluster", **_neuron_options(folder, sparse_stats))
  np.testing.assert_array_equal(got, want)
  assert store_mod.is_hetflow_store(str(folder)) and _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["layer", "neuron"])
def test_overwrite_refuses_folders_that_only_look_like_stores(tmp_path, kind):
  model = _sparse()
  folder = tmp_path / "site"
  before = _user_folder(folder)
  (folder / "manifest.json").write_text('{"name": "my web site"}')  # someone else's manifest
  before["manifest.json"] = (folder / "manifest.json").read_bytes()
  with pytest.raises(NotAStoreError) as e:
    if kind == "layer":
      store_mod.write_store(model, str(folder), progress=False, overwrite=True)
    else:
      order = np.tile(np.arange(model.config.intermediate_size), (model.config.num_layers, 1))
      bundle_store.write_store(str(folder), model, order, bundles.neuron_matrices(model.config),
                               overwrite=True)
  assert str(folder) in str(e.value)
  assert snapshot(folder) == before and _leftovers(tmp_path) == []


def test_a_file_is_never_replaced(tmp_path):
  victim = tmp_path / "notes.txt"
  victim.write_text("keep me")
  with pytest.raises(FileExistsError) as e:
    store_mod.open_store(_sparse(), str(victim), progress=False)
  assert str(victim) in str(e.value)
  with pytest.raises(NotAStoreError) as e:
    LayerStore.write(victim, {"a": {"x": np.ones(3)}}, progress=False, overwrite=True)
  assert str(victim) in str(e.value)
  assert victim.read_text() == "keep me" and _leftovers(tmp_path) == []


# -- a store holds one model: a mismatch is an error, never a silent reuse -----------------------


def test_bfloat16_run_on_a_float32_neuron_store_is_refused(tmp_path, sparse_stats):
  path = tmp_path / "bundles"
  f32 = _sparse()
  np.testing.assert_array_equal(
      _tokens(f32, "neuron_cluster", **_neuron_options(path, sparse_stats)), _tokens(f32))
  before = snapshot(path)
  with pytest.raises(StoreMismatchError) as e:
    Engine(_sparse(dtype=jnp.bfloat16), "neuron_cluster",
           options=_neuron_options(path, sparse_stats))
  msg = str(e.value)
  assert str(path) in msg and "dtype" in msg and "bfloat16" in msg and "float32" in msg
  assert snapshot(path) == before and _leftovers(tmp_path) == []


def test_another_seed_with_the_same_stats_file_is_refused(tmp_path, sparse_stats):
  path = tmp_path / "bundles"
  _tokens(_sparse(seed=0), "neuron_cluster", **_neuron_options(path, sparse_stats))
  before = snapshot(path)
  with pytest.raises(StoreMismatchError) as e:
    Engine(_sparse(seed=1), "neuron_cluster", options=_neuron_options(path, sparse_stats))
  assert str(path) in str(e.value) and "seed" in str(e.value)
  assert snapshot(path) == before and _leftovers(tmp_path) == []


def test_default_neuron_stores_are_keyed_by_model(sparse_stats):
  """Without store_dir each model gets its own store in the cache, and its own tokens."""
  for model in (_sparse(seed=0), _sparse(seed=1), _sparse(dtype=jnp.bfloat16)):
    got = _tokens(model, "neuron_cluster", **_neuron_options(None, sparse_stats))
    np.testing.assert_array_equal(got, _tokens(model))
  stores = os.listdir(os.path.join(cache_root(), "neuron_stores"))
  assert len(stores) == 3 and _leftovers(os.path.join(cache_root(), "neuron_stores")) == []


def test_a_neuron_store_is_not_a_layer_store(tmp_path, sparse_stats):
  path = tmp_path / "bundles"
  model = _sparse()
  _tokens(model, "neuron_cluster", **_neuron_options(path, sparse_stats))
  before = snapshot(path)
  with pytest.raises(StoreMismatchError) as e:
    Engine(model, "layerwise", options=dict(store_dir=str(path)))
  assert str(path) in str(e.value)
  layer = tmp_path / "layers"
  store_mod.write_store(model, str(layer), progress=False)
  with pytest.raises(StoreMismatchError, match="not a neuron-bundle store") as e:
    Engine(model, "neuron_cluster", options=_neuron_options(layer, sparse_stats))
  assert str(layer) in str(e.value)
  assert snapshot(path) == before and _leftovers(tmp_path) == []


@pytest.mark.parametrize("change", [dict(noise=0.3), dict(rank=8)], ids=["noise", "rank"])
def test_layer_store_key_includes_the_sparse_settings(tmp_path, change):
  base, changed = _sparse(), _sparse(**change)
  assert store_mod.default_store_dir(base) != store_mod.default_store_dir(changed)
  # The default store of each gives that model's tokens (no reuse of the other's).
  for model in (base, changed):
    np.testing.assert_array_equal(_tokens(model, "layerwise"), _tokens(model))
  assert len(os.listdir(os.path.join(cache_root(), "stores"))) == 2
  # An explicit store of one is refused for the other, naming what differs.
  path = tmp_path / "store"
  store_mod.write_store(base, str(path), progress=False)
  before = snapshot(path)
  with pytest.raises(StoreMismatchError) as e:
    Engine(changed, "layerwise", options=dict(store_dir=str(path)))
  assert str(path) in str(e.value) and next(iter(change)) in str(e.value)
  assert snapshot(path) == before and _leftovers(tmp_path) == []


def test_layer_store_of_another_dtype_is_refused(tmp_path):
  path = tmp_path / "store"
  store_mod.write_store(hetflow.synthetic_model("opt-tiny"), str(path), progress=False)
  before = snapshot(path)
  with pytest.raises(StoreMismatchError) as e:
    Engine(hetflow.synthetic_model("opt-tiny", dtype=jnp.bfloat16), "layerwise",
           options=dict(store_dir=str(path)))
  assert str(path) in str(e.value) and "bfloat16" in str(e.value)
  assert snapshot(path) == before


def test_a_store_without_a_fingerprint_is_refused(tmp_path):
  """Stores written before fingerprints existed are not trusted blindly."""
  model = hetflow.synthetic_model("llama-tiny")
  path = tmp_path / "old"
  groups = [(g, model.group_tensors(g)) for g in model.group_names() if model.group_nbytes(g)]
  LayerStore.write(path, groups, progress=False, metadata={"fingerprint": "0" * 64})
  with pytest.raises(StoreMismatchError, match="no fingerprint") as e:
    store_mod.open_store(model, str(path))
  assert str(path) in str(e.value)


# -- a store in use is never replaced ------------------------------------------------------------


def test_overwrite_under_a_running_layerwise_engine_is_refused(tmp_path):
  model = hetflow.synthetic_model("llama-tiny")
  other = hetflow.synthetic_model("llama-tiny", seed=1)
  want = _tokens(model)
  path = tmp_path / "store"
  store_mod.write_store(model, str(path), progress=False)
  with Engine(model, "layerwise", options=dict(store_dir=str(path))) as engine:
    np.testing.assert_array_equal(
        engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens, want)
    before = snapshot(path)
    # What `experiments.convert --overwrite` calls, and the generic writer.
    with pytest.raises(StoreInUseError) as e:
      store_mod.write_store(other, str(path), progress=False, overwrite=True)
    assert str(path) in str(e.value)
    with pytest.raises(StoreInUseError):
      LayerStore.write(path, {"a": {"x": np.ones(3)}}, progress=False, overwrite=True)
    # A second engine may read it at the same time.
    with Engine(model, "layerwise", options=dict(store_dir=str(path))) as second:
      np.testing.assert_array_equal(
          second.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens, want)
    np.testing.assert_array_equal(
        engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens, want)
    assert snapshot(path) == before and _leftovers(tmp_path) == []
  # Once the engines are closed the store may be replaced.
  store_mod.write_store(other, str(path), progress=False, overwrite=True)
  np.testing.assert_array_equal(
      _tokens(other, "layerwise", store_dir=str(path)), _tokens(other))
  assert _leftovers(tmp_path) == []


def test_overwrite_under_a_running_neuron_engine_is_refused(tmp_path, sparse_stats):
  model = _sparse()
  want = _tokens(model)
  path = tmp_path / "bundles"
  options = _neuron_options(path, sparse_stats)
  with Engine(model, "neuron_cluster", options=options) as engine:
    before = snapshot(path)
    order = np.tile(np.arange(model.config.intermediate_size), (model.config.num_layers, 1))
    with pytest.raises(StoreInUseError) as e:
      bundle_store.write_store(str(path), _sparse(seed=1), order,
                               bundles.neuron_matrices(model.config), overwrite=True)
    assert str(path) in str(e.value)
    np.testing.assert_array_equal(
        engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens, want)
    assert snapshot(path) == before and _leftovers(tmp_path) == []


def test_another_process_cannot_replace_a_store_in_use(tmp_path):
  model = hetflow.synthetic_model("llama-tiny")
  path = tmp_path / "store"
  store_mod.write_store(model, str(path), progress=False)
  script = textwrap.dedent(f"""
      import hetflow
      from hetflow.memory import StoreInUseError
      from hetflow.memory.store import write_store
      try:
        write_store(hetflow.synthetic_model("llama-tiny", seed=1), {str(path)!r},
                    progress=False, overwrite=True)
      except StoreInUseError as e:
        print("REFUSED", e)
      else:
        print("REPLACED")
      """)
  with Engine(model, "layerwise", options=dict(store_dir=str(path))) as engine:
    before = snapshot(path)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "REFUSED" in out.stdout and str(path) in out.stdout, out.stdout + out.stderr
    np.testing.assert_array_equal(
        engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens, _tokens(model))
  assert snapshot(path) == before and _leftovers(tmp_path) == []


# -- leaks and leftovers -------------------------------------------------------------------------


def test_default_neuron_store_lives_in_the_cache_and_is_reused(sparse_stats):
  model = _sparse()
  options = _neuron_options(None, sparse_stats)
  with Engine(model, "neuron_cluster", options=options) as engine:
    path = engine.strategy.store.path
  assert path.startswith(os.path.join(cache_root(), "neuron_stores") + os.sep)
  assert store_mod.is_hetflow_store(path)  # close() keeps the cached store
  stamp = os.stat(os.path.join(path, "manifest.json")).st_mtime_ns
  with Engine(model, "neuron_cluster", options=options) as engine:
    assert engine.strategy.store.path == path
  assert os.stat(os.path.join(path, "manifest.json")).st_mtime_ns == stamp  # not rewritten


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_stale_partials_of_killed_writers_are_removed(tmp_path, sparse_stats):
  model = _sparse()
  path = tmp_path / "bundles"
  dead = _dead_pid()
  for suffix in (f".partial-{dead}", f".old-{dead}"):
    os.makedirs(f"{path}{suffix}")
    with open(os.path.join(f"{path}{suffix}", "layer.bin"), "wb") as f:
      f.write(b"\0" * 4096)
  alive = f"{path}.partial-{os.getppid()}"  # a live writer's partial stays
  os.makedirs(alive)
  _tokens(model, "neuron_cluster", **_neuron_options(path, sparse_stats))
  assert _leftovers(tmp_path) == [os.path.basename(alive)]


def test_a_killed_neuron_store_write_is_cleaned_up_next_time(tmp_path, sparse_stats):
  """A writer killed with SIGKILL leaves its partial; the next write removes it."""
  path = tmp_path / "bundles"
  script = textwrap.dedent(f"""
      import time
      import numpy as np
      from hetflow.memory import LayerStore

      def groups():
        yield "layers/0", {{"records": np.zeros(1 << 16, np.uint8)}}
        print("WRITING", flush=True)
        time.sleep(600)

      LayerStore.write({str(path)!r}, groups(), progress=False)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "WRITING"
    deadline = time.monotonic() + 60
    while not _leftovers(tmp_path) and time.monotonic() < deadline:
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert _leftovers(tmp_path) == [f"bundles.partial-{proc.pid}"]
  model = _sparse()
  np.testing.assert_array_equal(
      _tokens(model, "neuron_cluster", **_neuron_options(path, sparse_stats)), _tokens(model))
  assert _leftovers(tmp_path) == []


# -- the disk budget is kept ---------------------------------------------------------------------


def test_layerwise_counts_its_whole_store_in_the_disk_tier(tmp_path):
  model = hetflow.synthetic_model("llama-tiny")
  path = tmp_path / "store"
  options = dict(store_dir=str(path), resident_layers=1)
  need = store_mod.store_nbytes(model)
  with Engine(model, "layerwise", budget=Budget(disk=need), options=options) as engine:
    store, = engine.strategy._stores
    assert store.total_nbytes == need  # embed, head and the resident layer included
    assert engine.placement.bytes_per_tier()["disk"] == need
    assert engine.ledger.used("disk") == need
  with pytest.raises(BudgetExceeded, match="disk") as e:
    Engine(hetflow.synthetic_model("llama-tiny", seed=2), "layerwise",
           budget=Budget(disk=need - 1), options=dict(store_dir=str(tmp_path / "other")))
  assert e.value.minimum == need
  assert not os.path.exists(tmp_path / "other") and _leftovers(tmp_path) == []


def test_neuron_cluster_counts_its_store_in_the_disk_tier(tmp_path, sparse_stats):
  model = _sparse()
  c = model.config
  path = tmp_path / "bundles"
  with Engine(model, "neuron_cluster", options=_neuron_options(path, sparse_stats)) as engine:
    store = engine.strategy.store
    on_disk = sum(os.path.getsize(store.store.file(g)) for g in store.store.groups)
    assert store.total_nbytes == on_disk
    assert engine.placement.bytes_per_tier()["disk"] == on_disk
    assert engine.ledger.used("disk") == on_disk
  need = bundle_store.store_nbytes(c.num_layers, c.intermediate_size, store.record_nbytes)
  assert need == on_disk
  other = tmp_path / "other"
  with pytest.raises(BudgetExceeded, match="disk") as e:
    Engine(model, "neuron_cluster", budget=Budget(disk=need - 1),
           options=_neuron_options(other, sparse_stats))
  assert e.value.minimum == need
  assert not os.path.exists(other) and _leftovers(tmp_path) == []


# -- free space is checked before writing --------------------------------------------------------


@pytest.mark.parametrize("kind", ["layer", "neuron", "generic"])
def test_a_full_disk_is_refused_before_writing(tmp_path, monkeypatch, kind, sparse_stats):
  model = _sparse()
  monkeypatch.setattr(store_mod, "free_bytes", lambda path: 12_345)
  path = tmp_path / "store"
  with pytest.raises(InsufficientDiskSpaceError) as e:
    if kind == "layer":
      store_mod.write_store(model, str(path), progress=False)
    elif kind == "neuron":
      Engine(model, "neuron_cluster", options=_neuron_options(path, sparse_stats))
    else:
      LayerStore.write(path, {"a": {"x": np.ones(1 << 20)}}, progress=False)
  msg = str(e.value)
  assert str(path) in msg and "12345 bytes" in msg and "needs" in msg
  assert e.value.errno == 28  # ENOSPC
  assert not os.path.exists(path) and _leftovers(tmp_path) == []


def test_the_disk_filling_up_mid_write_leaves_nothing(tmp_path, monkeypatch):
  real = store_mod._write_group
  calls = []

  def fill_up(directory, index, gname, tensors, bar):
    calls.append(gname)
    if len(calls) == 3:
      raise OSError(28, "No space left on device")
    return real(directory, index, gname, tensors, bar)

  monkeypatch.setattr(store_mod, "_write_group", fill_up)
  model = hetflow.synthetic_model("llama-tiny")
  path = tmp_path / "store"
  with pytest.raises(InsufficientDiskSpaceError) as e:
    store_mod.write_store(model, str(path), progress=False)
  assert str(path) in str(e.value) and str(store_mod.store_nbytes(model)) in str(e.value)
  assert not os.path.exists(path) and _leftovers(tmp_path) == []
