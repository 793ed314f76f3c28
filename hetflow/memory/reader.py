"""Asynchronous O_DIRECT reads into aligned buffers, and cold-cache helpers.

Why O_DIRECT: a "disk" tier served from the page cache is RAM, and would make
every disk benchmark lie (``docs/measuring.md``: cold means cold). O_DIRECT needs
the buffer address, the file offset and the length to be multiples of the
logical block size; hetflow uses 4096 everywhere, and its store pads files to
4096 so the last partial block can be read rounded up.

Why several requests in flight: on the machines here one 4 KiB O_DIRECT read
at a time gets ~0.06 GB/s and 1 MiB reads ~2 GB/s; keeping several requests
queued hides per-request latency. ``ReaderPool.read_into`` splits a read into
``chunk``-sized requests spread over ``num_workers`` threads, so the queue
depth is ``num_workers``. ``ReaderPool.read_many`` serves many small
``(offset, size, destination)`` requests of one file (a neuron store's
records): the calling thread queues them in the kernel (Linux native AIO,
``num_workers`` in flight) and one worker waits for them, both in a compiled
loop (``preads.cc`` beside this file, built on first use by
``hetflow.memory.compiled``) that holds no GIL. Why: with reads issued from
Python, one ``preadv`` at a time per thread, every finished read waited for
the GIL while the main thread ran Python (up to the 5 ms switch interval), and
the disk's queue drained (6x fewer bytes per second with a busy main thread,
WORKSPACE_NOTES.md, seventh session); a worker woken to issue the reads
waited ~1 ms for the GIL before the disk started, and a thread per request in
flight reached ~60% of the kernel queue's requests per second (ninth
session). Where the kernel refuses AIO, a batch per worker is read one request
at a time in the compiled loop; without a compiler, or with HETFLOW_NATIVE=0,
in Python. Requests come as arrays (``Requests``), so a batch of hundreds of
records costs no Python per record.

What happened is recorded, not assumed: ``ReaderPool.record()`` counts direct
and buffered requests separately, and a file that refuses O_DIRECT falls back
to buffered reads with a warning naming the file and the reason, listed in
the record's ``fallbacks``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import errno
import functools
import logging
import os
import subprocess
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from hetflow.memory import compiled
from hetflow.memory.buffers import PAGE, aligned_empty, round_up, view_as
from hetflow.memory.cache import cache_root

if TYPE_CHECKING:
  from hetflow.memory.store import LayerStore

_O_DIRECT = getattr(os, "O_DIRECT", 0)  # absent on macOS; reads are then buffered
_log = logging.getLogger(__name__)


class ReadError(OSError):
  """A read returned fewer bytes than asked (truncated file) or failed."""


# (file offset, bytes, destination): the destination is a byte offset in the
# buffer, or a tuple of (offset, bytes) segments that the bytes fill in turn
# (one preadv scattering a record's rows into separate planes).
Request = tuple[int, int, "int | tuple[tuple[int, int], ...]"]


def check_read_options(reader_threads: int, read_chunk: int) -> None:
  """Refuses reader settings a strategy's Options cannot use, naming the option."""
  if not isinstance(reader_threads, int) or reader_threads < 1:
    raise ValueError(f"reader_threads={reader_threads!r}; expected an int >= 1.")
  if not isinstance(read_chunk, int) or read_chunk <= 0 or read_chunk % 4096:
    raise ValueError(f"read_chunk={read_chunk!r}; expected a positive multiple of 4096.")


@dataclasses.dataclass(frozen=True)
class ReadRecord:
  """What a ReaderPool really did since its last reset.

  Attributes:
    bytes: bytes delivered into buffers (not counting O_DIRECT round-up).
    requests: ``preadv`` calls issued.
    seconds: time the workers spent reading, summed over the workers.
    direct_requests: requests served through an O_DIRECT descriptor.
    buffered_requests: requests served through the page cache.
    fallbacks: one ``"path: reason"`` per file that refused O_DIRECT and was
      read buffered instead (kept across resets: the file stays buffered).
    calls: ``read_into``/``read_many`` calls completed.
    native_requests: requests read by the compiled batch loop (the rest: Python).
    async_requests: of those, requests queued in the kernel through Linux native
      AIO, ``num_workers`` in flight from one thread (the rest: one preadv after
      another in each worker).
  """

  bytes: int = 0
  requests: int = 0
  seconds: float = 0.0
  direct_requests: int = 0
  buffered_requests: int = 0
  fallbacks: tuple[str, ...] = ()
  calls: int = 0
  native_requests: int = 0
  async_requests: int = 0

  @property
  def direct(self) -> bool | None:
    """True if every request was O_DIRECT, False if any was buffered, None if none ran."""
    if not self.requests:
      return None
    return self.buffered_requests == 0


