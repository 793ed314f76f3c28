"""Facts one measured process reads about itself, and the cache drop before a run.

Shared by the benchmark's hetflow rows (`hetflow.bench.runner`) and its peer
rows (`hetflow.bench.peers`), each of which runs in a fresh process.
"""

from __future__ import annotations

import resource
from typing import Any

import numpy as np


def proc_read_bytes() -> int:
  """Bytes this process caused to be fetched from storage (page-cache misses and O_DIRECT),
  from /proc/self/io; -1 where the kernel does not say."""
  try:
    with open("/proc/self/io") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
  except (OSError, StopIteration):
    return -1


def peak_rss() -> int:
  """Peak resident set of this process in bytes.

  VmHWM, not getrusage's ru_maxrss: the latter survives exec, so a child
  started by a big parent would report the parent's peak.
  """
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(vocab_size: int, length: int, seed: int = 0) -> np.ndarray:
  """The prompt every system gets: fixed random ids (synthetic models have no tokenizer)."""
  return np.random.default_rng(seed).integers(3, vocab_size, (1, length)).astype(np.int32)


def touched_bytes(model) -> int:
  """Weight bytes one decode token reads: every block, the head, one embedding row."""
  n = sum(model.group_nbytes(g) for g in model.group_names() if g.startswith("layers/"))
  n += model.group_nbytes("head")
  if model.config.tie_word_embeddings:
    n += model.group_nbytes("embed")  # the tied LM head is the embedding table
  return n


def drop_cold(spec: dict[str, Any]) -> str:
  """Evicts the model's files (store, HF copy, GGUF file) from the page cache before a measured run.

  Per file (fsync + fadvise DONTNEED), not machine-wide drop_caches, unless
  the spec asks for "drop_caches": on a shared machine a global drop makes
  every other process re-read its files, and that burst of reads lands on the
  disk exactly while the next run measures it. (Neither evicts pages a process
  still has mapped; a peer's warm-up mapping stays warm, as it would in use.)

  Returns:
    The method used ("fadvise", "drop_caches" or "none").
  """
  from hetflow.memory import drop_page_cache

  method = spec.get("drop_method", "fadvise")
  if method == "none":
    return "none"
  files = [p for p in (spec.get("store_dir"), spec.get("hf_dir"), spec.get("gguf_path")) if p]
  return drop_page_cache(files, method=method)
