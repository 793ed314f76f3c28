"""The disk tier: a directory of raw, page-aligned group files plus a manifest.

Layout of a store at ``path``::

    path/manifest.json
    path/00000-embed.bin
    path/00001-layers.0.bin
    ...

One file per group (a group is the unit a strategy reads at once, e.g.
``"layers/3"``). Inside a file every tensor starts at a multiple of 4096 and
the file is padded to a multiple of 4096, so a whole group, or any one tensor,
can be read with O_DIRECT straight into a page-aligned buffer and aliased by
jax without a copy. ``manifest.json`` records, per group, the file, its size,
and per tensor the offset, byte size, shape and dtype name (``"bfloat16"``
included).

Writing is atomic: everything goes into ``path.partial-<pid>``, is fsynced, and
the directory is renamed to ``path`` only when complete. An interrupted write
(exception, Ctrl-C) removes the partial directory; one killed outright leaves
it behind, and the next write to the same path removes it once its process is
gone. Before writing, the free space of the target's filesystem is checked
against the store's size (``InsufficientDiskSpaceError`` names the path, the
bytes needed and the bytes free).

Nothing that hetflow did not write is deleted: a writer replaces ``path`` only
when it is empty or holds a hetflow store (a manifest of a hetflow format),
and otherwise refuses with ``NotAStoreError``.

A store in use is never replaced: an engine opens its store with ``lock=True``,
a shared ``flock`` on the store directory held until ``close()``; a writer
that would replace that directory takes the lock exclusively without waiting
and refuses with ``StoreInUseError`` when it cannot. Refusing (rather than
writing a new version beside it and switching) was chosen because a running
engine caches open files and reads each layer again every token: a switch
under it would either change its weights mid-generation or need every reader
to pin a version, and a store that two models want at one path is a
configuration error to report, not to paper over. Readers lock and then check
that the locked directory is still the one at ``path``, so a reader never
holds the lock of a directory a writer just moved away.

A store records what it was made from: ``model_fingerprint`` (config, tensor
names, shapes and dtypes, the weight source's parameters and files' metadata,
a content hash of a small tensor per group, the compute dtype, the
fingerprint's format version) is kept in the manifest's metadata with its
digest; ``open_store`` refuses a store whose digest differs from the model's
(``StoreMismatchError`` says which fields differ), and the default store
directory is keyed by the digest, so another model never reuses it.

The layer store of a model (what the ``layerwise`` strategy streams) is
built and opened by ``write_store``/``open_store`` at the end of this module.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping, Sized
from typing import Any

import numpy as np

from hetflow.memory.budget import format_bytes
from hetflow.memory.buffers import PAGE, aligned_empty, as_bytes, dtype_from_name, round_up, view_as
from hetflow.memory.cache import cache_root

MANIFEST = "manifest.json"
FORMAT = "hetflow.layer_store"
VERSION = 1
# Formats a writer may replace: directories hetflow itself wrote (neuron stores
# written before they became layer stores included).
_OWN_FORMATS = (FORMAT, "hetflow.neuron_bundles")
_LEFTOVER_RE = re.compile(r"\.(partial|old)-(\d+)$")


class IncompleteStoreError(RuntimeError):
  """The directory is not a complete store (interrupted conversion, or not a store)."""


class NotAStoreError(FileExistsError):
  """A writer was asked to replace a path that is not a hetflow store; nothing was deleted."""


class StoreInUseError(RuntimeError):
  """A writer would replace a store that a running engine holds open; nothing was changed."""


class StoreMismatchError(ValueError):
  """The store at a path was written from another model, dtype or layout."""


class InsufficientDiskSpaceError(OSError):
  """The store does not fit the free space of its filesystem; nothing was left behind."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lies inside its group file.

  Attributes:
    name: tensor name within the group, e.g. ``"attn/q"``.
    offset: byte offset in the group file (a multiple of 4096).
    nbytes: bytes of data (unpadded).
    shape: array shape.
    dtype: numpy dtype (ml_dtypes types such as bfloat16 included).
  """

  name: str
  offset: int
  nbytes: int
  shape: tuple[int, ...]
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class GroupInfo:
  """One group file.

  Attributes:
    name: group name, e.g. ``"layers/3"``.
    file: file name relative to the store directory.
    nbytes: file size: the bytes one whole-group read moves and the size of
      buffer it needs (padded to 4096).
    data_nbytes: sum of the tensors' unpadded sizes.
    tensors: tensor name -> TensorInfo, in file order.
  """

  name: str
  file: str
  nbytes: int
  data_nbytes: int
  tensors: Mapping[str, TensorInfo]


def _file_name(index: int, group: str) -> str:
  # The index keeps names unique even when two groups sanitise alike.
  safe = re.sub(r"[^A-Za-z0-9_.-]+", ".", group).strip(".") or "group"
  return f"{index:05d}-{safe[:100]}.bin"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _read_manifest(path: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError:
    return {"complete": False}


def _incomplete_message(path: str) -> str:
  return (
    f"store at {path} is incomplete (interrupted conversion?); delete it and run "
    "`python -m experiments.convert` again"
  )


class LayerStore:
  """A read-only view of a complete store; build one with :meth:`write` or :meth:`open`.

  Attributes:
    path: the store directory.
    alignment: byte alignment of tensor offsets and file sizes (4096).
    metadata: free-form JSON dict given at write time (e.g. model config).
  """

  def __init__(self, path: str, manifest: Mapping[str, Any]):
    self._lock_fd: int | None = None
    self.path = os.path.abspath(path)
    self.alignment = int(manifest.get("alignment", PAGE))
    self.metadata = dict(manifest.get("metadata", {}))
    self._groups: dict[str, GroupInfo] = {}
    for name, g in manifest["groups"].items():
      tensors = {
        tname: TensorInfo(
          tname,
          int(t["offset"]),
          int(t["nbytes"]),
          tuple(t["shape"]),
          dtype_from_name(t["dtype"]),
        )
        for tname, t in g["tensors"].items()
      }
      self._groups[name] = GroupInfo(
        name, g["file"], int(g["nbytes"]), int(g["data_nbytes"]), tensors
      )

  # -- reading --------------------------------------------------------------

  @classmethod
  def open(cls, path: str | os.PathLike, *, lock: bool = False) -> LayerStore:
    """Opens a complete store.

    Args:
      path: the store directory.
      lock: hold a shared lock on it until :meth:`close` (engines do), so
        that no writer replaces it while it is read.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      IncompleteStoreError: if it has no manifest, a manifest not marked
        complete, or a group file shorter than the manifest says.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no store at {path}")
    lock_fd = _lock_shared(path) if lock else None
    try:
      store = cls._open_unlocked(path)
    except BaseException:
      if lock_fd is not None:
        os.close(lock_fd)
      raise
    store._lock_fd = lock_fd
    return store

  @property
  def locked(self) -> bool:
    """True while this store holds its shared lock (opened with lock=True, not closed)."""
    return self._lock_fd is not None

  def close(self) -> None:
    """Releases the shared lock, if held; the store stays readable."""
    fd, self._lock_fd = self._lock_fd, None
    if fd is not None:
      os.close(fd)

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass

  @classmethod
  def _open_unlocked(cls, path: str) -> LayerStore:
    manifest = _read_manifest(path)
    if manifest is None or not manifest.get("complete"):
      raise IncompleteStoreError(_incomplete_message(path))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
      raise IncompleteStoreError(
        f"{path} holds format {manifest.get('format')!r} version "
        f"{manifest.get('version')!r}; this hetflow reads {FORMAT!r} version {VERSION}. "
        "Delete it (hetflow wrote it) and it is rebuilt on first use, or convert again"
      )
    store = cls(path, manifest)
    # A truncated file would otherwise surface as a short read mid-generation.
    for g in store._groups.values():
      f = store.file(g.name)
      size = os.path.getsize(f) if os.path.exists(f) else -1
      if size < g.nbytes:
        raise IncompleteStoreError(
          f"{f} has {size} bytes, the manifest says {g.nbytes}; " + _incomplete_message(path)
        )
    return store

  @property
  def groups(self) -> tuple[str, ...]:
    """Group names in write order."""
    return tuple(self._groups)

  def group(self, name: str) -> GroupInfo:
    """The GroupInfo of ``name``."""
    try:
      return self._groups[name]
    except KeyError:
      raise KeyError(f"no group {name!r} in store {self.path}") from None

  def group_nbytes(self, name: str) -> int:
    """Size of the group's file: bytes a whole-group read moves, and buffer size it needs."""
    return self.group(name).nbytes

  def tensors(self, name: str) -> Mapping[str, TensorInfo]:
    """Tensor metadata of a group, in file order."""
    return self.group(name).tensors

  def file(self, name: str) -> str:
    """Absolute path of the group's file."""
    return os.path.join(self.path, self.group(name).file)

  @property
  def total_nbytes(self) -> int:
    """Bytes on disk over all group files (what the disk tier holds)."""
    return sum(g.nbytes for g in self._groups.values())

  @property
  def max_group_nbytes(self) -> int:
    """The largest group file: the buffer size that fits any group."""
    return max((g.nbytes for g in self._groups.values()), default=0)

  def views(self, name: str, buffer: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-copy typed views of a buffer holding the group's file contents.

    Args:
      name: group name.
      buffer: uint8 buffer filled from offset 0 of the group's file (e.g. by
        ``ReaderPool.read_group``).

    Returns:
      tensor name -> array of the stored shape and dtype, sharing memory
      with ``buffer`` (so the buffer reuse rule of ``buffers.py`` applies).
    """
    return {
      t.name: view_as(buffer, t.offset, t.shape, t.dtype) for t in self.tensors(name).values()
    }

  def load(self, name: str) -> dict[str, np.ndarray]:
    """Reads a group with plain buffered I/O into a fresh aligned buffer.

    For setup and tests; hot paths use ``ReaderPool.read_group`` (O_DIRECT,
    several requests in flight, into reused buffers).
    """
    buf = aligned_empty(self.group_nbytes(name))
    with open(self.file(name), "rb", buffering=0) as f:
      got = f.readinto(memoryview(buf))
    if got != buf.nbytes:
      raise OSError(f"short read of {self.file(name)}: expected {buf.nbytes} bytes, got {got}")
    return self.views(name, buf)

  def __repr__(self) -> str:
    return (
      f"LayerStore({self.path!r}, {len(self._groups)} groups, {format_bytes(self.total_nbytes)})"
    )

  # -- writing --------------------------------------------------------------

  @classmethod
  def write(
    cls,
    path: str | os.PathLike,
    groups: Iterable[tuple[str, Mapping[str, np.ndarray]]],
    *,
    progress: bool = True,
    description: str | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    nbytes: int | None = None,
  ) -> LayerStore:
    """Writes a store atomically and opens it (unlocked).

    Args:
      path: the store directory to create.
      groups: ``(group_name, {tensor_name: array})`` pairs (or a dict of
        them), consumed once and in order, so a generator that converts one layer at a time keeps
        peak memory at one layer.
      progress: show a tqdm bar in bytes.
      description: the bar's label.
      overwrite: replace an existing store (or empty directory) at ``path``.
      metadata: JSON-able dict saved in the manifest (e.g. the model config).
      nbytes: the bytes the store will occupy, checked against the free space
        before anything is written; None computes it when ``groups`` is sized
        (a generator is then checked only by the write itself).

    Returns:
      The opened store.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      NotAStoreError: ``path`` exists and is neither a hetflow store nor an
        empty directory (it is never deleted).
      StoreInUseError: ``path`` holds a store that an engine has open.
      InsufficientDiskSpaceError: the store does not fit the free space.
      ValueError: duplicate group or tensor names, object dtypes.
    """
    from tqdm.auto import tqdm

    path = os.path.abspath(os.fspath(path))
    if isinstance(groups, Mapping):  # {group: tensors} is as natural as pairs
      groups = list(groups.items())
    check_replaceable(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(path)

    total = nbytes
    if total is None and isinstance(groups, Sized):
      # Only sized inputs can be totalled without consuming a generator.
      try:
        total = sum(round_up(np.asarray(a).nbytes) for _, ts in groups for a in ts.values())
      except Exception:
        total = None
    if total is not None:
      check_free_space(path, total)
    partial = f"{path}.partial-{os.getpid()}"
    if os.path.exists(partial):
      shutil.rmtree(partial)
    bar = tqdm(
      total=total,
      unit="B",
      unit_scale=True,
      unit_divisor=1024,
      desc=description or os.path.basename(path),
      disable=not progress,
    )
    try:
      os.makedirs(partial)
      manifest_groups: dict[str, Any] = {}
      for index, (gname, tensors) in enumerate(groups):
        if not isinstance(gname, str) or not gname:
          raise ValueError(f"group names must be non-empty strings, got {gname!r}")
        if gname in manifest_groups:
          raise ValueError(f"duplicate group name {gname!r}")
        manifest_groups[gname] = _write_group(partial, index, gname, tensors, bar)
      manifest = {
        "format": FORMAT,
        "version": VERSION,
        "complete": True,
        "alignment": PAGE,
        "metadata": dict(metadata or {}),
        "groups": manifest_groups,
      }
      tmp = os.path.join(partial, MANIFEST + ".tmp")
      with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
      os.rename(tmp, os.path.join(partial, MANIFEST))
      _fsync_dir(partial)
      commit(partial, path, overwrite)
      _fsync_dir(parent)
    except OSError as e:
      shutil.rmtree(partial, ignore_errors=True)
      if e.errno == errno.ENOSPC and not isinstance(e, InsufficientDiskSpaceError):
        need = f"{format_bytes(total)} ({total} bytes)" if total is not None else "more space"
        raise InsufficientDiskSpaceError(
          errno.ENOSPC,
          f"the disk filled up while writing the store {path}: it needs {need}, "
          f"{free_bytes(parent)} bytes are free now; nothing was kept. Free some space or "
          "pass another path",
        ) from e
      raise
    except BaseException:
      # KeyboardInterrupt included: never leave a half-written store behind.
      shutil.rmtree(partial, ignore_errors=True)
      raise
    finally:
      bar.close()
    return cls.open(path)


# -- what a writer may replace, and how ---------------------------------------------------------


def is_hetflow_store(path: str) -> bool:
  """True if ``path`` is a directory whose manifest is one of hetflow's store formats."""
  if not os.path.isdir(path):
    return False
  m = _read_manifest(path)
  return bool(m) and m.get("format") in _OWN_FORMATS


