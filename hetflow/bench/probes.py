"""The probes: disk reads, memory copy, host->device, matrix-vector and matmul rates.

Each rate is measured by exactly one function here; two callers use them:

- `measure(workdir)` sweeps them into a `HardwareProfile` (disk read bandwidth
  by request size and queue depth on a temporary file, memcpy, matvec and
  matmul per dtype on the CPU and the accelerator, host->device per memory
  kind): what `python -m experiments.profile_hardware` writes and the planner
  predicts from.
- `format_matvec_rate` times each weight format's matrix-vector product through
  the function the models call (`hetflow.models.formats.matmul`), so the
  profile's figure follows whichever kernel is in use; `probe_allreduce` times
  an all-reduce between local processes under `jax.distributed` (the profile's
  `network` for processes on one machine).
- the benchmark (`hetflow.bench.runner`) probes the limits of its own run:
  `probe_store` reads the layer store the strategies stream from,
  `probe_small_reads` the same disk at a sparse strategy's request size,
  `probe_memory` the f32 matvec roof, `probe_host_to_device` the link.

Every figure is the best of a few repeats: noise on a shared machine only
ever slows a run down. Disk figures say whether the reads were O_DIRECT,
as the reader recorded it, not as requested.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hetflow.hardware import HardwareProfile, cpuinfo_field
from hetflow.memory.budget import format_bytes

KiB = 2**10
MiB = 2**20
GiB = 2**30


def best_time(fn: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` calls of `fn`, in seconds (noise only ever slows a call)."""
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


# -- disk ----------------------------------------------------------------------


def _reads_direct(pool) -> bool | None:
  """Whether every read of `pool` so far was O_DIRECT, from the reader's own record."""
  record = getattr(pool, "record", None)
  if record is not None:
    return record().direct
  return pool.direct


def timed_reads(pool, reads, in_flight: int = 1) -> float:
  """Seconds to complete `reads` through `pool`, keeping `in_flight` of them queued.

  Args:
    pool: a ReaderPool (its threads split each read into `chunk`-sized requests).
    reads: (path, offset, buffer, nbytes, chunk) tuples, issued in order.
    in_flight: reads submitted before waiting for the oldest (a prefetching
      reader keeps several queued).

  Returns:
    Seconds from the first submission to the last completion.
  """
  pending: collections.deque = collections.deque()
  t0 = time.perf_counter()
  for path, offset, buffer, nbytes, chunk in reads:
    if len(pending) == in_flight:
      pending.popleft().result()
    pending.append(pool.read_into(path, offset, buffer, nbytes, chunk=chunk))
  for future in pending:
    future.result()
  return time.perf_counter() - t0


def probe_store(store, bytes_per_setting: int = 512 << 20,
                settings: tuple[tuple[int, int], ...] = ((8, 1 << 20), (4, 4 << 20),
                                                         (16, 1 << 20)),
                start: int = 0, in_flight: int = 3) -> dict[str, Any]:
  """Cold reads of a layer store's own files: the disk a strategy streams from.

  Tries a few (threads, request size) settings, each on distinct files with
  `in_flight` group reads queued (as a prefetching reader keeps them), and
  keeps the best: the limit is what the disk can do, not what one setting gets.

  Args:
    store: the LayerStore.
    bytes_per_setting: bytes read per setting.
    settings: (reader threads, request bytes) pairs to try.
    start: index of the first layer file to read; pass the previous probe's
      `next` so that successive probes read files not read before.
    in_flight: group reads queued at once.

  Returns:
    bytes_per_s (the best), direct (whether every read was O_DIRECT, as the
    reader recorded it), cache_drop, per-setting figures, best_setting, next.
  """
  from hetflow.memory import ReaderPool, aligned_empty, drop_page_cache

  groups = [g for g in store.groups if g.startswith("layers/")] or list(store.groups)
  # O_DIRECT needs no cache drop; fadvise keeps a buffered fallback honest
  # without a machine-wide drop (see runner.drop_cold).
  method = drop_page_cache(store.path, method="fadvise")
  bufs = [aligned_empty(store.max_group_nbytes) for _ in range(in_flight)]
  for b in bufs:
    b.fill(0)  # O_DIRECT into never-touched pages is several times slower here
  per_setting, direct, index, best = {}, True, start, None
  for threads, chunk in settings:
    reads, total, first = [], 0, index
    while total < bytes_per_setting and index < first + len(groups):
      g = groups[index % len(groups)]  # wraps only on tiny stores
      index += 1
      nbytes = store.group_nbytes(g)
      reads.append((store.file(g), 0, bufs[index % in_flight], nbytes, chunk))
      total += nbytes
    with ReaderPool(threads) as pool:
      seconds = timed_reads(pool, reads, in_flight)
      direct = direct and bool(_reads_direct(pool))
    rate = total / seconds
    if not per_setting or rate > max(per_setting.values()):
      best = [threads, chunk]
    per_setting[f"{threads} threads x {format_bytes(chunk)}"] = rate
  return {"bytes_per_s": max(per_setting.values()), "settings": per_setting, "direct": direct,
          "cache_drop": method, "bytes": bytes_per_setting * len(settings), "next": index,
          "best_setting": best}


