"""Emulating a machine with less RAM, for benchmarks.

A budget in the ledger limits what hetflow *places*; it does not stop the
kernel from caching the model files in the RAM left over, which would make a
"does not fit" benchmark read from RAM. ``MemoryLimit`` takes that RAM away: a
helper process allocates and ``mlock``s everything above the limit, then the
page cache is dropped, so the benchmark really has only ``limit`` bytes of RAM
for itself and the page cache.

The helper is a separate process (not a thread, not fork of this one: forking
a process that runs jax threads is unsafe) that holds its memory until its
stdin closes, so it also goes away if the benchmark process dies.

The machine is shared: other processes free and take memory while a benchmark
runs. Locking once at entry would let a system run with more than the limit
when others free memory (a llama.cpp row's mapped file then stays in the page
cache). So, while inside the context, a keeper thread re-checks every
``keep_interval`` seconds what this benchmark has: the available memory plus
the anonymous and shared memory of this process's children (the systems it runs; the
page cache they fill is counted in "available"). It locks what exceeds the
limit and gives back locked memory when others' growth leaves less (the lock is
held in pieces of at most ``piece`` bytes for this; the helpers are the kernel's
first choice of victim if memory still runs out).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
import warnings

from hetflow.memory.budget import format_bytes, parse_bytes
from hetflow.memory.reader import drop_page_cache

# Never lock so much that the rest of the machine (and this process) starves:
# locked pages cannot be reclaimed, so the OOM killer would pick a victim.
SAFETY_MARGIN = 512 * 2**20

_HELPER = r"""
import ctypes, ctypes.util, mmap, os, resource, sys
n = int(sys.argv[1])
try:
    try:  # under memory pressure the kernel kills a lock, never someone else's process
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        except (ValueError, OSError):
            pass
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof((ctypes.c_char * n).from_buffer(m))
    # mlock faults every page in and pins it: no lazy allocation, no swapping.
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(n)) != 0:
        e = ctypes.get_errno()
        # With CAP_IPC_LOCK the rlimit does not apply, so it is only reported, not pre-checked.
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        limit = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit} bytes"
        print(f"ERROR mlock of {n} bytes failed: {os.strerror(e)} (errno {e}); RLIMIT_MEMLOCK "
              f"(ulimit -l) is {limit} and could not be raised: run as root, or with "
              "CAP_IPC_LOCK, or raise ulimit -l", flush=True)
        sys.exit(1)
    print("LOCKED", flush=True)
except Exception as e:
    print(f"ERROR {e!r}", flush=True)
    sys.exit(1)
try:
    sys.stdin.read()  # hold the memory until the parent closes stdin or dies
except KeyboardInterrupt:
    pass
"""


class MemoryLimitError(RuntimeError):
  """The RAM above the limit could not be locked."""


def mem_available() -> int:
  """``MemAvailable`` from /proc/meminfo, in bytes."""
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  raise MemoryLimitError("/proc/meminfo has no MemAvailable (not Linux?)")


def _children_anon(exclude: set[int]) -> int:
  """Resident bytes no one else can reclaim (RssAnon + RssShmem) of every descendant of this
  process, but `exclude`. Shared memory counts: jax's CPU arrays live there (a layer-wise
  row's resident blocks), and it is not in MemAvailable either."""
  parent: dict[int, int] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
    except OSError:  # exited meanwhile
      continue
    parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
  mine, frontier = set(), {os.getpid()}
  while frontier:
    frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - mine
    mine |= frontier
  total = 0
  for pid in mine - exclude:
    try:
      with open(f"/proc/{pid}/status") as f:
        for line in f:
          if line.startswith(("RssAnon:", "RssShmem:")):
            total += int(line.split()[1]) * 1024
    except OSError:
      continue
  return total


