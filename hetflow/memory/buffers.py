"""Page-aligned host buffers, and typed views into them.

Why aligned: O_DIRECT reads need an aligned destination address, and on CPU
``jax.device_put`` of a numpy array whose data is aligned (64 bytes suffices;
pages certainly do) does not copy: the jax array *aliases* the numpy memory
(checked on jax 0.10.2, CPU; ``tests/test_memory.py`` asserts it). So a weight
read from disk into an aligned buffer reaches XLA with no copy at all.

The reuse rule that aliasing imposes: a buffer that has been handed to jax
must not be refilled (by a read, or any write) while any jax array made from
it may still be read -- including computations that were dispatched but have
not finished (jax dispatch is asynchronous). A strategy that recycles buffers
must, before refilling one, (1) drop its references to the jax arrays made
from it and (2) ``block_until_ready()`` every result that consumed them.
Otherwise the refill silently changes the weights under a live computation.
``jnp.asarray(numpy)`` copies instead (slower, ~1-2 GB/s into fresh pages) and
needs no such care.
"""

from __future__ import annotations

import mmap
from typing import Any

import ml_dtypes
import numpy as np

PAGE = 4096
"""The alignment hetflow uses for O_DIRECT I/O and file layout."""


def round_up(n: int, alignment: int = PAGE) -> int:
  """Rounds ``n`` up to a multiple of ``alignment``."""
  return -(-int(n) // alignment) * alignment


def is_aligned(x: np.ndarray | int, alignment: int = PAGE) -> bool:
  """Whether an array's data address (or an int) is a multiple of ``alignment``."""
  addr = x if isinstance(x, int) else x.ctypes.data
  return addr % alignment == 0


def aligned_empty(nbytes: int, alignment: int = PAGE) -> np.ndarray:
  """Allocates an uninitialised uint8 buffer whose data address is aligned.

  Args:
    nbytes: size of the returned array.
    alignment: a power of two; the start address is a multiple of it.

  Returns:
    A writable, C-contiguous 1-D ``uint8`` array of exactly ``nbytes``. It
    keeps its backing memory alive; the memory is returned to the OS when the
    array (and every view of it) is gone.
  """
  nbytes = int(nbytes)
  if nbytes < 0:
    raise ValueError(f"nbytes must be >= 0, got {nbytes}")
  if alignment <= 0 or alignment & (alignment - 1):
    raise ValueError(f"alignment must be a power of two, got {alignment}")
  if nbytes > 0 and mmap.PAGESIZE % alignment == 0:
    # Anonymous mmap: page-aligned by construction, zero-filled lazily, and
    # unmapped (given back to the OS) as soon as the last view dies.
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
  # Larger alignments (e.g. 2 MiB): over-allocate and offset into the block.
  raw = np.empty(nbytes + alignment, dtype=np.uint8)
  start = (-raw.ctypes.data) % alignment
  return raw[start : start + nbytes]


def dtype_from_name(name: str | np.dtype | Any) -> np.dtype:
  """Resolves a dtype name, including ml_dtypes ones such as ``"bfloat16"``.

  Plain numpy does not know ``np.dtype("bfloat16")``; manifests store dtypes
  by name, so every reader goes through here.
  """
  if not isinstance(name, str):
    return np.dtype(name)
  extra = getattr(ml_dtypes, name, None)
  if extra is not None and isinstance(extra, type):
    return np.dtype(extra)
  try:
    return np.dtype(name)
  except TypeError:
    raise ValueError(f"unknown dtype name {name!r}") from None


def view_as(
  buf: np.ndarray,
  offset: int,
  shape: tuple[int, ...] | list[int],
  dtype: str | np.dtype | Any,
) -> np.ndarray:
  """A zero-copy typed view into a byte buffer.

  Args:
    buf: a C-contiguous 1-D ``uint8`` array (e.g. from :func:`aligned_empty`).
    offset: byte offset of the view's first element.
    shape: shape of the view.
    dtype: numpy dtype, or a name (``"bfloat16"`` included).

  Returns:
    An array sharing memory with ``buf``.

  Raises:
    ValueError: if the view would run past the buffer, or ``offset`` is not a
      multiple of the dtype's item size (numpy would copy or refuse).
  """
  dtype = dtype_from_name(dtype)
  if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
    raise ValueError(
      f"buffer must be a C-contiguous 1-D uint8 array, got {buf.dtype} shape {buf.shape}"
    )
  shape = tuple(int(s) for s in shape)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if offset < 0 or offset + nbytes > buf.nbytes:
    raise ValueError(
      f"view of {nbytes} bytes at offset {offset} runs past the {buf.nbytes}-byte buffer"
    )
  if (buf.ctypes.data + offset) % dtype.itemsize:
    raise ValueError(f"offset {offset} is not aligned to {dtype} ({dtype.itemsize} bytes)")
  return buf[offset : offset + nbytes].view(dtype).reshape(shape)


def as_bytes(arr: np.ndarray) -> memoryview:
  """A flat byte memoryview of a C-contiguous array (no copy), for writing to files."""
  arr = np.ascontiguousarray(arr)
  # ml_dtypes arrays do not export a buffer of their own type; bytes do.
  return memoryview(arr.reshape(-1).view(np.uint8))