def probe_small_reads(paths: list[str], request_bytes: int, depths: tuple[int, ...] = (8, 32, 64),
                      bytes_per_depth: int = 96 << 20, per_call: int = 64,
                      seed: int = 0) -> dict[str, Any] | None:
  """Cold random reads of `request_bytes` (rounded up to pages) from the files `paths`:
  the disk at a sparse strategy's request size (neuron records, ~24 KiB).

  Each `ReaderPool.read_many` call reads `per_call` requests at random page-aligned
  offsets of one file, as a layer's misses are read; the files are taken in turn. Every
  depth in `depths` is tried, and the best is kept: the limit is what the disk can do
  at that size, not what one setting gets.

  Returns:
    bytes_per_s (the best), request_bytes, depth (the best's), settings (depth ->
    bytes/s) and direct (whether every read was O_DIRECT, as the reader recorded
    it); None if no file holds a request of that size.
  """
  from hetflow.memory import PAGE, ReaderPool, Requests, aligned_empty, round_up

  size = round_up(request_bytes)
  files = [(p, os.path.getsize(p)) for p in paths]
  files = [(p, n) for p, n in files if n >= size]
  if not files:
    return None
  rng = np.random.default_rng(seed)
  buf = aligned_empty(per_call * size)
  buf.fill(0)  # O_DIRECT into never-touched pages is several times slower here
  settings, direct = {}, True
  for depth in depths:
    calls = max(1, bytes_per_depth // (per_call * size))
    with ReaderPool(depth) as pool:
      t0 = time.perf_counter()
      for call in range(calls):
        path, n = files[call % len(files)]
        pages = rng.choice((n - size) // PAGE + 1, per_call)
        reqs = Requests.of([(int(p) * PAGE, size, j * size) for j, p in enumerate(np.sort(pages))])
        pool.read_many(path, buf, reqs).result()
      settings[depth] = calls * per_call * size / (time.perf_counter() - t0)
      direct = direct and bool(_reads_direct(pool))
  best = max(settings, key=settings.get)
  return {"bytes_per_s": settings[best], "request_bytes": size, "depth": best,
          "settings": settings, "direct": direct}


def _disk_table(workdir: str, s: MeasureSettings,
                step) -> tuple[dict[int, dict[int, float]], bool, str]:
  """Read bandwidth by queue depth and request size, on a temporary file in `workdir`."""
  from hetflow.memory import ReaderPool, Requests, aligned_empty, drop_page_cache, round_up

  size = round_up(s.disk_file_bytes)
  rng = np.random.default_rng(0)
  fd, path = tempfile.mkstemp(prefix="hetflow-disk-", suffix=".bin", dir=workdir)
  try:
    # Random bytes: a thin-provisioned or compressing disk cannot shortcut them.
    with os.fdopen(fd, "wb") as f:
      left = size
      while left:
        n = min(left, 16 * MiB)
        f.write(rng.bytes(n))
        left -= n
      f.flush()
      os.fsync(f.fileno())
    method = drop_page_cache(path)
    buf = aligned_empty(size)
    buf.fill(0)  # as the strategies' buffers: O_DIRECT into untouched pages is slower here
    table: dict[int, dict[int, float]] = {}
    direct = True
    offset = 0
    # Repeats are whole sweeps, so a disk that is slow for a while (the host
    # still writing the file back, a neighbour's burst) slows one sweep, not
    # every repeat of the points measured at that moment; the best is kept.
    for sweep in range(s.repeats):
      for qd in s.disk_queue_depths:
        with ReaderPool(num_workers=qd) as pool:
          for block in s.disk_block_sizes:
            step(f"disk {format_bytes(block)} qd={qd} (sweep {sweep + 1}/{s.repeats})")
            nbytes = min(size, block * s.disk_max_requests)
            nbytes -= nbytes % block
            # O_DIRECT bypasses the cache anyway; fadvise is for the
            # buffered fallback, and it is cheap.
            drop_page_cache(path, method="fadvise")
            # Rotate the region read, so repeats do not hit the
            # same blocks (a caching hypervisor would serve them).
            # Each point is the better of the reader's two paths (each on its own
            # region): a region split across threads (`read_into`, as layer-wise
            # streams) and requests queued in the kernel (`read_many`, as neuron_cluster
            # reads records; at small sizes it gets ~1.4x more from this disk).
            row = table.setdefault(qd, {})
            for queued in (False, True):
              if offset + nbytes > size:
                offset = 0
              if queued:
                reqs = Requests.of([(offset + j, block, j) for j in range(0, nbytes, block)])
                t0 = time.perf_counter()
                pool.read_many(path, buf, reqs).result()
                rate = nbytes / (time.perf_counter() - t0)
              else:
                rate = nbytes / timed_reads(pool, [(path, offset, buf, nbytes, block)])
              row[block] = max(row.get(block, 0.0), rate)
              offset += nbytes
          direct = direct and bool(_reads_direct(pool))
    return table, direct, method
  finally:
    os.remove(path)


# -- memory and compute -----------------------------------------------------------


def memcpy_rate(nbytes: int, repeats: int) -> float:
  """Bytes copied per second by a large numpy copy (each byte read once, written once)."""
  src = np.ones(nbytes, np.uint8)
  dst = np.zeros_like(src)  # touched, so page faults are not timed
  return nbytes / best_time(lambda: np.copyto(dst, src), repeats)


def _matvec_fns():
  import jax
  import jax.numpy as jnp

  return {
    "dot": jax.jit(lambda w, x: jnp.dot(w, x, preferred_element_type=jnp.float32)),
    "multiply_sum": jax.jit(lambda w, x: jnp.sum(w * x[None, :], axis=1, dtype=jnp.float32)),
  }


def matvec_rate(device, dtype, shape: tuple[int, int], total_bytes: int, repeats: int,
                impls: tuple[str, ...] = ("dot", "multiply_sum")) -> dict[str, float]:
  """Bytes of weights per second through an XLA matrix-vector product, per formulation.

  Cycles through `total_bytes` of distinct matrices per repetition, so that
  no cache serves the weights (as in decode, where every weight is touched
  once per token).

  Args:
    device: the jax device to run on.
    dtype: the weights' dtype.
    shape: (rows, cols) of each matrix.
    total_bytes: bytes of matrices cycled through per repetition.
    repeats: the best of this many sweeps is kept.
    impls: formulations to time: "dot" (`jnp.dot`) and/or "multiply_sum"
      (`(W * x).sum`; XLA's CPU bf16 dot is far off the memory roof, this is not).

  Returns:
    {impl: bytes_per_s}.
  """
  import jax
  import jax.numpy as jnp

  fns = _matvec_fns()
  per = shape[0] * shape[1] * jnp.dtype(dtype).itemsize
  count = max(1, total_bytes // per)
  key = jax.random.key(0)
  ws = [jax.device_put(jax.random.normal(jax.random.fold_in(key, i), shape, dtype), device)
        for i in range(count)]
  x = jax.device_put(jnp.ones((shape[1],), dtype), device)
  rates = {}
  for impl in impls:
    fn = fns[impl]
    fn(ws[0], x).block_until_ready()  # compile outside the timing

    def run(fn=fn):
      for w in ws:
        fn(w, x).block_until_ready()

    rates[impl] = count * per / best_time(run, repeats)
  return rates


# Formats whose matrix-vector rate `measure` takes (bfloat16's replaces the generic bf16 one).
FORMATS = ("bfloat16", "int8", "int8-g32", "int4", "int4-asym")


def filled_kernel(fmt: str, shape: tuple[int, ...], value: int = 1) -> dict[str, np.ndarray]:
  """Host leaves of one kernel of logical `shape` ([in, out]) in weight format `fmt`, every
  entry `value` (a dense product's time does not depend on the values, and filling is
  far cheaper than drawing random numbers for a gigabyte of kernels)."""
  from hetflow.models import formats

  return {name: np.full(spec.shape, value, spec.dtype)
          for name, spec in formats.WeightFormat.parse(fmt).leaf_shapes(shape).items()}


def format_matvec_rate(device, fmt: str, shape: tuple[int, int], total_bytes: int,
                       repeats: int) -> float:
  """Bytes of stored weights per second of one row through `formats.matmul` (decode's
  matrix-vector product) on kernels of logical `shape` ([in, out]) in format `fmt`,
  cycling `total_bytes` of distinct kernels per repetition as `matvec_rate` does."""
  import jax
  import jax.numpy as jnp

  from hetflow.models import formats

  first = filled_kernel(fmt, shape)
  per = formats.nbytes(first)
  count = max(1, total_bytes // per)
  # distinct arrays (jnp.array copies: a device_put may alias the numpy buffer)
  ws = [jax.tree.map(lambda a: jnp.array(a, device=device), first) for _ in range(count)]
  x = jax.device_put(jnp.ones((1, shape[0]), jnp.float32), device)
  fn = jax.jit(formats.matmul)
  fn(x, ws[0]).block_until_ready()  # compile outside the timing

  def run():
    for w in ws:
      y = fn(x, w)
    y.block_until_ready()

  return count * per / best_time(run, repeats)


def matmul_rate(device, dtype, n: int, repeats: int) -> float:
  """FLOP/s of an n x n x n matmul on `device` (accumulating in float32)."""
  import jax
  import jax.numpy as jnp

  fn = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  a = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), dtype), device)
  fn(a, a).block_until_ready()
  return 2 * n**3 / best_time(lambda: fn(a, a).block_until_ready(), repeats)


def transfer_rate(device, kind: str, nbytes: int, repeats: int) -> float:
  """Bytes per second of `jax.device_put` from host memory of `kind` into `device`'s memory."""
  import jax

  from hetflow.memory.tiers import device_sharding

  n = nbytes // 4
  dst = device_sharding(device)
  src = jax.device_put(np.ones(n, np.float32),
                       jax.sharding.SingleDeviceSharding(device, memory_kind=kind))
  src.block_until_ready()

  def move():
    y = jax.device_put(src, dst)
    y.block_until_ready()
    y.delete()

  move()  # warm-up: first transfers pay one-time setup
  return n * 4 / best_time(move, repeats)


# -- the benchmark's probes ---------------------------------------------------------


def probe_memory(total_bytes: int = 512 << 20, repeats: int = 3) -> dict[str, Any]:
  """Bytes of f32 weights per second through an XLA matvec on the default device
  (the decode roof for resident bytes)."""
  import jax
  import jax.numpy as jnp

  shape = (2048, 8192)
  nbytes = max(1, total_bytes // (shape[0] * shape[1] * 4)) * shape[0] * shape[1] * 4
  rate = matvec_rate(jax.devices()[0], jnp.float32, shape, total_bytes, repeats, ("dot",))["dot"]
  return {"bytes": nbytes, "seconds": nbytes / rate, "bytes_per_s": rate}


def probe_host_to_device(nbytes: int = 64 << 20, repeats: int = 3) -> dict[str, Any]:
  """jax.device_put from the host tier's memory kind to the device (a memcpy on CPU)."""
  import jax

  from hetflow.memory import tiers

  device = jax.devices()[0]
  kind = tiers.host_memory_kind(device)
  rate = transfer_rate(device, kind, nbytes, repeats)
  return {"bytes": nbytes, "seconds": nbytes / rate, "bytes_per_s": rate, "kind": kind}


def _allreduce_worker(coordinator: str, processes: int, process_id: int, sizes: list[int],
                      repeats: int) -> None:
  """One process of `probe_allreduce`: prints {size: [psum best s, no-collective best s]}."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes=processes, process_id=process_id)
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()), ("x",))
  out = {}
  for size in sizes:
    local = jax.device_put(np.ones((1, size), np.float32), jax.local_devices()[0])
    arr = jax.make_array_from_single_device_arrays((processes, size),
                                                   NamedSharding(mesh, P("x")), [local])
    fns = [jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
           for f in (lambda a: jax.lax.psum(a, "x"), lambda a: a + 1.0)]
    best = []
    for fn in fns:
      fn(arr).block_until_ready()
      best.append(best_time(lambda fn=fn, arr=arr: fn(arr).block_until_ready(), repeats))
    out[size] = best
  print("ALLREDUCE " + json.dumps(out), flush=True)
  jax.distributed.shutdown()


def probe_allreduce(processes: int = 2, hidden_sizes: tuple[int, ...] = (2048, 8192, 65536),
                    repeats: int = 200, port: int = 23517, timeout_s: float = 300
                    ) -> dict[str, Any]:
  """An all-reduce of float32 hidden-size vectors between `processes` local processes
  (jax.distributed, gloo over TCP loopback), as a profile's `network`.

  Each size is timed as a jitted `psum` and, in the same process, the same jitted
  call without the collective; their difference is the collective's own cost.
  Latency and bandwidth are the least-squares line through (bytes, seconds) of the
  slowest process's differences, read as a two-process exchange (one message of
  the whole vector each way: what `costmodel.allreduce_time` charges at N = 2).

  Returns:
    {"bandwidth": bytes/s, "latency_s": s, "processes": N, "by_size": {floats:
    [psum s, no-collective s]}} (the first three are a `HardwareProfile.network`).
  """
  code = ("import sys, json; from hetflow.bench.probes import _allreduce_worker;"
          " _allreduce_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),"
          " json.loads(sys.argv[4]), int(sys.argv[5]))")
  args = [f"127.0.0.1:{port}", str(processes)]
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device per process
  procs = [subprocess.Popen([sys.executable, "-c", code, *args, str(i),
                             json.dumps(list(hidden_sizes)), str(repeats)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(processes)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=timeout_s)
    line = next((ln for ln in out.splitlines() if ln.startswith("ALLREDUCE ")), None)
    if p.returncode or line is None:
      raise RuntimeError(f"all-reduce probe process failed (rc {p.returncode}): {err[-2000:]}")
    results.append({int(k): v for k, v in json.loads(line[len("ALLREDUCE "):]).items()})
  by_size = {n: max((r[n] for r in results), key=lambda v: v[0] - v[1]) for n in hidden_sizes}
  xs = np.array([4.0 * n for n in hidden_sizes])
  ys = np.array([max(v[0] - v[1], 1e-7) for v in by_size.values()])
  slope, intercept = np.polyfit(xs, ys, 1) if len(xs) > 1 else (0.0, ys[0])
  return {"bandwidth": float(1.0 / slope) if slope > 0 else float("inf"),
          "latency_s": max(float(intercept), float(ys.min()) / 2), "processes": processes,
          "by_size": by_size}


# -- a whole profile ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
  """Sizes used by :func:`measure`.

  Attributes:
    disk_file_bytes: size of the temporary file read for disk figures.
    disk_block_sizes: request sizes measured.
    disk_queue_depths: requests in flight measured (reader threads, or requests
      queued in the kernel: the better of the two is kept).
    disk_max_requests: at most this many requests per (size, depth) point,
      so 4 KiB points finish quickly; each point reads
      ``min(disk_file_bytes, size * disk_max_requests)`` bytes.
    memcpy_bytes: size of the copied buffer; large enough to leave the caches.
    matvec_dim: weight matrices are ``matvec_dim`` square.
    matvec_total_bytes: the matvec cycles through this many bytes of distinct
      matrices per repetition, so caches cannot serve the weights (the host
      here reports a 480 MiB L3) -- as in decode, where every weight is
      touched once per token.
    matmul_dim: square matmul size for FLOP/s.
    transfer_bytes: size of each host->device ``device_put``.
    repeats: repetitions per figure; the best is kept (noise on shared
      machines only ever slows a run down).
  """

  disk_file_bytes: int = 1 * GiB
  disk_block_sizes: tuple[int, ...] = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)
  disk_queue_depths: tuple[int, ...] = (1, 4, 8, 16, 32)
  disk_max_requests: int = 4096
  memcpy_bytes: int = 512 * MiB
  matvec_dim: int = 4096
  matvec_total_bytes: int = 1 * GiB
  matmul_dim: int = 2048
  transfer_bytes: int = 256 * MiB
  repeats: int = 3

  @classmethod
  def quick(cls) -> MeasureSettings:
    """Small sizes (seconds, not minutes); figures are indicative only."""
    return cls(
      disk_file_bytes=8 * MiB,
      disk_max_requests=256,
      memcpy_bytes=32 * MiB,
      matvec_dim=1024,
      matvec_total_bytes=32 * MiB,
      matmul_dim=512,
      transfer_bytes=16 * MiB,
      repeats=2,
    )


def _matvec_table(device, s: MeasureSettings, step, label: str):
  """Per dtype: the faster formulation's rate, and which one it was."""
  import jax.numpy as jnp

  rates: dict[str, float] = {}
  impls: dict[str, str] = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    name = jnp.dtype(dtype).name
    step(f"{label} matvec {name}")
    by_impl = matvec_rate(device, dtype, (s.matvec_dim, s.matvec_dim), s.matvec_total_bytes,
                          s.repeats)
    impls[name] = max(by_impl, key=by_impl.get)
    rates[name] = by_impl[impls[name]]
  return rates, impls


def _matmul_table(device, s: MeasureSettings, step, label: str) -> dict[str, float]:
  import jax.numpy as jnp

  out = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    name = jnp.dtype(dtype).name
    step(f"{label} matmul {name}")
    out[name] = matmul_rate(device, dtype, s.matmul_dim, s.repeats)
  return out


def _transfer_table(device, s: MeasureSettings, step) -> dict[str, float]:
  from hetflow.memory.tiers import memory_kinds

  out = {}
  kinds = memory_kinds(device)
  for kind in ("pinned_host", "unpinned_host"):
    if kind in kinds:
      step(f"host->device from {kind}")
      out[kind] = transfer_rate(device, kind, s.transfer_bytes, s.repeats)
  return out


def _cpu_model() -> str:
  return cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def measure(
  workdir: str | os.PathLike,
  quick: bool = False,
  progress: bool = True,
  settings: MeasureSettings | None = None,
  name: str | None = None,
  network: bool = False,
) -> HardwareProfile:
  """Measures this machine.

  Disk figures are cold: the page cache is dropped (``drop_caches`` as root,
  else ``fadvise``) and reads go through ``ReaderPool`` with O_DIRECT (the
  profile's ``disk_direct`` says whether the reader managed it).
  Compute figures use XLA on the CPU device, and on the jax default device
  when that is an accelerator (else the device figures equal the CPU ones).

  Args:
    workdir: directory on the disk to measure; a temporary file is written
      there and removed.
    quick: use :meth:`MeasureSettings.quick` (seconds; for tests).
    progress: show a tqdm bar of the steps.
    settings: explicit sizes; overrides ``quick``.
    name: profile name; default the host name.
    network: also time an all-reduce between two local processes
      (`probe_allreduce`, ~1 min) as the profile's ``network``.

  Returns:
    The measured HardwareProfile.
  """
  import jax
  from tqdm.auto import tqdm

  s = settings or (MeasureSettings.quick() if quick else MeasureSettings())
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  cpu = jax.devices("cpu")[0]
  default = jax.devices()[0]
  on_accel = default.platform != "cpu"
  steps = (len(s.disk_block_sizes) * len(s.disk_queue_depths) * s.repeats + 1 + 4 + 2
           + len(FORMATS)
           + (4 if on_accel else 0))
  bar = tqdm(total=steps, desc="profiling", disable=not progress)

  def step(what: str) -> None:
    bar.set_postfix_str(what)
    bar.update(1)

  try:
    disk, direct, method = _disk_table(workdir, s, step)
    step("memcpy")
    memory_bw = memcpy_rate(s.memcpy_bytes, s.repeats)
    cpu_mv, impls = _matvec_table(cpu, s, step, "cpu")
    for fmt in FORMATS:
      step(f"cpu matvec {fmt} (formats.matmul)")
      cpu_mv[fmt] = format_matvec_rate(cpu, fmt, (s.matvec_dim, s.matvec_dim),
                                       s.matvec_total_bytes, s.repeats)
      impls[fmt] = "formats.matmul"
    cpu_fl = _matmul_table(cpu, s, step, "cpu")
    if on_accel:
      dev_mv, _ = _matvec_table(default, s, step, default.platform)
      dev_fl = _matmul_table(default, s, step, default.platform)
    else:
      dev_mv, dev_fl = dict(cpu_mv), dict(cpu_fl)
    h2d = _transfer_table(default, s, step)
  finally:
    bar.close()

  net = {}
  if network:
    found = probe_allreduce(repeats=s.repeats * 30)
    net = {k: found[k] for k in ("bandwidth", "latency_s", "processes")}
  device_memory = None
  if on_accel:
    stats = default.memory_stats() or {}
    device_memory = stats.get("bytes_limit")
  with open("/proc/meminfo") as f:
    host_memory = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
  kind = ("quick" if s == MeasureSettings.quick() else "full" if s == MeasureSettings()
          else "custom")
  notes = (
    f"measured {datetime.date.today().isoformat()} with jax {jax.__version__} on "
    f"{default.platform} ({default.device_kind}); CPU {_cpu_model()}; "
    f"disk: {'O_DIRECT' if direct else 'buffered (O_DIRECT refused)'}, cache dropped with "
    f"{method}, file {format_bytes(round(s.disk_file_bytes))} in {workdir}; "
    f"matvec {s.matvec_dim}^2 cycling {format_bytes(s.matvec_total_bytes)} of matrices; "
    f"matmul {s.matmul_dim}^3; settings {kind}"
    + ("" if on_accel else "; host->device on CPU is a memcpy into fresh pages")
  )
  return HardwareProfile(
    name=name or socket.gethostname(),
    cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    disk_read_bw=disk,
    host_to_device_bw=h2d,
    memory_bw=memory_bw,
    cpu_matvec_bw=cpu_mv,
    cpu_flops=cpu_fl,
    device_matvec_bw=dev_mv,
    device_flops=dev_fl,
    matvec_impl=impls,
    device_memory=device_memory,
    host_memory=host_memory,
    disk_direct=direct,
    network=net,
    notes=notes,
  )
