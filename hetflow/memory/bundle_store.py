"""The neuron-bundle store: FFN weights on disk, one neuron per aligned record.

Layout (`layout="bundled"`, PowerInfer-2's bundling): per layer one file of F
records; record k holds neuron order[k]'s rows of the FFN matrices (Llama:
gate column, up column, down row; OPT: up and down) back to back, padded to
4 KiB, so one O_DIRECT read fetches one neuron and one read of n records
fetches a run of n adjacent neurons. Neurons are sorted hottest first (by
activation statistics), so hot clusters are sequential on disk and cold misses
of neighbouring ranks coalesce.

`layout="split"` is the ablation baseline without bundling: per layer the
matrices lie one after another, each neuron's row padded to 4 KiB, so a neuron
costs one read per matrix. In memory both layouts give the same record shape
([matrices, row stride] per neuron), so the compute does not care.

Per-neuron biases (OPT's fc1 bias) are not in the records: they are tiny and
live in the fixed region with the norms.

On disk a neuron store is a `LayerStore` (`hetflow/memory/store.py`): group
`layers/<i>` holds one tensor `records` (the layer's file, records from byte
0), group `order` the [L, F] int32 neuron order. So it shares the layer
store's guarantees: atomic writes, stale partials removed, free space checked
first, nothing but a hetflow store ever replaced, a store in use never
replaced (engines open it locked), and a fingerprint in the manifest (the
model's, plus layout, matrices and a digest of the order): an explicit
`store_dir` holding another model's or order's store is refused with
`StoreMismatchError`, and the default store directory is keyed by that
fingerprint, so each model and order gets its own store in the cache, reused
across runs.

In memory, records are *planar* (`Planes`): one plane holds each slot's
input rows (gate and up; OPT: up) back to back, another its down row, so the
rows of consecutive slots form plain row-major matrices that a matrix-vector
product reads at the memory roof (a gather of whole records and strided row
slices ran at a tenth of it). `BundleStore.planar_requests` reads records
straight into planes: one request per run of adjacent records, scattered
into the planes by one `preadv` (`ReaderPool.read_many` with segment
destinations), when rows are whole 4 KiB pages (O_DIRECT's rule); otherwise
(`planar_direct` False: tiny test models) records are read whole into a
record-major buffer and copied (`Planes.fill_from_records`).

Weight formats: a store of a quantized model (`weights` "bfloat16", "int8",
"int4", ...) holds per neuron its plane-A bytes (its gate and up rows, each
values then scales) and its plane-B bytes (its down row's values) back to
back, the record padded to 4 KiB; the down kernel's scales, shared along
the neurons, are one table per layer (group `tables/<i>`). What the bytes
are is `hetflow.sparsity.bundles.RecordCodec`'s: this layer only moves
them. The format is part of the store's fingerprint (a store of another
format is never reused) and of its default directory's name. When the
planes are whole pages (bfloat16 at hidden sizes of multiples of 2048),
reads scatter into them as for float32; otherwise a run of records is read
in one request and copied into the planes (`BundleStore.fill`).

The compute over these records (`planar_step`, `quantized_step`,
`neuron_matrices`) is in `hetflow/sparsity/bundles.py`; the reads go through
`ReaderPool.read_many`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from hetflow.memory.buffers import PAGE, dtype_from_name, round_up
from hetflow.memory.cache import cache_root
from hetflow.memory.reader import Request, Requests, coalesce_requests
from hetflow.memory.store import (
  MANIFEST,
  LayerStore,
  StoreMismatchError,
  check_fingerprint,
  fingerprint_digest,
  is_hetflow_store,
  model_fingerprint,
)

Layout = Literal["bundled", "split"]
KIND = "neuron_bundles"


def record_layout(hidden: int, itemsize: int, num_matrices: int,
                  layout: Layout) -> tuple[int, int]:
  """(row stride, record bytes) of a neuron record: rows back to back when
  bundled, each row padded to 4 KiB when split; the record padded to 4 KiB."""
  if layout not in ("bundled", "split"):
    raise ValueError(f"layout={layout!r}; expected 'bundled' or 'split'.")
  row = hidden * itemsize
  stride = row if layout == "bundled" else round_up(row)
  return stride, round_up(num_matrices * stride)


def store_nbytes(num_layers: int, num_neurons: int, record_nbytes: int) -> int:
  """Bytes a neuron store occupies on disk: the layers' records and the order."""
  return num_layers * num_neurons * record_nbytes + round_up(num_layers * num_neurons * 4)