def check_replaceable(path: str, overwrite: bool) -> None:
  """Refuses a write that would replace what hetflow did not write, or a store in use.

  Args:
    path: the absolute store path a writer will create.
    overwrite: whether replacing an existing store was asked for.

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False.
    NotAStoreError: it exists and is neither a hetflow store nor an empty directory.
    StoreInUseError: it is a store that an engine holds open.
  """
  if not os.path.lexists(path):
    return
  if not overwrite:
    state = "a complete store" if _is_complete(path) else "an incomplete store or other directory"
    raise FileExistsError(f"{path} already exists ({state}); pass overwrite=True to replace it")
  empty_dir = os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
  if os.path.islink(path) or not (empty_dir or is_hetflow_store(path)):
    # Never rmtree a directory that is not ours (a typo could point at $HOME).
    raise NotAStoreError(f"{path} exists and is not a hetflow store; refusing to delete it")
  fd = _lock_exclusive(path)
  if fd is None:
    raise StoreInUseError(_in_use_message(path))
  os.close(fd)


def commit(partial: str, path: str, overwrite: bool) -> None:
  """Moves a complete ``partial`` directory to ``path``, replacing a store there if allowed.

  The replaced store is locked exclusively (without waiting) during the swap,
  so a store that an engine holds open is never replaced. On failure the
  partial directory is left for the caller to remove.

  Raises:
    FileExistsError: another writer created ``path`` meanwhile and
      ``overwrite`` is False.
    StoreInUseError: the store at ``path`` is held open by an engine.
  """
  if not os.path.lexists(path):
    try:
      os.rename(partial, path)
      return
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
  check_replaceable(path, overwrite)  # another writer may have won the race
  fd = _lock_exclusive(path)
  if fd is None:
    raise StoreInUseError(_in_use_message(path))
  old = f"{path}.old-{os.getpid()}"
  try:
    os.rename(path, old)
    os.rename(partial, path)
  finally:
    os.close(fd)
  shutil.rmtree(old, ignore_errors=True)


