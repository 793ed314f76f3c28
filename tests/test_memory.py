"""Tests for hetflow.memory: budgets, ledger, buffers, tiers, store, reader, limit."""

import concurrent.futures
import errno
import json
import os
import threading
import types
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from hetflow import memory
from hetflow.memory import (
  PAGE,
  Budget,
  BudgetExceeded,
  IncompleteStoreError,
  LayerStore,
  MemoryLedger,
  MemoryLimit,
  ReaderPool,
  ReadError,
  StoreView,
  aligned_empty,
  format_bytes,
  parse_bytes,
  view_as,
)
from hetflow.memory import reader as reader_mod

MiB = 2**20
GiB = 2**30


# -- budget -------------------------------------------------------------------


@pytest.mark.parametrize(
  "x, expected",
  [
    (4096, 4096),
    ("4096", 4096),
    ("512MiB", 512 * MiB),
    ("2GB", 2 * 10**9),
    ("1.5 GiB", 3 * GiB // 2),
    ("1.5gib", 3 * GiB // 2),
    ("10 kB", 10_000),
    ("3KiB", 3072),
    ("7B", 7),
    ("1e3", 1000),
    (2.0, 2),
    ("0", 0),
  ],
)
def test_parse_bytes(x, expected):
  assert parse_bytes(x) == expected


@pytest.mark.parametrize("bad", ["12 parsecs", "GiB", "", "1.2.3MB", "-5MiB", "5 MiBs", "ten"])
def test_parse_bytes_bad_strings_name_the_string_and_units(bad):
  with pytest.raises(ValueError) as e:
    parse_bytes(bad)
  msg = str(e.value)
  assert repr(bad) in msg or bad in msg
  if bad != "-5MiB":
    assert "GiB" in msg and "MB" in msg  # lists the accepted units


@pytest.mark.parametrize("bad", [-1, True, None, [1], float("nan")])
def test_parse_bytes_bad_values(bad):
  with pytest.raises(ValueError):
    parse_bytes(bad)


def test_format_bytes():
  assert format_bytes(3 * GiB // 2) == "1.50 GiB"
  assert format_bytes(96 * MiB) == "96.00 MiB"
  assert format_bytes(100) == "100 B"
  assert format_bytes(None) == "unlimited"


def test_budget_accepts_strings_and_from_any():
  b = Budget(device="512MiB", host="4GiB")
  assert (b.device, b.host, b.disk) == (512 * MiB, 4 * GiB, None)
  assert Budget.from_any(None) == Budget()
  assert Budget.from_any(b) is b
  assert Budget.from_any({"host": "1GiB"}) == Budget(host=GiB)
  cfg = ml_collections.ConfigDict({"device": "1MiB", "host": None, "disk": 10})
  assert Budget.from_any(cfg) == Budget(device=MiB, disk=10)
  assert Budget.from_any(ml_collections.FrozenConfigDict(cfg)) == Budget(device=MiB, disk=10)
  with pytest.raises(ValueError, match="gpu"):
    Budget.from_any({"gpu": "1GiB"})
  with pytest.raises(ValueError, match="Budget.host"):
    Budget(host="lots")
  with pytest.raises(TypeError):
    Budget.from_any(5)
  with pytest.raises(dataclasses_frozen_error()):
    b.host = 1


def dataclasses_frozen_error():
  import dataclasses

  return dataclasses.FrozenInstanceError


# -- ledger -------------------------------------------------------------------


def test_ledger_refuses_over_budget_and_leaves_usage_unchanged():
  ledger = MemoryLedger(Budget(host="2GiB"))
  first = ledger.allocate("host", int(1.9 * GiB), "layers/2")
  before = ledger.summary()
  with pytest.raises(BudgetExceeded) as e:
    ledger.allocate("host", 200 * MiB, "layers/3")
  err = e.value
  assert isinstance(err, MemoryError)
  assert (err.tier, err.requested, err.in_use, err.budget, err.group) == (
    "host",
    200 * MiB,
    first.nbytes,
    2 * GiB,
    "layers/3",
  )
  msg = str(err)
  assert "host tier over budget" in msg
  assert "'layers/3'" in msg and "200.00 MiB" in msg and "2.00 GiB" in msg and "1.90 GiB" in msg
  assert ledger.summary() == before
  assert ledger.used("host") == first.nbytes
  assert len(ledger.live()) == 1
  # A planner fills in the smallest working budget; the message follows.
  err.minimum = int(2.31 * GiB)
  assert "smallest host budget that works for this plan is 2.31 GiB" in str(err)
  assert "Budget(host=...)" in str(err)


def test_ledger_check_peaks_groups_release():
  ledger = MemoryLedger({"device": "10MiB"})
  assert ledger.check("device", 10 * MiB)
  assert not ledger.check("device", 10 * MiB + 1)
  assert ledger.check("host", 10**15)  # unlimited
  a = ledger.allocate("device", 6 * MiB, "layers/0")
  b = ledger.allocate("device", 3 * MiB, "layers/1")
  c = ledger.allocate("host", 5 * MiB, "layers/1")
  assert not ledger.check("device", 2 * MiB)
  assert ledger.headroom("device") == MiB
  assert ledger.used_by_group() == {"layers/0": 6 * MiB, "layers/1": 8 * MiB}
  assert ledger.used_by_group("device") == {"layers/0": 6 * MiB, "layers/1": 3 * MiB}
  ledger.release(a)
  assert ledger.used("device") == 3 * MiB
  assert ledger.peak("device") == 9 * MiB
  d = ledger.allocate("device", 5 * MiB, "layers/2")
  assert ledger.peak("device") == 9 * MiB
  s = ledger.summary()
  assert s["tiers"]["device"] == {"used": 8 * MiB, "peak": 9 * MiB, "budget": 10 * MiB}
  assert s["tiers"]["host"] == {"used": 5 * MiB, "peak": 5 * MiB, "budget": None}
  assert s["groups"]["layers/0"]["device"] == {"used": 0, "peak": 6 * MiB}
  assert s["groups"]["layers/1"]["host"]["peak"] == 5 * MiB
  json.dumps(s)
  ledger.reset_peaks()
  assert ledger.peak("device") == 8 * MiB
  assert ledger.summary()["groups"]["layers/0"]["device"]["peak"] == 0
  with pytest.raises(ValueError, match="not live"):
    ledger.release(a)  # twice
  for x in (b, c, d):
    ledger.release(x)
  assert ledger.used("device") == ledger.used("host") == 0
  with pytest.raises(ValueError, match="tier"):
    ledger.allocate("gpu", 1)
  with pytest.raises(ValueError):
    ledger.allocate("host", -1)
  with ledger.hold("device", 4 * MiB, "tmp") as h:
    assert ledger.used("device") == 4 * MiB and h.group == "tmp"
  assert ledger.used("device") == 0


def test_ledger_thread_safe():
  ledger = MemoryLedger(Budget(host=1000))
  refused = []

  def work():
    for _ in range(2000):
      try:
        a = ledger.allocate("host", 7, "g")
      except BudgetExceeded:
        refused.append(1)
        continue
      assert ledger.used("host") <= 1000
      ledger.release(a)

  threads = [threading.Thread(target=work) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert ledger.used("host") == 0
  assert ledger.peak("host") <= 1000


# -- buffers and tiers ---------------------------------------------------------


@pytest.mark.parametrize("nbytes", [1, 4096, 12345, 3 * MiB + 5])
@pytest.mark.parametrize("alignment", [64, 4096, 1 << 21])
def test_aligned_empty(nbytes, alignment):
  buf = aligned_empty(nbytes, alignment)
  assert buf.dtype == np.uint8 and buf.shape == (nbytes,) and buf.flags.writeable
  assert buf.ctypes.data % alignment == 0
  buf[:] = 7  # writable end to end
  assert aligned_empty(0).nbytes == 0
  with pytest.raises(ValueError):
    aligned_empty(10, 3000)


def test_view_as_including_bfloat16():
  buf = aligned_empty(3 * PAGE)
  src = np.arange(12, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(3, 4)
  v = view_as(buf, PAGE, (3, 4), "bfloat16")
  v[...] = src
  assert v.dtype == ml_dtypes.bfloat16
  assert np.shares_memory(v, buf)
  np.testing.assert_array_equal(view_as(buf, PAGE, (3, 4), ml_dtypes.bfloat16), src)
  w = view_as(buf, 0, (2, 2), np.float32)
  assert w.shape == (2, 2)
  with pytest.raises(ValueError, match="runs past"):
    view_as(buf, 2 * PAGE, (PAGE,), np.float32)
  with pytest.raises(ValueError, match="aligned"):
    view_as(buf, 2, (2,), np.float32)


def test_device_put_of_aligned_buffer_aliases_on_cpu():
  """Observed on jax 0.10.2 CPU: device_put of an aligned numpy array does not copy.

  This is why buffers.py states the reuse rule: refilling the buffer changes
  the jax array. jnp.asarray copies.
  """
  if jax.default_backend() != "cpu":
    pytest.skip("aliasing is a CPU-backend fact")
  buf = aligned_empty(4 * PAGE)
  x_np = view_as(buf, PAGE, (16, 16), np.float32)
  x_np[...] = 1.0
  for sharding in (None, memory.device_sharding(), memory.host_sharding()):
    x = jax.device_put(x_np, sharding) if sharding else jax.device_put(x_np)
    x.block_until_ready()
    assert x.unsafe_buffer_pointer() == x_np.ctypes.data  # aliased, no copy
  x = jax.device_put(x_np)
  x_np[0, 0] = 5.0  # refilling the buffer mutates the live jax array
  assert float(x[0, 0]) == 5.0
  y = jnp.asarray(x_np)
  assert y.unsafe_buffer_pointer() != x_np.ctypes.data  # a copy
  bf = view_as(buf, 2 * PAGE, (8,), "bfloat16")
  assert jax.device_put(bf).unsafe_buffer_pointer() == bf.ctypes.data


def test_memory_kinds_and_shardings():
  kinds = memory.memory_kinds()
  assert "device" in kinds
  kind = memory.host_memory_kind()
  if jax.default_backend() == "cpu":
    assert set(kinds) >= {"device", "pinned_host", "unpinned_host"}
    assert kind == "pinned_host"
  assert memory.device_sharding().memory_kind == "device"
  assert memory.host_sharding().memory_kind == kind
  assert memory.sharding_for_tier("host").memory_kind == kind
  x = jax.device_put(np.ones(4, np.float32), memory.host_sharding())
  assert x.sharding.memory_kind == kind
  y = jax.device_put(x, memory.device_sharding())
  assert y.sharding.memory_kind == "device"
  with pytest.raises(ValueError):
    memory.sharding_for_tier("disk")


# -- store --------------------------------------------------------------------


def _groups(rng, sizes=((3, 5), (100, 33), (4096,), (17, 257))):
  out = []
  for i, shape in enumerate(sizes):
    out.append(
      (
        f"layers/{i}",
        {
          "attn/q": rng.standard_normal(shape).astype(np.float32),
          "mlp/up": rng.standard_normal(shape).astype(ml_dtypes.bfloat16),
          "norm": rng.integers(0, 100, size=(7,), dtype=np.int8),
        },
      )
    )
  out.append(("embed", {"table": rng.standard_normal((64, 16)).astype(np.float16)}))
  return out


def test_store_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  groups = _groups(rng)
  store = LayerStore.write(tmp_path / "store", groups, progress=False, metadata={"model": "x"})
  assert store.groups == tuple(g for g, _ in groups)
  assert store.metadata == {"model": "x"}
  reopened = LayerStore.open(tmp_path / "store")
  for gname, tensors in groups:
    size = os.path.getsize(reopened.file(gname))
    assert size % PAGE == 0 and size == reopened.group_nbytes(gname)
    infos = reopened.tensors(gname)
    assert list(infos) == list(tensors)
    for tname, arr in tensors.items():
      info = infos[tname]
      assert info.offset % PAGE == 0
      assert info.offset + info.nbytes <= size
      assert info.shape == arr.shape and info.dtype == arr.dtype and info.nbytes == arr.nbytes
    loaded = reopened.load(gname)
    for tname, arr in tensors.items():
      assert loaded[tname].dtype == arr.dtype
      np.testing.assert_array_equal(loaded[tname], arr)
  manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
  assert manifest["complete"] is True
  assert manifest["groups"]["layers/1"]["tensors"]["mlp/up"]["dtype"] == "bfloat16"
  assert store.total_nbytes == sum(store.group_nbytes(g) for g in store.groups)
  assert sorted(os.listdir(tmp_path)) == ["store"]


def test_store_write_is_atomic_on_exception(tmp_path):
  rng = np.random.default_rng(1)

  def gen():
    yield "layers/0", {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    yield "layers/1", {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    raise RuntimeError("conversion failed mid-way")

  with pytest.raises(RuntimeError, match="mid-way"):
    LayerStore.write(tmp_path / "store", gen(), progress=False)
  assert os.listdir(tmp_path) == []

  def gen_interrupt():
    yield "layers/0", {"w": np.zeros(10, np.float32)}
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    LayerStore.write(tmp_path / "store", gen_interrupt(), progress=False)
  assert os.listdir(tmp_path) == []


def test_store_refuses_incomplete_and_overwrite(tmp_path):
  path = tmp_path / "store"
  LayerStore.write(path, [("a", {"x": np.ones(3, np.float32)})], progress=False)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    LayerStore.write(path, [("a", {"x": np.ones(3, np.float32)})], progress=False)
  store = LayerStore.write(
    path, [("b", {"y": np.zeros(5, np.int32)})], progress=False, overwrite=True
  )
  assert store.groups == ("b",)
  store = LayerStore.write(path, {"c": {"z": np.ones(2)}}, progress=False, overwrite=True)
  assert store.groups == ("c",)
  assert sorted(os.listdir(tmp_path)) == ["store"]

  # A manifest marked incomplete.
  manifest_path = path / "manifest.json"
  m = json.loads(manifest_path.read_text())
  m["complete"] = False
  manifest_path.write_text(json.dumps(m))
  with pytest.raises(IncompleteStoreError) as e:
    LayerStore.open(path)
  assert "incomplete (interrupted conversion?)" in str(e.value)
  assert "python -m experiments.convert" in str(e.value) and str(path) in str(e.value)
  # No manifest at all.
  manifest_path.unlink()
  with pytest.raises(IncompleteStoreError, match="incomplete"):
    LayerStore.open(path)
  # A truncated group file.
  m["complete"] = True
  manifest_path.write_text(json.dumps(m))
  LayerStore.open(path)
  os.truncate(store.file("c"), 10)
  with pytest.raises(IncompleteStoreError, match="manifest says"):
    LayerStore.open(path)
  with pytest.raises(FileNotFoundError):
    LayerStore.open(tmp_path / "nothing")
  # Never deletes a directory that is not a store.
  other = tmp_path / "mine"
  other.mkdir()
  (other / "precious.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not a hetflow store"):
    LayerStore.write(other, [("a", {"x": np.ones(1)})], progress=False, overwrite=True)
  assert (other / "precious.txt").exists()


def test_store_rejects_duplicates(tmp_path):
  with pytest.raises(ValueError, match="duplicate group"):
    LayerStore.write(
      tmp_path / "s", [("a", {"x": np.ones(1)}), ("a", {"x": np.ones(1)})], progress=False
    )
  assert os.listdir(tmp_path) == []


# -- reader -------------------------------------------------------------------


def _random_file(path, nbytes, seed=0):
  data = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
  data.tofile(path)
  return data


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 4097, 100_000, 3 * MiB + 123])
@pytest.mark.parametrize("chunk", [PAGE, 64 * 1024, MiB])
def test_reader_reads_exact_bytes(tmp_path, nbytes, chunk):
  path = tmp_path / "f.bin"
  data = _random_file(path, nbytes + 2 * PAGE, seed=nbytes)
  with ReaderPool(num_workers=3) as pool:
    # Exact-size buffer: the tail goes through the bounce page.
    buf = aligned_empty(nbytes)
    assert pool.read_into(path, 0, buf, chunk=chunk).result(timeout=30) == nbytes
    np.testing.assert_array_equal(buf, data[:nbytes])
    # Roomy buffer, offset into the file.
    buf2 = aligned_empty(nbytes + PAGE)
    pool.read_into(path, PAGE, buf2, nbytes=nbytes, chunk=chunk).result(timeout=30)
    np.testing.assert_array_equal(buf2[:nbytes], data[PAGE : PAGE + nbytes])
    record = pool.record()
    assert record.bytes == 2 * nbytes
    assert record.calls == 2
    assert record.direct and record.direct_requests == record.requests > 0
    assert record.fallbacks == ()


def test_reader_concurrent_reads(tmp_path):
  files = [tmp_path / f"f{i}.bin" for i in range(6)]
  datas = [_random_file(f, 300_000 + 4096 * i, seed=i) for i, f in enumerate(files)]
  with ReaderPool(num_workers=4) as pool:
    bufs = [aligned_empty(d.nbytes) for d in datas]
    futs = [pool.read_into(f, 0, b, chunk=PAGE * 8) for f, b in zip(files, bufs, strict=True)]
    concurrent.futures.wait(futs, timeout=30)
    for fut, b, d in zip(futs, bufs, datas, strict=True):
      assert fut.result() == d.nbytes
      np.testing.assert_array_equal(b, d)
    assert pool.record().calls == 6
    assert pool.record().seconds > 0


def test_reader_short_read_raises_naming_file(tmp_path):
  path = tmp_path / "short.bin"
  _random_file(path, 10_000)
  with ReaderPool(num_workers=2) as pool:
    buf = aligned_empty(64 * 1024)
    fut = pool.read_into(path, 0, buf, chunk=PAGE)
    with pytest.raises(ReadError) as e:
      fut.result(timeout=10)  # a hang would fail here, not block forever
    msg = str(e.value)
    assert str(path) in msg and "expected" in msg and "got" in msg and "offset" in msg
    # Reading entirely past the end: got 0, not silent zeros.
    with pytest.raises(ReadError, match="got 0"):
      pool.read_into(path, 16 * PAGE, buf, nbytes=PAGE).result(timeout=10)


def test_reader_truncated_store_group(tmp_path):
  rng = np.random.default_rng(2)
  store = LayerStore.write(tmp_path / "s", _groups(rng), progress=False)
  with ReaderPool(num_workers=2) as pool:
    buf = aligned_empty(store.max_group_nbytes)
    for g in store.groups:
      pool.read_group(store, g, buf).result(timeout=10)
      view = StoreView(store, g, buf)
      assert set(view) == set(store.tensors(g))
      for name, arr in store.load(g).items():
        np.testing.assert_array_equal(view[name], arr)
        assert np.shares_memory(view[name], buf)
    info = store.tensors("layers/1")["mlp/up"]
    tbuf = aligned_empty(info.nbytes)
    pool.read_tensor(store, "layers/1", "mlp/up", tbuf).result(timeout=10)
    np.testing.assert_array_equal(
      view_as(tbuf, 0, info.shape, info.dtype), store.load("layers/1")["mlp/up"]
    )
    os.truncate(store.file("layers/1"), PAGE)
    with pytest.raises(ReadError, match="layers.1"):
      pool.read_group(store, "layers/1", buf).result(timeout=10)


def test_reader_rejects_misaligned_and_uses_direct(tmp_path):
  path = tmp_path / "f.bin"
  _random_file(path, 3 * PAGE)
  with ReaderPool(num_workers=1) as pool:
    assert pool.direct  # ext4 and recent tmpfs accept O_DIRECT
    raw = aligned_empty(2 * PAGE + 1)[1:]
    with pytest.raises(ValueError, match="aligned"):
      pool.read_into(path, 0, raw)
    with pytest.raises(ValueError, match="aligned"):
      pool.read_into(path, 100, aligned_empty(PAGE))
    with pytest.raises(ValueError, match="uint8"):
      pool.read_into(path, 0, np.zeros(10, np.float32))
  with pytest.raises(RuntimeError, match="closed"):
    pool.read_into(path, 0, aligned_empty(PAGE))


def _refuse_o_direct(monkeypatch):
  """Opens with O_DIRECT fail with EINVAL, as on filesystems without it (tmpfs)."""
  real_open = os.open

  def refusing_open(p, flags, *a, **k):
    if flags & getattr(os, "O_DIRECT", 0):
      raise OSError(errno.EINVAL, "Invalid argument")
    return real_open(p, flags, *a, **k)

  monkeypatch.setattr(reader_mod.os, "open", refusing_open)


def test_reader_falls_back_when_o_direct_refused(tmp_path, monkeypatch):
  path = tmp_path / "f.bin"
  data = _random_file(path, 10_000)
  _refuse_o_direct(monkeypatch)
  with ReaderPool(num_workers=2) as pool:
    with pytest.warns(RuntimeWarning, match="O_DIRECT refused"):
      fut = pool.read_into(path, 0, aligned_empty(10_000), chunk=PAGE)
    fut.result(timeout=10)
    record = pool.record()
    assert pool.direct is False and record.direct is False
    assert record.buffered_requests == record.requests > 0 and record.direct_requests == 0
    assert len(record.fallbacks) == 1 and record.fallbacks[0].startswith(f"{path}: ")
    # Buffered reads need no alignment, and warn only once.
    buf = np.zeros(5000, np.uint8)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      pool.read_into(tmp_path / "f.bin", 123, buf).result(timeout=10)
    np.testing.assert_array_equal(buf, data[123:5123])


def test_coalesce_requests_merges_only_what_is_adjacent_in_file_and_buffer():
  reqs = [(0, PAGE, 0), (PAGE, PAGE, PAGE), (2 * PAGE, PAGE, 2 * PAGE),  # one run
          (5 * PAGE, PAGE, 3 * PAGE),  # a gap in the file
          (6 * PAGE, PAGE, 5 * PAGE)]  # adjacent in the file, not in the buffer
  assert memory.coalesce_requests(reqs, 1 << 30) == [
    (0, 3 * PAGE, 0), (5 * PAGE, PAGE, 3 * PAGE), (6 * PAGE, PAGE, 5 * PAGE)]
  # A run longer than max_bytes is cut.
  assert memory.coalesce_requests(reqs[:3], 2 * PAGE) == [
    (0, 2 * PAGE, 0), (2 * PAGE, PAGE, 2 * PAGE)]
  assert memory.coalesce_requests([], PAGE) == []


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("coalesce", [0, 2 * PAGE])
def test_reader_read_many_scatters_records(tmp_path, parallel, coalesce):
  path = tmp_path / "records.bin"
  data = _random_file(path, 64 * PAGE, seed=3)
  # Records 3, 4, 5 and 9, the last one short (a row of 100 bytes), gathered into slots.
  reqs = [(3 * PAGE, PAGE, 0), (4 * PAGE, PAGE, PAGE), (5 * PAGE, PAGE, 2 * PAGE),
          (9 * PAGE, 100, 3 * PAGE)]
  with ReaderPool(num_workers=3) as pool:
    buf = aligned_empty(4 * PAGE)
    fut = pool.read_many(path, buf, reqs, coalesce=coalesce, parallel=parallel)
    assert fut.result(timeout=30) == 3 * PAGE + 100
    np.testing.assert_array_equal(buf[: 3 * PAGE], data[3 * PAGE : 6 * PAGE])
    np.testing.assert_array_equal(buf[3 * PAGE : 3 * PAGE + 100], data[9 * PAGE : 9 * PAGE + 100])
    record = pool.record()
    assert record.bytes == 3 * PAGE + 100 and record.calls == 1 and record.direct
    assert record.requests == (3 if coalesce else 4)  # 3-5 merge two by two at most
    # The exact-size buffer: the short last record reads its round-up through a bounce page.
    tight = aligned_empty(3 * PAGE + 100)
    pool.read_many(path, tight, reqs, parallel=parallel).result(timeout=30)
    np.testing.assert_array_equal(tight[3 * PAGE :], data[9 * PAGE : 9 * PAGE + 100])


@pytest.mark.parametrize("native", [True, False])
def test_reader_read_many_compiled_and_python_loops_read_the_same(tmp_path, native):
  """Scattering requests as arrays: the compiled loop (which holds no GIL) and the Python
  loop deliver the same bytes, and the record says which loop read them; a request past
  the end of the file stops the compiled loop and fails naming the file."""
  if native and reader_mod._native() is None:
    pytest.skip("no C++ compiler here: the compiled read loop is not built")
  path = tmp_path / "records.bin"
  data = _random_file(path, 64 * PAGE, seed=5)
  starts = np.sort(np.random.default_rng(0).choice(62, 20, replace=False))
  slots = 20
  # Request j: pages start, start + 1 into slot j of plane A and slot j of plane B.
  first = np.arange(21) * 2
  dest = np.stack([np.arange(20) * PAGE, (slots + np.arange(20)) * PAGE], 1).reshape(-1)
  reqs = memory.Requests(starts * PAGE, np.full(20, 2 * PAGE), first, dest,
                         np.full(40, PAGE))
  with ReaderPool(num_workers=3, native=native) as pool:
    for parallel in (True, False):
      buf = aligned_empty(2 * slots * PAGE)
      assert pool.read_many(path, buf, reqs, parallel=parallel).result(timeout=30) == reqs.nbytes
      for j, p in enumerate(starts):
        np.testing.assert_array_equal(buf[j * PAGE:(j + 1) * PAGE], data[p * PAGE:(p + 1) * PAGE])
        np.testing.assert_array_equal(buf[(slots + j) * PAGE:(slots + j + 1) * PAGE],
                                      data[(p + 1) * PAGE:(p + 2) * PAGE])
    record = pool.record()
    assert record.requests == 40 and record.direct
    assert record.native_requests == (40 if native else 0)
    # The parallel pass went through the kernel's AIO queue, unless this kernel refused
    # it (then the pool says so and cuts batches per worker from there on).
    assert record.async_requests == (20 if native and pool._async else 0)
    past_end = memory.Requests.of([(0, PAGE, 0), (70 * PAGE, PAGE, PAGE), (PAGE, PAGE, 2 * PAGE)])
    for parallel in (True, False):
      with pytest.raises(ReadError, match=str(path)):
        pool.read_many(path, aligned_empty(3 * PAGE), past_end,
                       parallel=parallel).result(timeout=10)


def _numpy_only(monkeypatch):
  """The reader's helpers without the compiled loop, as where no compiler is found."""
  monkeypatch.setattr(reader_mod, "_native", lambda: None)


def test_planar_requests_compiled_and_numpy_agree(monkeypatch):
  """`Requests.planar` builds the same arrays with the compiled loop and with numpy, for
  runs cut at gaps and at max_run, one request per record, and no records."""
  if reader_mod._native() is None:
    pytest.skip("no C++ compiler here: the compiled read loop is not built")
  rng = np.random.default_rng(3)
  cases = []
  for n in (0, 1, 2, 7, 64):
    positions = np.sort(rng.choice(200, n, replace=False))
    positions[: n // 2] = np.arange(n // 2) + 5  # a long adjacent run as well as gaps
    for max_run in (1, 3, 256):
      cases.append((np.unique(positions), 3 * PAGE, PAGE, 2 * 3 * PAGE, 90 * PAGE, max_run))
  built = [memory.Requests.planar(*case) for case in cases]
  _numpy_only(monkeypatch)
  for case, compiled_reqs in zip(cases, built):
    reference = memory.Requests.planar(*case)
    for field in ("offsets", "sizes", "first", "dest", "length"):
      np.testing.assert_array_equal(getattr(compiled_reqs, field), getattr(reference, field))
  runs = memory.Requests.planar(np.array([4, 5, 6, 9]), 2 * PAGE, PAGE, 0, 100 * PAGE, 2)
  # Records 4, 5 | 6 | 9: a run of three cut at two, then a gap.
  assert runs.offsets.tolist() == [4 * 3 * PAGE, 6 * 3 * PAGE, 9 * 3 * PAGE]
  assert runs.sizes.tolist() == [6 * PAGE, 3 * PAGE, 3 * PAGE]
  assert runs.dest.tolist()[:4] == [0, 100 * PAGE, 2 * PAGE, 101 * PAGE]


def test_reader_compiled_check_refuses_what_the_numpy_check_names(tmp_path, monkeypatch):
  """The compiled check passes exactly the requests the numpy check passes: each bad
  request (out of the buffer, short segments, off a page with O_DIRECT) is refused with
  the same message either way."""
  if reader_mod._native() is None:
    pytest.skip("no C++ compiler here: the compiled read loop is not built")
  buffer = aligned_empty(8 * PAGE)
  good = [(0, 2 * PAGE, ((0, PAGE), (4 * PAGE, PAGE))), (8 * PAGE, PAGE, PAGE)]
  bad = {
    "past the buffer": [good[0], (0, PAGE, 8 * PAGE)],
    "negative destination": [(0, PAGE, -PAGE)],
    "segments short of the size": [(0, 2 * PAGE, ((0, PAGE), (PAGE, PAGE - 1)))],
    "file offset off a page": [good[1], (100, PAGE, 0)],
    "destination off a page": [(0, 100, 7)],
    "scattered segment not whole pages": [(0, PAGE + 100, ((0, PAGE), (PAGE, 100)))],
  }
  cases = [(memory.Requests.of(r), direct) for r in [good, *bad.values()]
           for direct in (True, False)]
  messages = []
  for reqs, direct in cases:
    try:
      ReaderPool._check("f.bin", buffer, reqs, direct)
      messages.append(None)
    except ValueError as e:
      messages.append(str(e))
  assert messages[0] is None and messages[1] is None  # the good requests pass
  narrow = memory.Requests(*(getattr(cases[0][0], f).astype(np.int32)
                             for f in ("offsets", "sizes", "first", "dest", "length")))
  ReaderPool._check("f.bin", buffer, narrow, True)  # int32 arrays: converted, and kept alive
  assert all(m is not None for m in messages[2::2])  # every bad one fails with O_DIRECT
  _numpy_only(monkeypatch)
  for (reqs, direct), message in zip(cases, messages):
    if message is None:
      ReaderPool._check("f.bin", buffer, reqs, direct)
    else:
      with pytest.raises(ValueError) as raised:
        ReaderPool._check("f.bin", buffer, reqs, direct)
      assert str(raised.value) == message


def _every_other_page(tmp_path, pages, seed):
  """A file of `pages` random pages and requests for its even pages, packed into a buffer
  (for the tests of the compiled loop, skipped where it is not built)."""
  if reader_mod._native() is None:
    pytest.skip("no C++ compiler here: the compiled read loop is not built")
  path = tmp_path / "records.bin"
  data = _random_file(path, pages * PAGE, seed=seed)
  reqs = memory.Requests.of([(p * PAGE, PAGE, j * PAGE)
                             for j, p in enumerate(range(0, pages, 2))])
  return path, data, reqs


def test_reader_without_native_aio_reads_a_batch_per_worker(tmp_path):
  """A kernel without native AIO (or out of fs.aio-max-nr): the compiled loop reads its
  batch one request after another, the pool notices and cuts a batch per worker."""
  path, data, reqs = _every_other_page(tmp_path, 32, seed=7)
  with ReaderPool(num_workers=4) as pool:
    lib, starts = pool._native, []

    def refused(*args):  # as hetflow_aio_start answers when io_setup or io_submit fails
      starts.append(args)
      return None

    pool._native = types.SimpleNamespace(hetflow_aio_start=refused,
                                         hetflow_read_requests=lib.hetflow_read_requests)
    for _ in range(2):
      buf = aligned_empty(16 * PAGE)
      assert pool.read_many(path, buf, reqs).result(timeout=30) == reqs.nbytes
      for j in range(16):
        np.testing.assert_array_equal(buf[j * PAGE:(j + 1) * PAGE],
                                      data[2 * j * PAGE:(2 * j + 1) * PAGE])
    record = pool.record()
    assert not pool._async and record.async_requests == 0 and record.native_requests == 32
    assert len(starts) == 1  # asked once, then a batch per worker


def test_reader_waits_for_queued_reads_even_when_the_batch_fails(tmp_path):
  """A batch queued in the kernel is waited for before anything else can fail (here the
  file vanishing before the worker runs): the future never completes while the kernel
  may still write into the caller's buffer."""
  path, _, reqs = _every_other_page(tmp_path, 16, seed=11)
  with ReaderPool(num_workers=4) as pool:
    lib, finished, opens = pool._native, [], []
    pool._native = types.SimpleNamespace(
        hetflow_aio_start=lib.hetflow_aio_start,
        hetflow_aio_finish=lambda handle: (lib.hetflow_aio_finish(handle), finished.append(1)))
    real_open = pool._open

    def vanishing(p):  # read_many opens it; by the time the worker does, it is gone
      opens.append(p)
      if len(opens) > 1:
        raise FileNotFoundError(errno.ENOENT, "gone", p)
      return real_open(p)

    pool._open = vanishing
    fut = pool.read_many(path, aligned_empty(8 * PAGE), reqs)
    with pytest.raises(FileNotFoundError):
      fut.result(timeout=30)
    assert finished == [1] and pool._async


def test_reader_in_a_forked_child_queues_its_own_reads(tmp_path):
  """A child forked after the parent's queued reads makes its own AIO contexts (the
  parent's are not its) and reads the same bytes."""
  path, data, reqs = _every_other_page(tmp_path, 16, seed=9)
  with ReaderPool(num_workers=4) as pool:
    pool.read_many(path, aligned_empty(8 * PAGE), reqs).result(timeout=30)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # jax warns that forking a threaded process may deadlock
    pid = os.fork()
  if pid == 0:  # the child: exit 0 only if its own pool read the right bytes through AIO
    ok = False
    try:
      with ReaderPool(num_workers=4) as child_pool:
        buf = aligned_empty(8 * PAGE)
        child_pool.read_many(path, buf, reqs).result(timeout=30)
        ok = child_pool._async and all(
            np.array_equal(buf[j * PAGE:(j + 1) * PAGE], data[2 * j * PAGE:(2 * j + 1) * PAGE])
            for j in range(8))
    finally:
      os._exit(0 if ok else 1)
  _, status = os.waitpid(pid, 0)
  assert os.waitstatus_to_exitcode(status) == 0


def test_reader_read_many_errors_name_the_file(tmp_path):
  path = tmp_path / "short.bin"
  _random_file(path, 4 * PAGE)
  with ReaderPool(num_workers=2) as pool:
    buf = aligned_empty(4 * PAGE)
    with pytest.raises(ReadError) as e:
      pool.read_many(path, buf, [(0, PAGE, 0), (8 * PAGE, PAGE, PAGE)]).result(timeout=10)
    assert str(path) in str(e.value) and "offset" in str(e.value)
    with pytest.raises(ValueError, match="aligned"):
      pool.read_many(path, buf, [(100, PAGE, 0)])
    with pytest.raises(ValueError, match="does not fit"):
      pool.read_many(path, buf, [(0, PAGE, 4 * PAGE)])
    assert pool.read_many(path, buf, []).result(timeout=10) == 0


def test_reader_read_many_falls_back_with_a_warning_per_file(tmp_path, monkeypatch):
  files = [tmp_path / "a.bin", tmp_path / "b.bin"]
  datas = [_random_file(f, 2 * PAGE, seed=i) for i, f in enumerate(files)]
  _refuse_o_direct(monkeypatch)
  with ReaderPool(num_workers=2) as pool:
    for f, d in zip(files, datas, strict=True):
      buf = aligned_empty(2 * PAGE)
      with pytest.warns(RuntimeWarning, match=str(f)):
        pool.read_many(f, buf, [(0, PAGE, 0), (PAGE, PAGE, PAGE)]).result(timeout=10)
      np.testing.assert_array_equal(buf, d)
    record = pool.record()
    assert record.direct is False and record.direct_requests == 0
    assert [r.split(":")[0] for r in record.fallbacks] == [str(f) for f in files]
    assert all("Invalid argument" in r for r in record.fallbacks)
    pool.reset_stats()  # the files stay buffered: their fallbacks stay in the record
    assert pool.record().fallbacks == record.fallbacks and pool.record().direct is None


def test_drop_page_cache(tmp_path):
  path = tmp_path / "f.bin"
  _random_file(path, 3 * PAGE)
  assert memory.drop_page_cache(path, method="fadvise") == "fadvise"
  assert memory.drop_page_cache(tmp_path, method="fadvise") == "fadvise"
  expected = "drop_caches" if os.geteuid() == 0 else "fadvise"
  assert memory.drop_page_cache(path) in (expected, "fadvise")
  with pytest.raises(ValueError):
    memory.drop_page_cache(path, method="magic")


# -- limit --------------------------------------------------------------------


def _vmlck(pid):
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmLck:"):
        return int(line.split()[1]) * 1024
  return 0


def test_memory_limit_small_lock():
  lim = MemoryLimit(lock_bytes="64MiB", drop_caches=False, timeout=30)
  with lim:
    pid = lim.pid
    assert lim.locked_bytes == 64 * MiB
    assert _vmlck(pid) >= 64 * MiB
  assert lim.pid is None and lim.locked_bytes == 0
  assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)


def _zombie_or_gone(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split()[2] in ("Z", "X")
  except FileNotFoundError:
    return True


def test_memory_limit_refuses_dangerous_sizes():
  with pytest.raises(ValueError, match="would leave less"):
    with MemoryLimit(lock_bytes=memory.mem_available(), drop_caches=False):
      pass
  with pytest.raises(ValueError):
    MemoryLimit()


def test_memory_limit_fails_clearly_when_helper_cannot_lock(monkeypatch):
  from hetflow.memory import limit as limit_mod

  monkeypatch.setattr(
    limit_mod, "_HELPER", "import sys; print('ERROR mlock refused (test)', flush=True); sys.exit(1)"
  )
  with pytest.raises(memory.MemoryLimitError, match="mlock refused"):
    with MemoryLimit(lock_bytes="1MiB", drop_caches=False, timeout=30):
      pass
  monkeypatch.setattr(limit_mod, "_HELPER", "import time; time.sleep(60)")
  with pytest.raises(memory.MemoryLimitError, match="within"):
    with MemoryLimit(lock_bytes="1MiB", drop_caches=False, timeout=1):
      pass


def test_memory_limit_top_up_locks_what_was_freed(monkeypatch):
  """Memory freed after entry is locked again, so the limit holds for later systems."""
  from hetflow.memory import limit as limit_mod

  limit_bytes = 1 << 30
  readings = iter([limit_bytes + (64 << 20), limit_bytes + (96 << 20)])
  monkeypatch.setattr(limit_mod, "mem_available", lambda: next(readings))
  with limit_mod.MemoryLimit(limit_bytes, drop_caches=False, keep_interval=None) as held:
    assert held.locked_bytes == 64 << 20
    assert held.top_up(slack=16 << 20) == 96 << 20
    assert held.locked_bytes == (64 + 96) << 20
  assert held.locked_bytes == 0


def test_memory_limit_keeper_follows_what_others_free_and_take(monkeypatch):
  """During a run: memory others free is locked; when others take memory back, whole
  pieces of the lock are given back, newest first, never more than they took; the record
  says how far the limit strayed."""
  from hetflow.memory import limit as limit_mod

  limit_bytes = 1 << 30
  # The machine's memory outside this test's locks: what is available is that less the locks.
  unlocked = {"now": limit_bytes + (32 << 20)}
  held = limit_mod.MemoryLimit(limit_bytes, drop_caches=False, keep_interval=None,
                               slack=16 << 20, piece=16 << 20)
  monkeypatch.setattr(limit_mod, "mem_available", lambda: unlocked["now"] - held.locked_bytes)
  monkeypatch.setattr(limit_mod, "_children_anon", lambda exclude: 0)
  with held:
    assert held.locked_bytes == 32 << 20 and held._sizes == [16 << 20, 16 << 20]
    assert held.keep() == 0  # at the limit
    unlocked["now"] += 8 << 20  # within the slack
    assert held.keep() == 0
    unlocked["now"] += 40 << 20  # others freed 40 MiB more
    assert held.keep() == 48 << 20
    assert held.locked_bytes == 80 << 20 and len(held._procs) == 5  # 16 MiB pieces
    assert held.keep() == 0
    unlocked["now"] -= 64 << 20  # others took 64 MiB: 48 go, not the next 16
    assert held.keep() == -(48 << 20)
    assert held.locked_bytes == 32 << 20 and len(held._procs) == 2
    unlocked["now"] -= 512 << 20  # others need more than is locked: all of it goes
    assert held.keep() == -(32 << 20)
    assert held.locked_bytes == 0 and held.pid is None
    unlocked["now"] += 1024 << 20  # and is locked again once they free it
    assert held.keep() == 528 << 20
    assert held.locked_bytes == 528 << 20 and len(held._procs) == 33  # in 16 MiB pieces
    record = held.held(reset=True)
    assert record == {"checks": 7, "max_excess": 528 << 20, "min_excess": -(528 << 20),
                      "locked_more": 576 << 20, "gave_back": 80 << 20}
    assert held.held()["checks"] == 0
  assert held.locked_bytes == 0


def test_memory_limit_keeper_counts_the_children_and_runs_by_itself(monkeypatch):
  """What the benchmark's children hold (their anonymous memory) is theirs, within the
  limit: it does not make the keeper give memory back. The keeper's thread runs on its
  own while inside the context and stops on exit."""
  import subprocess
  import sys
  import time

  from hetflow.memory import limit as limit_mod

  # 64 MiB anonymous and 64 MiB shared (where jax's CPU arrays live), both touched.
  child = subprocess.Popen([sys.executable, "-c", "import mmap, sys, numpy as np;"
                            " a = np.ones(64 << 20, np.uint8);"
                            " m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_SHARED);"
                            " m.write(b'x' * (64 << 20)); print('up', flush=True);"
                            " sys.stdin.read()"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    assert child.stdout.readline().strip() == b"up"
    assert limit_mod._children_anon(set()) >= 128 << 20
    assert limit_mod._children_anon({child.pid}) < 64 << 20
  finally:
    child.stdin.close()
    child.wait()
  limit_bytes = 1 << 30
  unlocked = {"now": limit_bytes + (32 << 20)}
  held = limit_mod.MemoryLimit(limit_bytes, drop_caches=False, keep_interval=0.05,
                               slack=16 << 20)
  monkeypatch.setattr(limit_mod, "mem_available", lambda: unlocked["now"] - held.locked_bytes)
  with held:
    unlocked["now"] += 40 << 20
    deadline = time.monotonic() + 30
    while held.locked_bytes < (72 << 20) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert held.locked_bytes == 72 << 20
    keeper = held._keeper
    assert keeper.is_alive()
  assert not keeper.is_alive() and held.locked_bytes == 0