@dataclasses.dataclass(frozen=True)
class Planes:
  """Where the slots of a planar record buffer lie (one aligned uint8 buffer).

  Attributes:
    slots: records the buffer holds.
    a_nbytes: bytes of one slot's input rows (plane A: gate, up back to back).
    b_nbytes: bytes of one slot's down row (plane B).
  """

  slots: int
  a_nbytes: int
  b_nbytes: int

  @property
  def nbytes(self) -> int:
    """Bytes of the whole buffer."""
    return self.slots * (self.a_nbytes + self.b_nbytes)

  def a_offset(self, slot: int) -> int:
    """Byte offset of slot `slot`'s input rows."""
    return slot * self.a_nbytes

  def b_offset(self, slot: int) -> int:
    """Byte offset of slot `slot`'s down row."""
    return self.slots * self.a_nbytes + slot * self.b_nbytes

  def views(self, buffer: np.ndarray, dtype: Any, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [slots, a elements], B [slots, hidden]) numpy views of `buffer`."""
    dtype = np.dtype(dtype)
    a = buffer[:self.slots * self.a_nbytes].view(dtype).reshape(self.slots, -1)
    b = buffer[self.slots * self.a_nbytes:self.nbytes].view(dtype).reshape(self.slots, hidden)
    return a, b

  def fill_from_records(self, buffer: np.ndarray, slots: np.ndarray, records: np.ndarray,
                        row_stride: int, num_matrices: int) -> None:
    """Copies record-major `records` [n, record bytes] (uint8) into `slots` of `buffer`:
    `num_matrices` rows of b_nbytes each, `row_stride` bytes apart (0: the plane-A part
    then the plane-B part, back to back: a quantized record)."""
    if not row_stride:
      a = buffer[:self.slots * self.a_nbytes].reshape(self.slots, self.a_nbytes)
      b = buffer[self.slots * self.a_nbytes:self.nbytes].reshape(self.slots, self.b_nbytes)
      a[slots] = records[:, :self.a_nbytes]
      b[slots] = records[:, self.a_nbytes:self.a_nbytes + self.b_nbytes]
      return
    row = self.b_nbytes
    a = buffer[:self.slots * self.a_nbytes].reshape(self.slots, self.a_nbytes)
    b = buffer[self.slots * self.a_nbytes:self.nbytes].reshape(self.slots, row)
    for m in range(num_matrices - 1):
      a[slots, m * row:(m + 1) * row] = records[:, m * row_stride:m * row_stride + row]
    last = (num_matrices - 1) * row_stride
    b[slots] = records[:, last:last + row]


@dataclasses.dataclass(frozen=True)
class BundleStore:
  """An opened neuron-bundle store.

  Attributes:
    path: the directory.
    layout: "bundled" or "split".
    num_layers, num_neurons, hidden: L, F, D.
    matrices: record order, e.g. ("gate", "up", "down").
    dtype: stored dtype.
    row_stride: bytes between a record's matrix rows (D * itemsize when
      bundled; padded to 4 KiB when split).
    record_nbytes: bytes of one neuron record in memory and (bundled) on disk.
    order: [L, F] neuron id at each record position (hottest first).
    store: the LayerStore it is (its lock, files and sizes).
    weights: the weight format of the records ("float32": rows of `dtype`).
    a_nbytes, b_nbytes: bytes of a neuron's plane-A part (input rows, with their
      scales) and plane-B part (down row); 0 for float32 (rows of `dtype`).
  """

  path: str
  layout: Layout
  num_layers: int
  num_neurons: int
  hidden: int
  matrices: tuple[str, ...]
  dtype: np.dtype
  row_stride: int
  record_nbytes: int
  order: np.ndarray
  store: LayerStore = dataclasses.field(repr=False, compare=False)
  weights: str = "float32"
  a_nbytes: int = 0
  b_nbytes: int = 0

  @property
  def quantized(self) -> bool:
    """Whether the records hold another format than rows of `dtype`."""
    return self.weights != "float32"

  @property
  def row_nbytes(self) -> int:
    """Useful bytes of one matrix row (a neuron's slice of one matrix; quantized: its
    down row)."""
    return self.b_nbytes if self.quantized else self.hidden * self.dtype.itemsize

  @property
  def neuron_nbytes(self) -> int:
    """Useful (unpadded) bytes of one neuron: the ideal cost of reading it."""
    if self.quantized:
      return self.a_nbytes + self.b_nbytes
    return len(self.matrices) * self.row_nbytes

  def tables(self, layer: int) -> dict[str, np.ndarray]:
    """Layer `layer`'s down table ({} for float32 and bfloat16): see the module docstring."""
    if f"tables/{layer}" not in self.store.groups:
      return {}
    return {k: np.array(v) for k, v in self.store.load(f"tables/{layer}").items()}

  def fill(self, planes: Planes, buffer: np.ndarray, slots: np.ndarray,
           records: np.ndarray) -> None:
    """Copies whole records [n, record_nbytes] (uint8) read record-major into `slots`."""
    stride = 0 if self.quantized else self.row_stride
    planes.fill_from_records(buffer, slots, records, stride, len(self.matrices))

  @property
  def total_nbytes(self) -> int:
    """Bytes on disk (what the disk tier holds): every layer's records and the order."""
    return self.store.total_nbytes

  def file(self, layer: int) -> str:
    """The file of layer ``layer``'s records (record k at byte k * record_nbytes)."""
    return self.store.file(f"layers/{layer}")

  def layer_nbytes(self) -> int:
    """Bytes of one layer's records."""
    return self.num_neurons * self.record_nbytes

  def requests(self, positions: np.ndarray, coalesce: bool = True,
               max_run: int = 256) -> list[Request]:
    """Reads that fetch records at sorted `positions` into consecutive slots.

    Args:
      positions: record positions (sorted).
      coalesce: merge runs of adjacent records into one request each
        (`coalesce_requests`), at most `max_run` records long.
      max_run: the longest merged run, in records.

    Returns:
      (file offset, bytes, destination byte offset) per read, destination
      relative to a buffer whose slot j receives positions[j].
    """
    if self.layout == "split":
      f, s = self.num_neurons, self.row_stride
      return [((m * f + int(p)) * s, self.row_nbytes, j * self.record_nbytes + m * s)
              for j, p in enumerate(positions) for m in range(len(self.matrices))]
    r = self.record_nbytes
    reqs = [(int(p) * r, r, j * r) for j, p in enumerate(positions)]
    return coalesce_requests(reqs, max_run * r) if coalesce else reqs

  def planes(self, slots: int) -> Planes:
    """The planar layout of a buffer of `slots` records of this store."""
    if self.quantized:
      return Planes(slots, self.a_nbytes, self.b_nbytes)
    row = self.row_nbytes
    return Planes(slots, (len(self.matrices) - 1) * row, row)

  @property
  def planar_direct(self) -> bool:
    """Whether records can be read straight into planes (rows of whole pages,
    no record padding): else read whole records and copy them."""
    if self.quantized:
      return (self.a_nbytes % PAGE == 0 and self.b_nbytes % PAGE == 0
              and self.record_nbytes == self.a_nbytes + self.b_nbytes)
    rows_ok = self.row_nbytes % PAGE == 0
    return rows_ok and (self.layout == "split" or self.record_nbytes == self.neuron_nbytes)

  def planar_requests(self, positions: np.ndarray, planes: Planes, first_slot: int = 0,
                      coalesce: bool = True, max_run: int = 256) -> Requests:
    """Reads that put records at sorted `positions` into slots first_slot, first_slot + 1, ...
    of a planar buffer.

    Bundled: one request per run of adjacent records (at most `max_run`; one
    per record without `coalesce`, or when records are padded), scattered
    into the planes, built as arrays (no Python per record). Split: one
    request per matrix row (the no-bundling baseline). An O_DIRECT reader
    takes them only if `planar_direct` (it refuses unaligned segments).
    """
    positions = np.asarray(positions, np.int64)
    slots = range(first_slot, first_slot + len(positions))
    row, mats = self.row_nbytes, len(self.matrices)
    if self.layout == "split":
      f, s = self.num_neurons, self.row_stride
      out = []
      for p, j in zip(positions.tolist(), slots):
        for m in range(mats - 1):
          out.append(((m * f + p) * s, row, planes.a_offset(j) + m * row))
        out.append((((mats - 1) * f + p) * s, row, planes.b_offset(j)))
      return Requests.of(out)
    r = self.record_nbytes
    a, row = planes.a_nbytes, planes.b_nbytes
    if r != a + row:  # padded records: read each neuron's bytes alone (buffered reads only)
      return Requests.of([(int(p) * r, a + row,
                           ((planes.a_offset(j), a), (planes.b_offset(j), row)))
                          for p, j in zip(positions.tolist(), slots)])
    return Requests.planar(positions, a, row, planes.a_offset(first_slot),
                           planes.b_offset(first_slot), max_run if coalesce else 1)

  def close(self) -> None:
    """Releases the store's lock (if opened locked)."""
    self.store.close()

  @classmethod
  def open(cls, path: str | os.PathLike, *, lock: bool = False) -> BundleStore:
    """Opens a complete neuron store.

    Args:
      path: the store directory.
      lock: hold its shared lock until `close()` (engines do).

    Raises:
      FileNotFoundError, IncompleteStoreError: as `LayerStore.open`.
      StoreMismatchError: `path` is a hetflow store of another kind (a layer store).
    """
    store = LayerStore.open(path, lock=lock)
    try:
      m = store.metadata
      if m.get("kind") != KIND:
        raise StoreMismatchError(
          f"{store.path} is a hetflow layer store, not a neuron-bundle store; pass another"
          " store_dir")
      order = np.array(store.load("order")["order"])
      out = cls(store.path, m["layout"], int(m["num_layers"]), int(m["num_neurons"]),
                int(m["hidden"]), tuple(m["matrices"]), dtype_from_name(m["dtype"]),
                int(m["row_stride"]), int(m["record_nbytes"]), order, store,
                m.get("weights", "float32"), int(m.get("a_nbytes", 0)),
                int(m.get("b_nbytes", 0)))
      if any(store.tensors(f"layers/{i}")["records"].offset for i in range(out.num_layers)):
        raise StoreMismatchError(f"{store.path}: records must start at byte 0 of their files")
    except BaseException:
      store.close()
      raise
    return out