def _in_use_message(path: str) -> str:
  return (f"the store at {path} is in use by a running engine (it holds the store's lock); "
          "close that engine first, or write the new store to another path")


def _lock_exclusive(path: str) -> int | None:
  """An fd holding an exclusive lock on directory ``path``, or None if it is locked."""
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  except BaseException:
    os.close(fd)
    raise
  return fd


def _lock_shared(path: str, timeout: float = 60.0) -> int:
  """An fd holding a shared lock on the directory that is at ``path`` now.

  A writer holds the exclusive lock only while it swaps directories, so this
  waits for it; then it checks that the locked directory was not moved away
  meanwhile (and locks the new one if it was).
  """
  deadline = time.monotonic() + timeout
  while True:
    try:
      fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:  # mid-swap: the old one moved, the new one not yet in place
      if time.monotonic() > deadline:
        raise
      time.sleep(0.01)
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_SH)
      held, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
      os.close(fd)
      continue
    except BaseException:
      os.close(fd)
      raise
    if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
      return fd
    os.close(fd)


def free_bytes(path: str) -> int:
  """Bytes an unprivileged writer may still use on the filesystem of ``path`` (or its parent)."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  st = os.statvfs(probe)
  return st.f_bavail * st.f_frsize


def check_free_space(path: str, nbytes: int) -> None:
  """Raises InsufficientDiskSpaceError unless ``nbytes`` (plus 1 MiB of slack) fit at ``path``.

  The slack covers the manifest and filesystem metadata. For a replacement the
  old store stays until the new one is complete, so its bytes are not counted
  as free.
  """
  free = free_bytes(path)
  need = int(nbytes) + (1 << 20)
  if need > free:
    raise InsufficientDiskSpaceError(
      errno.ENOSPC,
      f"not enough free disk space for the store {path}: it needs {format_bytes(need)} "
      f"({need} bytes), the filesystem has {format_bytes(free)} ({free} bytes) free; free some "
      "space or pass another path",
    )


def _is_complete(path: str) -> bool:
  m = _read_manifest(path) if os.path.isdir(path) else None
  return bool(m and m.get("complete"))


def remove_stale_partials(path: str) -> None:
  """Removes ``path.partial-PID`` and ``path.old-PID`` left by writers that were killed.

  Only those of processes that are gone: a live writer's partial stays.
  """
  parent, base = os.path.split(os.path.abspath(path))
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if not (entry.startswith(base + ".partial-") or entry.startswith(base + ".old-")):
      continue
    m = _LEFTOVER_RE.search(entry)
    if m and m.group(0) == entry[len(base):] and int(m.group(2)) != os.getpid() \
        and not _pid_alive(int(m.group(2))):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _write_group(
  directory: str, index: int, gname: str, tensors: Mapping[str, np.ndarray], bar
) -> dict:
  fname = _file_name(index, gname)
  entries: dict[str, Any] = {}
  offset = 0
  data_nbytes = 0
  with open(os.path.join(directory, fname), "wb", buffering=0) as f:
    for tname, arr in tensors.items():
      if not isinstance(tname, str) or not tname:
        raise ValueError(f"tensor names must be non-empty strings, got {tname!r} in {gname!r}")
      if tname in entries:
        raise ValueError(f"duplicate tensor {tname!r} in group {gname!r}")
      arr = np.asarray(arr)
      if arr.dtype.hasobject:
        raise ValueError(f"tensor {gname}/{tname} has object dtype; cannot store it")
      f.seek(offset)
      data = as_bytes(arr)
      written = 0
      while written < len(data):  # raw files may write less than asked
        written += f.write(data[written:])
      entries[tname] = {
        "offset": offset,
        "nbytes": arr.nbytes,
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
      }
      data_nbytes += arr.nbytes
      offset = round_up(offset + arr.nbytes)
      bar.update(round_up(arr.nbytes))
    # Pad so that an O_DIRECT read of the last tensor, rounded up, stays in the file.
    f.truncate(offset)
    os.fsync(f.fileno())
  return {"file": fname, "nbytes": offset, "data_nbytes": data_nbytes, "tensors": entries}


# -- what a store was made from ------------------------------------------------------------------

FINGERPRINT_VERSION = 1
_SAMPLE_MAX_BYTES = 1 << 20  # content hash of tensors up to this size (one per group)


def _dtype_name(dtype: Any) -> str:
  return np.dtype(getattr(dtype, "dtype", dtype)).name


def _file_facts(path: str) -> dict[str, Any]:
  st = os.stat(path)
  return {"file": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _describe(value: Any, depth: int = 0) -> Any:
  """A JSON-able description of a weight source's parameters (public attributes).

  Dataclasses, containers and plain objects are described field by field to a
  small depth; strings naming existing files are described by their size and
  modification time (a changed checkpoint file changes the description).
  """
  if isinstance(value, (bool, int, float, type(None))):
    return value
  if isinstance(value, str):
    if os.sep in value and os.path.isfile(value):
      return _file_facts(value)
    return value
  if isinstance(value, np.ndarray):
    return {"array": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:16]}
  if depth > 3:
    return type(value).__qualname__
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _describe(getattr(value, f.name), depth + 1)
            for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): _describe(v, depth + 1) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
    return [_describe(v, depth + 1) for v in items]
  if callable(value) and not hasattr(value, "__dict__"):
    return getattr(value, "__qualname__", type(value).__qualname__)
  if hasattr(value, "__dict__"):
    out = {"type": f"{type(value).__module__}.{type(value).__qualname__}"}
    for k, v in vars(value).items():
      if not k.startswith("_"):
        out[k] = _describe(v, depth + 1)
    return out
  return getattr(value, "__qualname__", type(value).__qualname__)


def model_fingerprint(model: Any) -> dict[str, Any]:
  """What a store's bytes depend on, as a JSON-able record.

  Args:
    model: a hetflow ``Model`` (``hetflow.models.model``; read through its
      attributes, as the memory layer sits below the models).

  Returns:
    ``version`` (of this record's format), ``config``, ``dtype`` (the compute
    dtype the store holds), ``tensors`` (name -> [shape, dtype]),
    ``source`` (the weight source's public parameters: a synthetic model's
    seed and sparsity settings such as noise and rank, a checkpoint's files
    with their sizes and modification times), ``files`` (the safetensors
    files of a checkpoint directory) and ``samples`` (a content hash of the
    smallest unquantized parameter of each group, when it is at most 1 MiB).
  """
  shapes = model.shapes
  files = []
  if model.description and os.path.isdir(model.description):
    files = [_file_facts(os.path.join(model.description, f))
             for f in sorted(os.listdir(model.description)) if f.endswith(".safetensors")]
  samples = {}
  # Only parameters the source holds as they are: a quantized kernel's smallest leaf is
  # its scale, and materialising it quantizes the whole kernel (minutes per 7B store).
  logical = model.logical_shapes
  for group in model.group_names():
    prefix = group + "/"
    names = [n for n in shapes if n.startswith(prefix) and n in logical]
    if not names:
      continue
    smallest = min(names, key=lambda n: (shapes[n].size, n))
    s = shapes[smallest]
    if s.size * np.dtype(s.dtype).itemsize <= _SAMPLE_MAX_BYTES:
      data = np.ascontiguousarray(model.tensor(smallest))
      samples[smallest] = hashlib.sha256(as_bytes(data)).hexdigest()[:16]
  return {
    "version": FINGERPRINT_VERSION,
    "config": json.loads(json.dumps(dataclasses.asdict(model.config), default=str)),
    "dtype": _dtype_name(model.dtype),
    "tensors": {n: [list(s.shape), _dtype_name(s.dtype)] for n, s in shapes.items()},
    "source": json.loads(json.dumps(_describe(model.source), default=str)),
    "files": files,
    "samples": samples,
    "description": model.description,
  }


def fingerprint_digest(record: Mapping[str, Any]) -> str:
  """The sha256 hex digest of a fingerprint record."""
  return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def store_fingerprint(model: Any) -> str:
  """The digest of ``model_fingerprint(model)``: equal digests, equal store bytes."""
  return fingerprint_digest(model_fingerprint(model))


def _flatten(record: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(record, Mapping):
    out = {}
    for k, v in record.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: record}


def describe_difference(found: Mapping[str, Any] | None, wanted: Mapping[str, Any],
                        limit: int = 4) -> str:
  """The first fields in which two fingerprint records differ, for error messages."""
  if not found:
    return "the store records no fingerprint (written by an older hetflow)"
  a, b = _flatten(found), _flatten(wanted)
  keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  parts = [f"{k}: {a.get(k, '(absent)')!r} in the store, {b.get(k, '(absent)')!r} here"
           for k in keys[:limit]]
  if len(keys) > limit:
    parts.append(f"and {len(keys) - limit} more")
  return "; ".join(parts) or "the digests differ"


def check_fingerprint(store: LayerStore, wanted: Mapping[str, Any], what: str) -> None:
  """Raises StoreMismatchError unless ``store`` was written from the ``wanted`` record.

  Args:
    store: an opened store.
    wanted: the fingerprint record of what the caller will read it as.
    what: a few words naming the caller's model, for the message.
  """
  found = store.metadata.get("fingerprint_record")
  if store.metadata.get("fingerprint") == fingerprint_digest(wanted) and found is not None:
    return
  raise StoreMismatchError(
    f"the store at {store.path} was written from {store.metadata.get('description')!r}"
    f" ({store.metadata.get('dtype')}), not from this model ({what}): "
    f"{describe_difference(found, wanted)}. Pass another store_dir, or delete {store.path} "
    "to rebuild it")


# -- the layer store of a model (what `layerwise` streams) ---------------------------------------


def default_store_dir(model: Any) -> str:
  """cache_root()/stores/<name>-<dtype>-<fingerprint digest[:12]>."""
  name = f"{model.config.name}-{_dtype_name(model.dtype)}-{store_fingerprint(model)[:12]}"
  return os.path.join(cache_root(), "stores", name)


def padded_group_nbytes(model: Any, group: str) -> int:
  """Bytes of a group's store file: every tensor starts on a 4 KiB boundary."""
  prefix = group + "/"
  return sum(round_up(s.size * np.dtype(s.dtype).itemsize) for n, s in model.shapes.items()
             if n.startswith(prefix))