def coalesce_requests(requests: Sequence[Request], max_bytes: int) -> list[Request]:
  """Merges requests adjacent both in the file and in the buffer.

  Args:
    requests: ``(file offset, bytes, destination offset)`` in issue order.
    max_bytes: the largest merged request; a run longer than this is cut
      into several requests (so that several workers share it).

  Returns:
    The merged requests, in order. Only requests that end exactly where the
    next one starts (in the file and in the buffer) merge, so the bytes
    delivered are the same.
  """
  out: list[list[int]] = []
  for off, n, dst in requests:
    last = out[-1] if out else None
    if (last is not None and isinstance(dst, int) and isinstance(last[2], int)
        and last[0] + last[1] == off and last[2] + last[1] == dst and last[1] + n <= max_bytes):
      last[1] += n
    else:
      out.append([int(off), int(n), dst if isinstance(dst, tuple) else int(dst)])
  return [(a, b, c) for a, b, c in out]


@dataclasses.dataclass(frozen=True)
class Requests:
  """Many reads of one file as arrays: what ``read_many`` serves without Python per read.

  Request i reads ``sizes[i]`` bytes at file offset ``offsets[i]`` into its segments
  ``first[i]`` .. ``first[i + 1]`` - 1 of the buffer, filled in turn by one ``preadv``:
  ``length[k]`` bytes at buffer offset ``dest[k]`` each (all int64).
  """

  offsets: np.ndarray
  sizes: np.ndarray
  first: np.ndarray
  dest: np.ndarray
  length: np.ndarray

  @classmethod
  def of(cls, requests: Requests | Sequence[Request]) -> Requests:
    """`requests` as arrays (``Request`` tuples converted; Requests as they are)."""
    if isinstance(requests, Requests):
      return requests
    offsets, sizes, first, dest, length = [], [], [0], [], []
    for off, n, dst in requests:
      segs = dst if isinstance(dst, tuple) else ((dst, n),)
      offsets.append(off)
      sizes.append(n)
      for d, b in segs:
        dest.append(d)
        length.append(b)
      first.append(len(dest))
    a = lambda v: np.asarray(v, np.int64)  # noqa: E731
    return cls(a(offsets), a(sizes), a(first), a(dest), a(length))

  @classmethod
  def planar(cls, positions: np.ndarray, a_nbytes: int, b_nbytes: int, a_dest: int,
             b_dest: int, max_run: int = 1) -> Requests:
    """Reads of fixed-size records at sorted file `positions` into consecutive slots of a
    planar buffer (hetflow/memory/bundle_store.py): record i is read from file offset
    ``positions[i] * (a_nbytes + b_nbytes)``, its first `a_nbytes` into
    ``a_dest + i * a_nbytes``, the rest into ``b_dest + i * b_nbytes``. One request per
    run of adjacent records, at most `max_run` long (1: one per record).

    Built by the compiled loop's ``hetflow_planar_requests`` where it is built (a
    decoding neuron_cluster asks for ~50 batches a token, and the dozen numpy
    operations below cost ~0.2 ms each time), else by numpy: the same arrays.
    """
    positions = np.ascontiguousarray(positions, np.int64)
    n, max_run = len(positions), max(1, int(max_run))
    lib = _native()
    if lib is not None:
      offsets, sizes, first = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n + 1, np.int64)
      dest, length = np.empty(2 * n, np.int64), np.empty(2 * n, np.int64)
      k = lib.hetflow_planar_requests(n, positions.ctypes.data, a_nbytes, b_nbytes, a_dest,
                                      b_dest, max_run, offsets.ctypes.data, sizes.ctypes.data,
                                      first.ctypes.data, dest.ctypes.data, length.ctypes.data)
      first[k] = 2 * n
      return cls(offsets[:k], sizes[:k], first[:k + 1], dest, length)
    index = np.arange(n)
    start = np.ones(n, bool)
    if max_run > 1 and n:  # a request starts where a run breaks or reaches max_run records
      start[1:] = np.diff(positions) != 1
      run_first = np.maximum.accumulate(np.where(start, index, 0))
      start |= (index - run_first) % max_run == 0
    heads = np.flatnonzero(start)
    count = np.diff(np.append(heads, n))
    record = a_nbytes + b_nbytes
    # Each record's two segments, in turn: its plane A bytes, its plane B bytes.
    dest = np.stack([a_dest + index * a_nbytes, b_dest + index * b_nbytes], 1).reshape(-1)
    length = np.tile(np.array([a_nbytes, b_nbytes], np.int64), n)
    return cls(positions[heads] * record, count * record, np.append(heads, n) * 2, dest, length)

  def __len__(self) -> int:
    return len(self.offsets)

  @property
  def nbytes(self) -> int:
    """Bytes the requests deliver."""
    return int(self.sizes.sum())

  def request(self, i: int) -> Request:
    """Request i as a ``Request`` tuple (an int destination when it has one segment)."""
    a, b = int(self.first[i]), int(self.first[i + 1])
    off, n = int(self.offsets[i]), int(self.sizes[i])
    if b - a == 1:
      return off, n, int(self.dest[a])
    return off, n, tuple(zip(self.dest[a:b].tolist(), self.length[a:b].tolist()))

  def part(self, a: int, b: int) -> Requests:
    """Requests a .. b - 1 (their segments' offsets rebased to this part's arrays)."""
    s, e = int(self.first[a]), int(self.first[b])
    return Requests(self.offsets[a:b], self.sizes[a:b], self.first[a:b + 1] - s,
                    self.dest[s:e], self.length[s:e])