def runs(positions: np.ndarray, max_run: int = 1 << 30) -> list[tuple[int, int]]:
  """Maximal runs of consecutive integers in sorted positions: (start, count)."""
  if len(positions) == 0:
    return []
  positions = np.asarray(positions)
  breaks = np.nonzero(np.diff(positions) != 1)[0] + 1
  out = []
  for chunk in np.split(positions, breaks):
    for s in range(0, len(chunk), max_run):
      out.append((int(chunk[s]), int(min(max_run, len(chunk) - s))))
  return out


def bridge_gaps(positions: np.ndarray, gap: int, allowed: np.ndarray | None = None) -> np.ndarray:
  """Sorted `positions` plus every gap of at most `gap` records between two of
  them (where `allowed`, e.g. not cached), so that both ends come in one read.

  Small reads are slow (the disk's rate at 24 KiB is a third of its rate at
  96 KiB here): reading a record nobody asked for can cost less than a second
  request.
  """
  positions = np.asarray(positions)
  if gap <= 0 or len(positions) < 2:
    return positions
  d = np.diff(positions)
  extra = [np.arange(a + 1, b) for a, b, k in zip(positions[:-1], positions[1:], d)
           if 1 < k <= gap + 1]
  if not extra:
    return positions
  extra = np.concatenate(extra)
  if allowed is not None:
    extra = extra[allowed[extra]]
  return np.union1d(positions, extra)