def store_nbytes(model: Any) -> int:
  """Bytes the layer store of ``model`` occupies on disk (its group files)."""
  return sum(padded_group_nbytes(model, g) for g in model.group_names()
             if model.group_nbytes(g))


def _flat_tensors(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"up": {"q": a, "scale": s}, "norm": n} -> {"up/q": a, "up/scale": s, "norm": n}."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flat_tensors(value, f"{prefix}{name}/"))
    else:
      flat[prefix + name] = value
  return flat


def write_store(model: Any, path: str, progress: bool = True,
                overwrite: bool = False) -> LayerStore:
  """Converts ``model`` into a disk store at ``path``, one file per placement group.

  Tensors are stored as the model holds them (its compute dtype; a quantized
  kernel as its leaves, "up/q", "up/scale"), so reading a block needs no
  conversion per token and each kernel is quantized once, here. Atomic (LayerStore.write): an interrupted conversion
  leaves no store that looks complete. Peak memory is one group. The free
  space is checked before the first byte is written.

  Args:
    model: any hetflow Model (HF checkpoint or synthetic).
    path: store directory to create.
    progress: show a progress bar in bytes.
    overwrite: replace an existing store at ``path`` (refused while an engine
      holds it open, and for anything that is not a hetflow store).

  Returns:
    The opened (unlocked) store.
  """
  from tqdm.auto import tqdm

  groups = [g for g in model.group_names() if model.group_nbytes(g)]
  total = sum(padded_group_nbytes(model, g) for g in groups)
  bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
             desc=f"converting {model.config.name} to {os.path.basename(path)}")

  def generate():
    for g in groups:
      # A quantized kernel is a dict of leaves (hetflow/models/formats.py): stored as "up/q".
      yield g, _flat_tensors(model.group_tensors(g))
      bar.update(padded_group_nbytes(model, g))  # runs once the group is written

  record = model_fingerprint(model)
  metadata = {"fingerprint": fingerprint_digest(record), "fingerprint_record": record,
              "model": model.config.name, "dtype": _dtype_name(model.dtype),
              "description": model.description}
  try:
    return LayerStore.write(path, generate(), progress=False, overwrite=overwrite,
                            metadata=metadata, nbytes=total)
  finally:
    bar.close()


