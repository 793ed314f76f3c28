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
gone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sized
from typing import Any

import numpy as np

from hetflow.memory.buffers import PAGE, aligned_empty, as_bytes, dtype_from_name, round_up, view_as

MANIFEST = "manifest.json"
FORMAT = "hetflow.layer_store"
VERSION = 1
_PARTIAL_RE = re.compile(r"\.partial-(\d+)$")


class IncompleteStoreError(RuntimeError):
  """The directory is not a complete store (interrupted conversion, or not a store)."""


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
  def open(cls, path: str | os.PathLike) -> LayerStore:
    """Opens a complete store.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      IncompleteStoreError: if it has no manifest, a manifest not marked
        complete, or a group file shorter than the manifest says.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no store at {path}")
    manifest = _read_manifest(path)
    if manifest is None or not manifest.get("complete"):
      raise IncompleteStoreError(_incomplete_message(path))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
      raise IncompleteStoreError(
        f"{path} holds format {manifest.get('format')!r} version "
        f"{manifest.get('version')!r}; this hetflow reads {FORMAT!r} version {VERSION}"
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
    from hetflow.memory.budget import format_bytes

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
  ) -> LayerStore:
    """Writes a store atomically and opens it.

    Args:
      path: the store directory to create.
      groups: ``(group_name, {tensor_name: array})`` pairs (or a dict of
        them), consumed once and in order, so a generator that converts one layer at a time keeps
        peak memory at one layer.
      progress: show a tqdm bar in bytes.
      description: the bar's label.
      overwrite: replace an existing store (or empty directory) at ``path``.
      metadata: JSON-able dict saved in the manifest (e.g. the model config).

    Returns:
      The opened store.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is False, or it
        exists, is neither a store nor empty, and would be deleted.
      ValueError: duplicate group or tensor names, object dtypes.
    """
    from tqdm.auto import tqdm

    path = os.path.abspath(os.fspath(path))
    if isinstance(groups, Mapping):  # {group: tensors} is as natural as pairs
      groups = list(groups.items())
    if os.path.exists(path):
      if not overwrite:
        state = (
          "a complete store" if _is_complete(path) else "an incomplete store or other directory"
        )
        raise FileExistsError(f"{path} already exists ({state}); pass overwrite=True to replace it")
      if not (os.path.isdir(path) and (_read_manifest(path) is not None or not os.listdir(path))):
        # Never rmtree a directory that is not ours (a typo could point at $HOME).
        raise FileExistsError(f"{path} exists and is not a hetflow store; refusing to delete it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_partials(path)

    partial = f"{path}.partial-{os.getpid()}"
    if os.path.exists(partial):
      shutil.rmtree(partial)
    total = None
    if isinstance(groups, Sized):
      # Only sized inputs can be totalled without consuming a generator.
      try:
        total = sum(round_up(a.nbytes) for _, ts in groups for a in ts.values())
      except Exception:
        total = None
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
      if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(partial, path)
        shutil.rmtree(old, ignore_errors=True)
      else:
        os.rename(partial, path)
      _fsync_dir(parent)
    except BaseException:
      # KeyboardInterrupt included: never leave a half-written store behind.
      shutil.rmtree(partial, ignore_errors=True)
      raise
    finally:
      bar.close()
    return cls.open(path)


def _is_complete(path: str) -> bool:
  m = _read_manifest(path) if os.path.isdir(path) else None
  return bool(m and m.get("complete"))


def _remove_stale_partials(path: str) -> None:
  parent, base = os.path.split(path)
  for entry in os.listdir(parent):
    if not entry.startswith(base + ".partial-"):
      continue
    m = _PARTIAL_RE.search(entry)
    if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
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