def _weights(model: Any) -> str:
  """The model's weight format name ("float32" for a model without one)."""
  return str(getattr(model, "weights", "float32"))


def neuron_fingerprint(model: Any, order: np.ndarray, matrices: Sequence[str],
                       layout: Layout) -> dict[str, Any]:
  """The fingerprint record of a neuron store: the model's, plus what the records hold
  (and their weight format, unless float32: float32 stores keep the fingerprint they
  had before formats existed, so they are reused)."""
  order = np.ascontiguousarray(order, np.int32)
  record = {"kind": KIND, "model": model_fingerprint(model), "layout": layout,
            "matrices": list(matrices),
            "order": hashlib.sha256(order.tobytes()).hexdigest()[:32]}
  if _weights(model) != "float32":
    record["weights"] = _weights(model)
  return record


def default_store_dir(model: Any, order: np.ndarray, matrices: Sequence[str],
                      layout: Layout = "bundled") -> str:
  """cache_root()/neuron_stores/<name>-<dtype or weight format>-<layout>-<fingerprint
  digest[:12]>."""
  digest = fingerprint_digest(neuron_fingerprint(model, order, matrices, layout))
  dtype = np.dtype(getattr(model.dtype, "dtype", model.dtype)).name
  if _weights(model) != "float32":
    dtype = _weights(model)
  return os.path.join(cache_root(), "neuron_stores",
                      f"{model.config.name}-{dtype}-{layout}-{digest[:12]}")