class MemoryLimit:
  """Context manager that leaves only ``limit_bytes`` of available RAM.

  On entry it locks ``MemAvailable - limit_bytes`` in a helper process, waits
  until the lock holds, and drops the page cache; on exit it ends the helper,
  which returns the memory.

  Args:
    limit_bytes: RAM to leave available (int or a string like ``"4GiB"``).
    lock_bytes: lock exactly this much instead of computing it from
      ``limit_bytes`` (tests use small values).
    drop_caches: drop the page cache once locked (see ``drop_page_cache``).
    timeout: seconds to wait for the lock before failing.
    keep_interval: seconds between the keeper's checks while inside the context
      (see the module docstring); None: lock only at entry and in ``top_up``.
      Only with ``limit_bytes``.
    slack: bytes the keeper lets the limit drift either way before it locks or
      gives back memory.
    piece: the entry's lock is taken in helpers of at most this many bytes, so the
      keeper can give back a piece when other processes need memory (without it, the
      kernel's OOM killer would end a lock, or another process).

  Attributes:
    limit_bytes: as given, in bytes (None when ``lock_bytes`` was given alone).
    locked_bytes: bytes locked by the helper while inside the context, else 0.
    pid: the helper's process id while inside the context, else None.
    cache_drop: the method ``drop_page_cache`` used on entry, or None.
    keep_interval: as given.

  Raises:
    MemoryLimitError: on entry, if the helper cannot lock (``ulimit -l`` too
      low and not raisable, mlock refused, or the timeout passed).
    ValueError: if the lock would leave less than ``SAFETY_MARGIN`` available.
  """

  def __init__(
    self,
    limit_bytes: int | str | None = None,
    *,
    lock_bytes: int | str | None = None,
    drop_caches: bool = True,
    timeout: float = 120.0,
    keep_interval: float | None = 0.5,
    slack: int = 64 << 20,
    piece: int = 1 << 30,
  ):
    if limit_bytes is None and lock_bytes is None:
      raise ValueError("give limit_bytes (or, for tests, lock_bytes)")
    if keep_interval is not None and keep_interval <= 0:
      raise ValueError(f"keep_interval={keep_interval!r}; expected seconds > 0 or None.")
    self.limit_bytes = None if limit_bytes is None else parse_bytes(limit_bytes)
    self._lock_bytes = None if lock_bytes is None else parse_bytes(lock_bytes)
    self.drop_caches = drop_caches
    self.timeout = timeout
    self.keep_interval = keep_interval
    self.slack = slack
    self.piece = piece
    self.locked_bytes = 0
    self.pid: int | None = None
    self.cache_drop: str | None = None
    self._procs: list[subprocess.Popen] = []
    self._sizes: list[int] = []  # bytes each of _procs locks
    self._mutex = threading.RLock()  # the keeper thread and the caller both lock and release
    self._stop_keeper = threading.Event()
    self._keeper: threading.Thread | None = None
    self._held = self._fresh_record()

  def __enter__(self) -> MemoryLimit:
    available = mem_available()
    n = self._lock_bytes if self._lock_bytes is not None else available - self.limit_bytes
    if n <= 0:
      warnings.warn(
        f"only {format_bytes(available)} available, already below the limit of "
        f"{format_bytes(self.limit_bytes)}; nothing to lock",
        RuntimeWarning,
        stacklevel=2,
      )
    else:
      if n > available - SAFETY_MARGIN:
        raise ValueError(
          f"locking {format_bytes(n)} would leave less than "
          f"{format_bytes(SAFETY_MARGIN)} of the {format_bytes(available)} available"
        )
      self._lock(n)
    if self.drop_caches:
      self.cache_drop = drop_page_cache()
    if self.keep_interval is not None and self.limit_bytes is not None and self._procs:
      self._stop_keeper.clear()
      self._keeper = threading.Thread(target=self._keep, name="hetflow-memory-limit",
                                      daemon=True)
      self._keeper.start()
    return self

  @staticmethod
  def _fresh_record() -> dict[str, int | None]:
    return {"checks": 0, "max_excess": None, "min_excess": None, "locked_more": 0,
            "gave_back": 0}

  def held(self, reset: bool = False) -> dict[str, int | None]:
    """What the keeper saw since entry (or the last reset): how far the memory this
    benchmark had strayed from the limit before each correction.

    Args:
      reset: start a new record (a benchmark takes one per system).

    Returns:
      {"checks", "max_excess", "min_excess" (bytes over the limit, negative: under;
      None before the first check), "locked_more", "gave_back" (bytes)}.
    """
    with self._mutex:
      record = dict(self._held)
      if reset:
        self._held = self._fresh_record()
      return record

  def _excess(self) -> int:
    """Bytes this benchmark could use beyond the limit (negative: it has less)."""
    return mem_available() + _children_anon({p.pid for p in self._procs}) - self.limit_bytes

  def keep(self) -> int:
    """One check of the keeper: locks what exceeds the limit by more than `slack`, or
    gives back the newest locks that others' growth pushed under it. Returns the bytes
    locked (positive) or given back (negative)."""
    with self._mutex:
      if self.limit_bytes is None:
        return 0
      excess = self._excess()
      h = self._held
      h["checks"] += 1
      h["max_excess"] = excess if h["max_excess"] is None else max(h["max_excess"], excess)
      h["min_excess"] = excess if h["min_excess"] is None else min(h["min_excess"], excess)
      if excess > self.slack:
        self._lock(excess)
        h["locked_more"] += excess
        return excess
      freed = 0
      # Newest first, and only whole pieces that the deficit covers (never overshoot).
      while self._procs and excess + freed < -self.slack and \
          self._sizes[-1] <= -(excess + freed):
        freed += self._sizes[-1]
        self._stop_one()
      h["gave_back"] += freed
      return -freed

  def _keep(self) -> None:
    while not self._stop_keeper.wait(self.keep_interval):
      try:
        self.keep()
      except (MemoryLimitError, OSError) as e:  # the next check tries again
        warnings.warn(f"MemoryLimit keeper: {e}", RuntimeWarning, stacklevel=1)

  def _lock(self, n: int) -> None:
    """Locks `n` bytes in pieces, so that the keeper can give back as little as others need."""
    for start in range(0, n, self.piece):
      self._start(min(self.piece, n - start))

  def _start(self, n: int) -> None:
    proc = subprocess.Popen(
      [sys.executable, "-I", "-c", _HELPER, str(n)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + self.timeout
    line = b""
    try:
      while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
          raise MemoryLimitError(
            f"helper did not lock {format_bytes(n)} within {self.timeout:.0f} s"
          )
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
          b = os.read(proc.stdout.fileno(), 4096)
          if not b:  # helper exited without a word
            break
          line += b
      if line.strip() != b"LOCKED":
        proc.wait(timeout=5)
        err = proc.stderr.read().decode(errors="replace").strip()
        raise MemoryLimitError(
          f"could not lock {format_bytes(n)}: "
          f"{line.decode(errors='replace').strip() or 'helper exited'}"
          + (f"\n{err}" if err else "")
        )
    except BaseException:
      self._end(proc, kill=True)  # a stuck or failed helper gets no grace period
      raise
    self._procs.append(proc)
    self._sizes.append(n)
    self.locked_bytes += n
    self.pid = self.pid or proc.pid

  def top_up(self, slack: int = 64 << 20) -> int:
    """Locks what was freed since entry, so that `limit_bytes` is again all that
    is available. A benchmark calls this before each system: memory its own
    process frees after entry (probe buffers, say) would otherwise raise the
    effective limit for every system that follows. Returns the bytes added."""
    with self._mutex:
      if self.limit_bytes is None or not self._procs:
        return 0
      extra = mem_available() - self.limit_bytes
      if extra <= slack:
        return 0
      self._lock(extra)
      return extra

  @staticmethod
  def _end(proc: subprocess.Popen, kill: bool) -> None:
    try:
      if kill:
        proc.kill()
      proc.stdin.close()  # the helper's stdin.read() returns and it exits
      proc.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
      proc.kill()
      proc.wait()
    finally:
      for f in (proc.stdout, proc.stderr):
        f.close()

  def _stop_one(self) -> None:
    """Ends the newest helper (its memory returns to the machine)."""
    proc, n = self._procs.pop(), self._sizes.pop()
    self._end(proc, kill=False)
    self.locked_bytes -= n
    self.pid = self._procs[0].pid if self._procs else None

  def _stop(self, kill: bool = False) -> None:
    with self._mutex:
      procs, self._procs, self._sizes = self._procs, [], []
      for proc in procs:
        self._end(proc, kill)
      self.locked_bytes = 0
      self.pid = None

  def __exit__(self, *exc) -> None:
    self._stop_keeper.set()
    if self._keeper is not None:
      self._keeper.join()
      self._keeper = None
    self._stop()