_BATCH_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")
_BATCH_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preads.cc")


@functools.cache
def _native():
  """The compiled read loops (``preads.cc``), or None: HETFLOW_NATIVE=0, no compiler, or a
  failed build (one logged warning; the reader's Python loop does the same reads)."""
  if compiled.switched_off():
    return None
  try:
    cxx = compiled.compiler()
    if cxx is None:
      raise compiled.BuildError("no C++ compiler found (g++, c++ or $HETFLOW_CXX)")
    key = compiled.build_key([open(_BATCH_SOURCE).read(), cxx, compiled.compiler_version(cxx),
                              " ".join(_BATCH_FLAGS)])
    path = compiled.build(cxx, [_BATCH_SOURCE], _BATCH_FLAGS,
                          os.path.join(cache_root(), "native", key), "libhetflow_reads.so")
    lib = ctypes.CDLL(path)  # its calls release the GIL
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.hetflow_read_requests.restype = None
    lib.hetflow_read_requests.argtypes = [ctypes.c_int, i64] + [ptr] * 5 + [i64] * 3 + [ptr]
    lib.hetflow_aio_start.restype = ptr
    lib.hetflow_aio_start.argtypes = [ctypes.c_int, i64] + [ptr] * 4 + [i64] * 4 + [ptr]
    lib.hetflow_aio_finish.restype = None
    lib.hetflow_aio_finish.argtypes = [ptr]
    lib.hetflow_planar_requests.restype = i64
    lib.hetflow_planar_requests.argtypes = [i64, ptr] + [i64] * 5 + [ptr] * 5
    lib.hetflow_check_requests.restype = i64
    lib.hetflow_check_requests.argtypes = [i64, i64] + [ptr] * 5 + [i64] * 3
  except (compiled.BuildError, OSError, AttributeError) as e:
    _log.warning("hetflow's compiled read loop is not available, so small reads are issued"
                 " from Python (slower while the main thread is busy): %s", e)
    return None
  return lib


@dataclasses.dataclass
class _Queued:
  """A batch queued in the kernel (``hetflow_aio_start``): its handle, and the arrays
  the kernel and the compiled loop use until ``hetflow_aio_finish`` returns."""
  handle: int
  arrays: list[np.ndarray]
  done: np.ndarray


class _Job:
  """One read_into call: a future completed when its last chunk finishes."""

  def __init__(self, path: str, nchunks: int, nbytes: int):
    self.path = path
    self.remaining = nchunks
    self.nbytes = nbytes
    self.error: BaseException | None = None
    self.lock = threading.Lock()
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.future.set_running_or_notify_cancel()  # not cancellable: workers own the buffer