def write_store(path: str, model: Any, order: np.ndarray, matrices: Sequence[str],
                layout: Layout = "bundled", progress: bool = False,
                overwrite: bool = False, codec: Any = None) -> BundleStore:
  """Writes a store of `model`'s FFNs, neurons in `order` [L, F] (hottest first).

  Atomic, with the free space checked first (`LayerStore.write`); peak memory
  one layer's records.

  Args:
    path: the store directory to create.
    model: the hetflow Model (its `layers/<i>/mlp/<matrix>` tensors).
    order: [L, F] neuron id at each record position.
    matrices: the matrices a record holds, in record order
      (`hetflow.sparsity.bundles.neuron_matrices(model.config)`).
    layout: "bundled" or "split".
    progress: show a progress bar.
    overwrite: replace a hetflow store at `path` (never anything else, nor a
      store an engine holds open).
    codec: how a quantized model's records are made
      (`hetflow.sparsity.bundles.record_codec(model)`); None for float32.

  Returns:
    The opened (unlocked) store.

  Raises:
    ValueError: a quantized model without its codec, or with layout "split".
  """
  c = model.config
  mats = tuple(matrices)
  if _weights(model) != "float32":
    return _write_quantized(path, model, order, mats, layout, progress, overwrite, codec)
  dtype = np.dtype(getattr(model.dtype, "dtype", model.dtype))
  row = c.hidden_size * dtype.itemsize
  stride, record = record_layout(c.hidden_size, dtype.itemsize, len(mats), layout)
  order = np.ascontiguousarray(order, np.int32)
  if order.shape != (c.num_layers, c.intermediate_size):
    raise ValueError(f"order has shape {order.shape}; the model needs "
                     f"{(c.num_layers, c.intermediate_size)} (layers, neurons)")

  def generate():
    for layer in range(c.num_layers):
      w = {m: model.tensor(f"layers/{layer}/mlp/{m}") for m in mats}
      rows = {m: (w[m].T if m != "down" else w[m])[order[layer]] for m in mats}  # [F, D]
      if layout == "bundled":
        out = np.zeros((c.intermediate_size, record), np.uint8)
        for i, m in enumerate(mats):
          out[:, i * stride:i * stride + row] = np.ascontiguousarray(rows[m]).view(np.uint8)
      else:
        out = np.zeros((len(mats), c.intermediate_size, stride), np.uint8)
        for i, m in enumerate(mats):
          out[i, :, :row] = np.ascontiguousarray(rows[m]).view(np.uint8)
      yield f"layers/{layer}", {"records": out.reshape(-1)}
    yield "order", {"order": order}

  fp = neuron_fingerprint(model, order, mats, layout)
  metadata = dict(kind=KIND, layout=layout, num_layers=c.num_layers,
                  num_neurons=c.intermediate_size, hidden=c.hidden_size, matrices=list(mats),
                  dtype=dtype.name, row_stride=stride, record_nbytes=record,
                  description=model.description, fingerprint=fingerprint_digest(fp),
                  fingerprint_record=fp)
  assert record % PAGE == 0
  LayerStore.write(path, generate(), progress=progress, description="neuron bundles",
                   overwrite=overwrite, metadata=metadata,
                   nbytes=store_nbytes(c.num_layers, c.intermediate_size, record)).close()
  return BundleStore.open(path)


