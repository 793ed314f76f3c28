"""The neuron-bundle store: FFN weights on disk, one neuron per aligned record.

Layout (`layout="bundled"`, PowerInfer-2's bundling): per layer one file of F
records; record k holds neuron order[k]'s gate column, up column and down row
(OPT: up and down) back to back, padded to 4 KiB, so one O_DIRECT read fetches
one neuron and one read of n records fetches a run of n adjacent neurons.
Neurons are sorted hottest first (by activation statistics), so hot clusters
are sequential on disk and cold misses of neighbouring ranks coalesce.

`layout="split"` is the ablation baseline without bundling: per layer the
matrices lie one after another, each neuron's row padded to 4 KiB, so a neuron
costs one read per matrix. In memory both layouts give the same record shape
([matrices, row stride] per neuron), so the compute does not care.

Per-neuron biases (OPT's fc1 bias) are not in the records: they are tiny and
live in the fixed region with the norms.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import threading
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.memory.buffers import dtype_from_name, round_up
from hetflow.models import layers
from hetflow.models.config import ModelConfig
from hetflow.models.model import Model

Layout = Literal["bundled", "split"]
_O_DIRECT = getattr(os, "O_DIRECT", 0)
FORMAT = "hetflow.neuron_bundles"


def neuron_matrices(config: ModelConfig) -> tuple[str, ...]:
  """The FFN matrices a neuron has a slice of, in record order."""
  return ("up", "down") if config.arch == "opt" else ("gate", "up", "down")


def neuron_step(config: ModelConfig, stride: int, buf, idx, valid, pos, h, small):
  """The FFN over a subset of neurons, read from their records (neuron_cluster's
  sparse step; jit it with `functools.partial(neuron_step, config, stride)`).

  Args:
    config: the model's config.
    stride: elements between one matrix's row and the next in a record.
    buf: [slots, record elements] records (a cache pool or a staging buffer).
    idx: [n] record slots to use; valid: [n] which are real (padding: False).
    pos: [n] the neurons' indices in the layer (for the biases).
    h: [B, T, D] the normed input; small: the layer's biases, if any.

  Returns:
    ([B, T, D] the neurons' contribution, how many of them fired).
  """
  d = config.hidden_size
  w = jnp.take(buf, idx, axis=0)  # [n, record elements]
  rows = {m: w[:, i * stride:i * stride + d] for i, m in enumerate(neuron_matrices(config))}

  def proj(m):
    y = jnp.einsum("BTD,nD->BTn", h, rows[m])
    b = small.get(m + "_bias")
    return y if b is None else y + jnp.take(b, pos)

  act = layers.activation(config.hidden_act)
  if config.arch == "opt":
    a = act(proj("up"))
  else:
    u = proj("up")
    if config.hidden_act == "drelu":
      u = jax.nn.relu(u)
    a = act(proj("gate")) * u
  a = jnp.where(valid, a, 0)  # padding slots contribute exact zeros
  fired = jnp.sum(jnp.any(a.reshape(-1, a.shape[-1]) != 0, axis=0))
  return jnp.einsum("BTn,nD->BTD", a, rows["down"]), fired


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

  @property
  def row_nbytes(self) -> int:
    """Useful bytes of one matrix row (a neuron's slice of one matrix)."""
    return self.hidden * self.dtype.itemsize

  @property
  def neuron_nbytes(self) -> int:
    """Useful (unpadded) bytes of one neuron: the ideal cost of reading it."""
    return len(self.matrices) * self.row_nbytes

  def file(self, layer: int) -> str:
    return os.path.join(self.path, f"layer-{layer:04d}.bin")

  def layer_nbytes(self) -> int:
    return self.num_neurons * self.record_nbytes

  def requests(self, positions: np.ndarray, coalesce: bool = True,
               max_run: int = 256) -> list[tuple[int, int, int]]:
    """Reads that fetch records at sorted `positions` into consecutive slots.

    Returns:
      (file offset, bytes, destination byte offset) per read, destination
      relative to a buffer whose slot j receives positions[j].
    """
    out = []
    if self.layout == "split":
      f, s = self.num_neurons, self.row_stride
      for j, p in enumerate(positions):
        for m in range(len(self.matrices)):
          out.append(((m * f + int(p)) * s, self.row_nbytes, j * self.record_nbytes + m * s))
      return out
    r = self.record_nbytes
    if not coalesce:
      return [(int(p) * r, r, j * r) for j, p in enumerate(positions)]
    j = 0
    for start, count in runs(positions, max_run):
      out.append((start * r, count * r, j * r))
      j += count
    return out

  @classmethod
  def open(cls, path: str) -> "BundleStore":
    with open(os.path.join(path, "manifest.json")) as f:
      m = json.load(f)
    if m.get("format") != FORMAT:
      raise ValueError(f"{path} is not a neuron-bundle store.")
    order = np.load(os.path.join(path, "order.npy"))
    return cls(os.path.abspath(path), m["layout"], m["num_layers"], m["num_neurons"],
               m["hidden"], tuple(m["matrices"]), dtype_from_name(m["dtype"]),
               m["row_stride"], m["record_nbytes"], order)


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


def write_store(path: str, model: Model, order: np.ndarray, layout: Layout = "bundled",
                progress: bool = False) -> BundleStore:
  """Writes a store for `model`'s FFNs, neurons in `order` [L, F] (hottest first).

  Written atomically (a partial directory renamed when complete).
  """
  from tqdm.auto import tqdm

  c = model.config
  mats = neuron_matrices(c)
  dtype = np.dtype(model.dtype)
  row = c.hidden_size * dtype.itemsize
  stride = row if layout == "bundled" else round_up(row)
  record = round_up(len(mats) * stride)
  partial = f"{path}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    for layer in tqdm(range(c.num_layers), desc="neuron bundles", disable=not progress):
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
      with open(os.path.join(partial, f"layer-{layer:04d}.bin"), "wb") as f:
        f.write(out.tobytes())
        os.fsync(f.fileno())
    np.save(os.path.join(partial, "order.npy"), np.asarray(order, np.int32))
    manifest = dict(format=FORMAT, layout=layout, num_layers=c.num_layers,
                    num_neurons=c.intermediate_size, hidden=c.hidden_size, matrices=list(mats),
                    dtype=dtype.name, row_stride=stride, record_nbytes=record,
                    model=model.description)
    with open(os.path.join(partial, "manifest.json"), "w") as f:
      json.dump(manifest, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(partial, path)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return BundleStore.open(path)


class BatchReader:
  """O_DIRECT reads of many small records, spread over a few threads.

  One future per worker batch rather than per record: with hundreds of 24 KiB
  reads per layer, per-read Python overhead would otherwise cost more than
  the disk. `depth` threads keep that many requests in flight.
  """

  def __init__(self, depth: int = 8, direct: bool = True):
    self.depth = depth
    self.direct = bool(direct and _O_DIRECT)
    self._pool = concurrent.futures.ThreadPoolExecutor(depth, thread_name_prefix="bundles")
    self._fds: dict[str, int] = {}
    self._lock = threading.Lock()
    self.bytes = 0
    self.requests = 0

  def _fd(self, path: str) -> int:
    with self._lock:
      fd = self._fds.get(path)
      if fd is None:
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
          fd = os.open(path, flags | (_O_DIRECT if self.direct else 0))
        except OSError:
          self.direct = False
          fd = os.open(path, flags)
        self._fds[path] = fd
      return fd

  def _run(self, fd: int, buffer: np.ndarray, reqs: Sequence[tuple[int, int, int]]) -> int:
    mv = memoryview(buffer)
    total = 0
    for off, n, dst in reqs:
      want = round_up(n) if self.direct else n
      got = os.preadv(fd, [mv[dst:dst + want]], off)
      if got < n:
        raise OSError(f"short read at offset {off}: {got} of {n} bytes")
      total += n
    return total

  def record(self):
    """The reads so far as a ReadRecord (every request direct or every one buffered)."""
    from hetflow.memory.reader import ReadRecord  # until this reader merges into ReaderPool

    return ReadRecord(bytes=self.bytes, requests=self.requests,
                      direct_requests=self.requests if self.direct else 0,
                      buffered_requests=0 if self.direct else self.requests)

  def read(self, path: str, buffer: np.ndarray, reqs: Sequence[tuple[int, int, int]],
           parallel: bool = True) -> list[concurrent.futures.Future]:
    """Starts the reads; returns futures (one per worker batch).

    Destinations must leave room for the 4 KiB round-up (records are padded).
    With parallel=False the reads run here, one at a time (queue depth 1).
    """
    fd = self._fd(path)
    self.requests += len(reqs)
    self.bytes += sum(r[1] for r in reqs)
    if not parallel:
      f = concurrent.futures.Future()
      f.set_result(self._run(fd, buffer, reqs))
      return [f]
    k = max(1, min(self.depth, len(reqs)))
    # Contiguous slices keep each worker's reads in file order.
    bounds = np.linspace(0, len(reqs), k + 1).astype(int)
    return [self._pool.submit(self._run, fd, buffer, reqs[a:b])
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

  def close(self) -> None:
    self._pool.shutdown(wait=True)
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()