class ReaderPool:
  """A pool of threads that read files into caller-provided aligned buffers.

  The one disk reader of hetflow: whole groups and tensors (``read_into``,
  ``read_group``, ``read_tensor``) and many small records of one file
  (``read_many``).

  Args:
    num_workers: threads, i.e. the number of requests in flight.
    direct: try O_DIRECT (falls back to buffered reads on filesystems that
      refuse it, warning once per file and recording it, see ``record()``);
      False reads through the page cache on purpose (not a fallback).
    native: read ``read_many``'s batches in the compiled loop when it can be
      built (False: the Python loop, as with HETFLOW_NATIVE=0).

  Attributes:
    num_workers: as given.
    direct: True while every file so far was opened with O_DIRECT; False once
      any read had to fall back to buffered I/O (benchmarks report this: their
      "disk" figures are then page-cache figures unless caches were dropped).
  """

  def __init__(self, num_workers: int = 4, direct: bool = True, native: bool = True):
    if num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    self.num_workers = num_workers
    self.direct = bool(direct and _O_DIRECT)
    self._want_direct = self.direct
    self._native = _native() if native else None
    self._async = True  # False once the kernel refused native AIO
    self._executor = concurrent.futures.ThreadPoolExecutor(
      num_workers, thread_name_prefix="hetflow-reader"
    )
    self._lock = threading.Lock()
    # path -> (fd, is_direct, (st_dev, st_ino)); the inode check reopens a
    # file that was replaced (e.g. a store rewritten with overwrite=True).
    self._fds: dict[str, tuple[int, bool, tuple[int, int]]] = {}
    self._stale_fds: list[int] = []  # direct fds replaced after a fallback
    self._fallbacks: list[str] = []
    self._closed = False
    self.reset_stats()

  # -- what happened --------------------------------------------------------

  def reset_stats(self) -> None:
    """Zeroes the counters of :meth:`record` (the fallbacks stay: those files stay buffered)."""
    with self._lock:
      self._counts = {"bytes": 0, "requests": 0, "seconds": 0.0, "direct_requests": 0,
                      "buffered_requests": 0, "calls": 0, "native_requests": 0,
                      "async_requests": 0}

  def record(self) -> ReadRecord:
    """The reads since the last reset: bytes, requests, time, direct or buffered, fallbacks."""
    with self._lock:
      return ReadRecord(fallbacks=tuple(self._fallbacks), **self._counts)

  # -- files ----------------------------------------------------------------

  def _open(self, path: str) -> tuple[int, bool]:
    st = os.stat(path)
    ident = (st.st_dev, st.st_ino)
    with self._lock:
      cached = self._fds.get(path)
      if cached is not None and cached[2] == ident:
        return cached[0], cached[1]
      if cached is not None:
        os.close(cached[0])
        del self._fds[path]
      fd, is_direct = None, False
      if self._want_direct:
        try:
          fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | _O_DIRECT)
          is_direct = True
        except OSError as e:
          if e.errno != errno.EINVAL:
            raise
          self._fall_back(path, e)
      if fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
      self._fds[path] = (fd, is_direct, ident)
      return fd, is_direct

  def _fall_back(self, path: str, err: OSError) -> None:
    # Called with self._lock held, once per file (its fd is then cached buffered).
    self.direct = False
    self._fallbacks.append(f"{path}: {err}")
    warnings.warn(
      f"O_DIRECT refused for {path} ({err}); falling back to buffered reads. "
      "Disk figures from this pool measure the page cache unless caches are "
      "dropped before each run.",
      RuntimeWarning,
      stacklevel=4,
    )

  def _reopen_buffered(self, path: str, err: OSError) -> int:
    with self._lock:
      cached = self._fds.get(path)
      if cached is not None and not cached[1]:
        return cached[0]
      self._fall_back(path, err)
      fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
      if cached is not None:
        # Other workers may still use the direct fd; leave it open (it is
        # closed with the pool) rather than close it under them.
        self._stale_fds.append(cached[0])
      self._fds[path] = (fd, False, cached[2] if cached else (0, 0))
      return fd

  # -- reads ----------------------------------------------------------------

  def read_into(
    self,
    path: str | os.PathLike,
    offset: int,
    buffer: np.ndarray,
    nbytes: int | None = None,
    chunk: int = 1 << 20,
  ) -> concurrent.futures.Future:
    """Starts reading ``nbytes`` of ``path`` at ``offset`` into ``buffer[:nbytes]``.

    The read is split into ``chunk``-byte requests that the workers serve
    concurrently. With O_DIRECT the last request is rounded up to 4096 bytes
    (the store pads its files); when ``buffer`` has no room for the
    round-up, the last partial block goes through a small bounce buffer.

    Args:
      path: file to read.
      offset: file offset (a multiple of 4096 for O_DIRECT).
      buffer: C-contiguous 1-D uint8 array, address aligned to 4096 for
        O_DIRECT (see ``aligned_empty``). Do not touch it until the future
        is done: the workers write into it.
      nbytes: bytes to read; default ``buffer.nbytes``.
      chunk: request size, a multiple of 4096.

    Returns:
      A Future whose result is ``nbytes``. It completes only after every
      request has finished (so the buffer is quiet), and fails with
      :class:`ReadError` naming the file, offset and bytes expected/got if
      the file is shorter than asked or a read fails.

    Raises:
      ValueError: on misaligned arguments or a buffer that is too small.
      RuntimeError: if the pool is closed.
    """
    path = os.path.abspath(os.fspath(path))
    nbytes = buffer.nbytes if nbytes is None else int(nbytes)
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or not buffer.flags.c_contiguous:
      raise ValueError("buffer must be a C-contiguous 1-D uint8 array (use aligned_empty)")
    if not buffer.flags.writeable:
      raise ValueError("buffer is read-only")
    if nbytes < 0 or nbytes > buffer.nbytes:
      raise ValueError(f"cannot read {nbytes} bytes into a {buffer.nbytes}-byte buffer")
    if chunk <= 0 or chunk % PAGE:
      raise ValueError(f"chunk must be a positive multiple of {PAGE}, got {chunk}")
    if self._closed:
      raise RuntimeError("ReaderPool is closed")
    fd, is_direct = self._open(path)
    if is_direct and (offset % PAGE or buffer.ctypes.data % PAGE):
      raise ValueError(
        f"O_DIRECT needs a {PAGE}-aligned file offset and buffer address; got offset "
        f"{offset}, buffer address % {PAGE} = {buffer.ctypes.data % PAGE} "
        "(allocate with hetflow.memory.aligned_empty)"
      )
    starts = list(range(0, nbytes, chunk))
    job = _Job(path, len(starts), nbytes)
    if not starts:
      self._finish(job)
      return job.future
    for start in starts:
      need = min(chunk, nbytes - start)
      self._executor.submit(self._run_chunk, job, buffer, start, offset + start, need)
    return job.future

  def read_group(
    self, store: LayerStore, group: str, buffer: np.ndarray, chunk: int = 1 << 20
  ) -> concurrent.futures.Future:
    """Reads a store group's whole file into ``buffer`` (>= ``store.group_nbytes(group)``).

    Turn the filled buffer into arrays with ``store.views(group, buffer)``
    or ``StoreView(store, group, buffer)``.
    """
    return self.read_into(store.file(group), 0, buffer, store.group_nbytes(group), chunk)

  def read_tensor(
    self, store: LayerStore, group: str, tensor: str, buffer: np.ndarray, chunk: int = 1 << 20
  ) -> concurrent.futures.Future:
    """Reads one tensor into ``buffer[:nbytes]``; view it with ``view_as(buffer, 0, ...)``."""
    info = store.tensors(group)[tensor]
    return self.read_into(store.file(group), info.offset, buffer, info.nbytes, chunk)

  def read_many(
    self,
    path: str | os.PathLike,
    buffer: np.ndarray,
    requests: Requests | Sequence[Request],
    *,
    coalesce: int = 0,
    parallel: bool = True,
  ) -> concurrent.futures.Future:
    """Starts many ``(file offset, bytes, destination offset)`` reads of one file.

    With the compiled loop and Linux native AIO, this thread queues them in the
    kernel, ``num_workers`` in flight, and a worker waits for them. Otherwise
    they are cut into at most ``num_workers`` contiguous batches (so each
    worker reads in file order), one worker task per batch. With O_DIRECT a
    one-segment request is
    rounded up to 4096 bytes; a destination without room for that round-up
    reads its last partial block through a bounce page.

    Args:
      path: the file.
      buffer: C-contiguous 1-D uint8 array, 4096-aligned for O_DIRECT.
      requests: ``Requests``, or ``(offset, nbytes, dest)`` tuples; offsets
        and destinations must be multiples of 4096 for O_DIRECT. ``dest``
        may be a tuple of ``(offset, bytes)`` segments summing to ``nbytes``
        (one scattering read; with O_DIRECT every segment a multiple of 4096
        long).
      coalesce: merge tuple requests adjacent in the file and in the buffer
        into requests of at most this many bytes (``coalesce_requests``); 0
        issues them as given.
      parallel: False runs the reads here, one at a time (queue depth 1),
        and returns a completed future.

    Returns:
      A Future whose result is the bytes read; it completes after every
      request has finished, and fails with :class:`ReadError` naming the
      file and offset if one fails or comes back short.

    Raises:
      ValueError: on a misaligned request, a destination outside the buffer,
        or a buffer that is not a writable 1-D uint8 array.
      RuntimeError: if the pool is closed.
    """
    path = os.path.abspath(os.fspath(path))
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or not buffer.flags.c_contiguous:
      raise ValueError("buffer must be a C-contiguous 1-D uint8 array (use aligned_empty)")
    if not buffer.flags.writeable:
      raise ValueError("buffer is read-only")
    if self._closed:
      raise RuntimeError("ReaderPool is closed")
    if coalesce and not isinstance(requests, Requests):
      requests = coalesce_requests(requests, coalesce)
    reqs = Requests.of(requests)
    fd, is_direct = self._open(path)
    self._check(path, buffer, reqs, is_direct)
    total = reqs.nbytes
    if not len(reqs):
      job = _Job(path, 0, 0)
      self._finish(job)
    elif not parallel:
      job = _Job(path, 1, total)
      self._run_batch(job, buffer, reqs)
    elif (queued := self._queue(fd, is_direct, buffer, reqs)) is not None:
      job = _Job(path, 1, total)  # in the kernel's queue: a worker waits for it
      try:
        self._executor.submit(self._run_batch, job, buffer, reqs, queued)
      except BaseException:  # the pool shut down meanwhile: the reads must still land
        self._native.hetflow_aio_finish(queued.handle)
        raise
    else:
      k = min(self.num_workers, len(reqs))
      bounds = [i * len(reqs) // k for i in range(k + 1)]
      batches = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
      job = _Job(path, len(batches), total)
      for a, b in batches:
        self._executor.submit(self._run_batch, job, buffer, reqs.part(a, b))
    return job.future

  @staticmethod
  def _check(path: str, buffer: np.ndarray, reqs: Requests, is_direct: bool) -> None:
    """Refuses requests that do not fit the buffer or that O_DIRECT cannot serve, naming
    the first. The compiled ``hetflow_check_requests`` passes the good ones at ~1/20 of
    the numpy check's cost; the numpy check finds and names a bad one."""
    lib = _native()
    if lib is not None and len(reqs) and len(reqs.first) == len(reqs) + 1:
      arrays = ReaderPool._native_arrays(reqs)  # held until the call returns
      if lib.hetflow_check_requests(len(reqs), len(reqs.dest), *(a.ctypes.data for a in arrays),
                                    buffer.nbytes, buffer.ctypes.data,
                                    PAGE if is_direct else 0) < 0:
        return
    count = np.diff(reqs.first)
    owner = np.repeat(np.arange(len(reqs)), count)  # each segment's request

    def first_bad(request_bad, segment_bad):
      bad = request_bad.copy()
      bad[owner[segment_bad]] = True
      return int(np.argmax(bad)) if bad.any() else None

    filled = np.bincount(owner, reqs.length, minlength=len(reqs)).astype(np.int64)
    i = first_bad((reqs.sizes < 0) | (count < 1) | (filled != reqs.sizes),
                  (reqs.dest < 0) | (reqs.dest + reqs.length > buffer.nbytes))
    if i is not None:
      raise ValueError(f"request {reqs.request(i)} of {path} does not fit a"
                       f" {buffer.nbytes}-byte buffer")
    if is_direct:
      i = first_bad(reqs.offsets % PAGE != 0,
                    ((buffer.ctypes.data + reqs.dest) % PAGE != 0)
                    | ((count[owner] > 1) & (reqs.length % PAGE != 0)))
      if i is not None:
        raise ValueError(f"O_DIRECT needs {PAGE}-aligned file offsets and destinations; request"
                         f" {reqs.request(i)} of {path} is not (allocate with"
                         " hetflow.memory.aligned_empty)")

  def _run_batch(self, job: _Job, buffer: np.ndarray, reqs: Requests,
                 queued: _Queued | None = None) -> None:
    # The compiled loop reads the batch without the GIL (or waits for it in the
    # kernel's queue); the requests that failed or came back short go through the
    # Python loop (one preadv per request, counters kept locally and added once
    # per batch: a lock and a stat per request cost ~20% of the throughput at
    # depth 8), where anything unusual (a short read, an error, no room for the
    # round-up) goes through _read_span, which retries, falls back or raises.
    mv = memoryview(buffer)
    size = buffer.nbytes
    nbytes = requests = direct = native = 0
    t0 = time.perf_counter()
    if queued is not None:  # first, whatever happens next: the kernel is writing the buffer
      self._native.hetflow_aio_finish(queued.handle)
    try:
      fd, is_direct = self._open(job.path)  # once per batch
      left = np.arange(len(reqs))
      if queued is not None:
        left = np.flatnonzero(queued.done < reqs.sizes)
      elif self._native is not None and job.error is None:
        arrays, done = self._native_arrays(reqs), np.empty(len(reqs), np.int64)
        offsets, sizes, first, dest, length = (a.ctypes.data for a in arrays)
        self._native.hetflow_read_requests(fd, len(reqs), offsets, sizes, first, dest, length,
                                           *self._native_buffer(is_direct, buffer),
                                           done.ctypes.data)
        left = np.flatnonzero(done < reqs.sizes)
      native = len(reqs) - len(left)
      nbytes += int(reqs.sizes.sum() - reqs.sizes[left].sum())
      requests += native
      direct += native * is_direct
      for i in left.tolist():
        if job.error is not None:  # after a failure, skip the rest quickly
          break
        off, n, dst = reqs.request(i)
        if isinstance(dst, tuple):
          fd, is_direct = self._read_scattered(job.path, buffer, mv, dst, off, n, (fd, is_direct))
          nbytes += n
          requests += 1
          direct += is_direct
          continue
        want = round_up(n) if is_direct else n
        got = -1
        if dst + want <= size:
          try:
            got = os.preadv(fd, [mv[dst : dst + want]], off)
            requests += 1
            direct += is_direct
          except OSError:
            got = -1
        if got >= n:
          nbytes += n
        else:
          fd, is_direct = self._read_span(job.path, buffer, dst, off, n, (fd, is_direct))
    except BaseException as e:  # noqa: BLE001 - delivered through the future
      with job.lock:
        if job.error is None:
          job.error = e
    with self._lock:
      self._counts["bytes"] += nbytes
      self._counts["requests"] += requests
      self._counts["direct_requests"] += direct
      self._counts["buffered_requests"] += requests - direct
      self._counts["native_requests"] += native
      self._counts["async_requests"] += native if queued is not None else 0
      self._counts["seconds"] += time.perf_counter() - t0
    with job.lock:
      job.remaining -= 1
      last = job.remaining == 0
    if last:
      self._finish(job)

  @staticmethod
  def _native_arrays(reqs: Requests) -> list[np.ndarray]:
    """The compiled loops' arrays: offsets, sizes, first, dest, length (as int64)."""
    return [np.ascontiguousarray(a, np.int64)
            for a in (reqs.offsets, reqs.sizes, reqs.first, reqs.dest, reqs.length)]

  @staticmethod
  def _native_buffer(is_direct: bool, buffer: np.ndarray) -> tuple[int, int, int]:
    """The compiled loops' buffer arguments: its address, its bytes, and the page a
    one-segment request's length is rounded up to with O_DIRECT (0: none), where the
    buffer has room (its last partial block read whole)."""
    return buffer.ctypes.data, buffer.nbytes, PAGE if is_direct else 0

  def _queue(self, fd: int, is_direct: bool, buffer: np.ndarray,
             reqs: Requests) -> _Queued | None:
    """Queues `reqs` in the kernel (native AIO, `num_workers` in flight) from this
    thread, so the disk starts before any worker wakes; None where the compiled loop
    or the kernel's AIO is not available."""
    if self._native is None or not self._async:
      return None
    arrays, done = self._native_arrays(reqs), np.empty(len(reqs), np.int64)
    offsets, _, first, dest, length = (a.ctypes.data for a in arrays)
    handle = self._native.hetflow_aio_start(fd, len(reqs), offsets, first, dest, length,
                                            *self._native_buffer(is_direct, buffer),
                                            self.num_workers, done.ctypes.data)
    if not handle:
      self._async = False  # from now on: a batch per worker, one request at a time each
      return None
    return _Queued(handle, arrays, done)

  def _read_scattered(self, path: str, buffer: np.ndarray, mv: memoryview,
                      segments: tuple[tuple[int, int], ...], off: int, n: int,
                      opened: tuple[int, bool]) -> tuple[int, bool]:
    """One preadv filling `segments` in turn; an unusual outcome (error, short
    read) retries through _read_span into a bounce buffer, then copies."""
    fd, is_direct = opened
    try:
      if os.preadv(fd, [mv[d:d + b] for d, b in segments], off) == n:
        return fd, is_direct
    except OSError:
      pass
    bounce = aligned_empty(round_up(n))
    fd, is_direct = self._read_span(path, bounce, 0, off, n)
    at = 0
    for d, b in segments:
      buffer[d:d + b] = bounce[at:at + b]
      at += b
    with self._lock:  # _read_span counted these bytes; the caller counts them again
      self._counts["bytes"] -= n
    return fd, is_direct

  def _run_chunk(self, job: _Job, buffer: np.ndarray, start: int, file_off: int, need: int) -> None:
    try:
      if job.error is None:  # after a failure, skip the rest quickly
        self._read_span(job.path, buffer, start, file_off, need)
    except BaseException as e:  # noqa: BLE001 - delivered through the future
      with job.lock:
        if job.error is None:
          job.error = e
    with job.lock:
      job.remaining -= 1
      last = job.remaining == 0
    if last:
      self._finish(job)

  def _finish(self, job: _Job) -> None:
    if job.error is not None:
      job.future.set_exception(job.error)
      return
    with self._lock:
      self._counts["calls"] += 1
    job.future.set_result(job.nbytes)

  def _read_span(
    self,
    path: str,
    buffer: np.ndarray,
    start: int,
    file_off: int,
    need: int,
    opened: tuple[int, bool] | None = None,
  ) -> tuple[int, bool]:
    """Reads one request; returns the (fd, is_direct) it ended up using."""
    fd, is_direct = opened or self._open(path)
    mv = memoryview(buffer)
    try:
      got = self._read_exact(fd, is_direct, mv, buffer, start, file_off, need)
    except OSError as e:
      if not (is_direct and e.errno == errno.EINVAL):
        raise ReadError(
          e.errno, f"reading {need} bytes of {path} at offset {file_off} failed: {e}"
        ) from e
      # Some filesystems accept O_DIRECT at open and refuse it at read.
      fd, is_direct = self._reopen_buffered(path, e), False
      got = self._read_exact(fd, False, mv, buffer, start, file_off, need)
    if got >= need:
      with self._lock:
        self._counts["bytes"] += need
      return fd, is_direct
    size = os.fstat(fd).st_size
    raise ReadError(
      errno.EIO,
      f"short read of {path} at offset {file_off}: expected {need} bytes, got {got} "
      f"(file is {size} bytes; truncated or wrong store?)",
    )

  def _read_exact(
    self,
    fd: int,
    is_direct: bool,
    mv: memoryview,
    buffer: np.ndarray,
    start: int,
    file_off: int,
    need: int,
  ) -> int:
    if not is_direct:
      return self._pread(fd, mv[start : start + need], file_off, False)
    want = round_up(need)
    if start + want <= buffer.nbytes:
      return min(need, self._pread(fd, mv[start : start + want], file_off, True))
    # No room in the caller's buffer for the round-up: read the aligned head
    # in place and the last partial block through a bounce page.
    head = need - need % PAGE
    got = self._pread(fd, mv[start : start + head], file_off, True) if head else 0
    if got < head:
      return got
    bounce = aligned_empty(PAGE)
    tail = min(need - head, self._pread(fd, memoryview(bounce), file_off + head, True))
    buffer[start + head : start + head + tail] = bounce[:tail]
    return head + tail

  def _pread(self, fd: int, mv: memoryview, file_off: int, is_direct: bool) -> int:
    got = 0
    t0 = time.perf_counter()
    requests = 0
    while got < len(mv):
      n = os.preadv(fd, [mv[got:]], file_off + got)
      requests += 1
      if n == 0:
        break
      got += n
      # An unaligned O_DIRECT return only happens at end of file; another
      # read at an unaligned offset would fail with EINVAL, not return 0.
      if is_direct and n % PAGE:
        break
    dt = time.perf_counter() - t0
    with self._lock:
      self._counts["requests"] += requests
      self._counts["direct_requests" if is_direct else "buffered_requests"] += requests
      self._counts["seconds"] += dt
    return got

  # -- lifetime -------------------------------------------------------------

  def close(self) -> None:
    """Waits for reads in flight, stops the workers and closes cached files."""
    if self._closed:
      return
    self._closed = True
    self._executor.shutdown(wait=True)
    with self._lock:
      for fd, _, _ in self._fds.values():
        os.close(fd)
      self._fds.clear()
      for fd in self._stale_fds:
        os.close(fd)
      self._stale_fds.clear()

  def __enter__(self) -> ReaderPool:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass


class StoreView(Mapping):
  """Tensor name -> zero-copy numpy view of a buffer holding one group's file.

  Args:
    store: the LayerStore the buffer was filled from.
    group: the group read into the buffer (e.g. with ``ReaderPool.read_group``).
    buffer: the filled uint8 buffer.
  """

  def __init__(self, store: LayerStore, group: str, buffer: np.ndarray):
    self.store = store
    self.group = group
    self.buffer = buffer
    self._infos = store.tensors(group)
    if buffer.nbytes < max((t.offset + t.nbytes for t in self._infos.values()), default=0):
      raise ValueError(f"buffer of {buffer.nbytes} bytes cannot hold group {group!r}")

  def __getitem__(self, name: str) -> np.ndarray:
    t = self._infos[name]
    return view_as(self.buffer, t.offset, t.shape, t.dtype)

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def __len__(self) -> int:
    return len(self._infos)


def _expand(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in paths:
    p = os.fspath(p)
    if os.path.isdir(p):
      for root, _, files in os.walk(p):
        out.extend(os.path.join(root, f) for f in files)
    elif os.path.exists(p):
      out.append(p)
  return out


def drop_page_cache(
  path: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
  method: str = "auto",
) -> str:
  """Evicts file data from the page cache so the next read really hits the disk.

  As root: ``sync; echo 3 > /proc/sys/vm/drop_caches`` (whole machine).
  Otherwise, or if that is refused: ``fsync`` + ``posix_fadvise(DONTNEED)``
  on each given file (directories are walked); this only evicts clean pages,
  hence the fsync first.

  Args:
    path: files or directories to evict when falling back to fadvise.
    method: ``"auto"``, ``"drop_caches"`` or ``"fadvise"``.

  Returns:
    The method that worked: ``"drop_caches"``, ``"fadvise"``, or ``"none"``
    (not root and no files given, or nothing worked).
  """
  if method not in ("auto", "drop_caches", "fadvise"):
    raise ValueError(f"method must be 'auto', 'drop_caches' or 'fadvise', got {method!r}")
  if method in ("auto", "drop_caches") and os.geteuid() == 0:
    try:
      subprocess.run(["sync"], check=True)
      with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
      return "drop_caches"
    except (OSError, subprocess.CalledProcessError):
      if method == "drop_caches":
        raise
  elif method == "drop_caches":
    raise PermissionError("drop_caches needs root")
  files = _expand(path) if path is not None else []
  if not files or not hasattr(os, "posix_fadvise"):
    return "none"
  for f in files:
    fd = os.open(f, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)
  return "fadvise"