def _write_quantized(path: str, model: Any, order: np.ndarray, mats: tuple[str, ...],
                     layout: Layout, progress: bool, overwrite: bool,
                     codec: Any) -> BundleStore:
  """`write_store` for a quantized model: records of the codec's plane-A and plane-B
  bytes, padded to 4 KiB, and each layer's down table; one layer in memory at a time."""
  c = model.config
  if codec is None or codec.weights != _weights(model):
    raise ValueError(f"a neuron store of weights={_weights(model)!r} needs that format's"
                     " record codec (hetflow.sparsity.bundles.record_codec(model)).")
  if layout != "bundled":
    raise ValueError(f"layout={layout!r}: quantized neuron stores are bundled only (the split"
                     " layout is float32's no-bundling ablation).")
  order = np.ascontiguousarray(order, np.int32)
  if order.shape != (c.num_layers, c.intermediate_size):
    raise ValueError(f"order has shape {order.shape}; the model needs "
                     f"{(c.num_layers, c.intermediate_size)} (layers, neurons)")
  a_n, b_n = codec.a_nbytes, codec.b_nbytes
  record = round_up(a_n + b_n)

  def generate():
    for layer in range(c.num_layers):
      a, b, table = codec.encode(model, layer, mats)
      out = np.zeros((c.intermediate_size, record), np.uint8)
      out[:, :a_n] = a[order[layer]]
      out[:, a_n:a_n + b_n] = b[order[layer]]
      del a, b
      yield f"layers/{layer}", {"records": out.reshape(-1)}
      if table:
        yield f"tables/{layer}", table
    yield "order", {"order": order}

  table_nbytes = c.num_layers * codec.table_nbytes(c.intermediate_size)
  fp = neuron_fingerprint(model, order, mats, layout)
  dtype = np.dtype(getattr(model.dtype, "dtype", model.dtype))
  metadata = dict(kind=KIND, layout=layout, num_layers=c.num_layers,
                  num_neurons=c.intermediate_size, hidden=c.hidden_size, matrices=list(mats),
                  dtype=dtype.name, row_stride=a_n, record_nbytes=record,
                  weights=_weights(model), a_nbytes=a_n, b_nbytes=b_n,
                  description=model.description, fingerprint=fingerprint_digest(fp),
                  fingerprint_record=fp)
  LayerStore.write(path, generate(), progress=progress, description="neuron bundles",
                   overwrite=overwrite, metadata=metadata,
                   nbytes=store_nbytes(c.num_layers, c.intermediate_size, record)
                   + table_nbytes + c.num_layers * PAGE).close()
  return BundleStore.open(path)


def open_store(model: Any, order: np.ndarray, matrices: Sequence[str],
               layout: Layout = "bundled", path: str | None = None, *,
               progress: bool = False, lock: bool = True, codec: Any = None) -> BundleStore:
  """Opens the neuron store of `model` with `order` and `layout`, writing it if missing.

  Args:
    model: the hetflow Model.
    order: [L, F] neuron order (hottest first).
    matrices: the matrices a record holds, in record order.
    layout: "bundled" or "split".
    path: the store directory; None: `default_store_dir(...)` in the cache,
      keyed by the fingerprint (reused across runs, one per model and order).
      An explicit path must be missing, an empty directory, or hold exactly
      this store.
    progress: show a progress bar while writing.
    lock: hold the store's shared lock until `close()`.
    codec: a quantized model's record codec (`write_store`).

  Raises:
    StoreMismatchError: the store at `path` holds another model, dtype,
      layout or order (never reused; delete it or pass another path).
    NotAStoreError: `path` is a non-empty folder that is not a hetflow store
      (nothing in it is deleted).
    InsufficientDiskSpaceError: the store does not fit the free space.
  """
  path = os.path.abspath(path or default_store_dir(model, order, matrices, layout))
  if not os.path.exists(os.path.join(path, MANIFEST)):
    try:
      write_store(path, model, order, matrices, layout, progress,
                  overwrite=os.path.isdir(path), codec=codec).close()
    except FileExistsError:
      if not is_hetflow_store(path):  # not another writer that won the race
        raise
  store = BundleStore.open(path, lock=lock)
  try:
    dtype = np.dtype(getattr(model.dtype, "dtype", model.dtype)).name
    check_fingerprint(store.store, neuron_fingerprint(model, order, matrices, layout),
                      f"{model.description!r}, {dtype}, weights {_weights(model)},"
                      f" layout {layout}")
  except BaseException:
    store.close()
    raise
  return store