def open_store(model: Any, path: str | None = None, convert: bool = True,
               progress: bool = True, lock: bool = True) -> LayerStore:
  """Opens the store of ``model`` at ``path`` (default_store_dir when None), writing it if missing.

  Args:
    model: the hetflow Model the store must hold.
    path: the store directory; None: ``default_store_dir(model)``, keyed by
      the model's fingerprint.
    convert: write the store when it is missing.
    progress: show a progress bar while converting.
    lock: hold the store's shared lock until ``close()`` (what an engine
      does: no writer replaces a store it reads).

  Raises:
    StoreMismatchError: the store at ``path`` was written from another model
      or dtype (a ValueError; it is never reused, nor silently rebuilt).
    NotAStoreError: ``path`` is a non-empty folder that is not a store.
    FileNotFoundError: it is missing and ``convert`` is False.
  """
  path = os.path.abspath(path or default_store_dir(model))
  if not os.path.exists(os.path.join(path, MANIFEST)):
    if not convert:
      raise FileNotFoundError(
          f"no store at {path}; run `python -m experiments.convert --out={path}` first.")
    try:
      write_store(model, path, progress=progress, overwrite=os.path.isdir(path)).close()
    except FileExistsError:
      if not is_hetflow_store(path):  # not another writer that won the race
        raise
  store = LayerStore.open(path, lock=lock)
  try:
    check_fingerprint(store, model_fingerprint(model),
                      f"{model.description!r}, {_dtype_name(model.dtype)}")
    missing = [g for g in model.group_names() if model.group_nbytes(g) and g not in store.groups]
    if missing:
      raise StoreMismatchError(f"the store at {path} lacks groups {missing[:3]}...")
  except BaseException:
    store.close()
    raise
  return store
