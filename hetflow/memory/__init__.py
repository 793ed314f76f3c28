"""Tiers, budgets, aligned buffers, the disk store and the async reader pool.

Everything a strategy needs to hold bytes in a tier and move them between
tiers: ``Budget`` and ``MemoryLedger`` (what may be placed, and what is),
``device_sharding``/``host_sharding`` (where jax puts it), ``aligned_empty``
(host buffers that O_DIRECT can fill and jax can alias), ``LayerStore`` (the
disk tier) and ``ReaderPool`` (reads from it, several in flight).
"""

from hetflow.memory.budget import (
  TIERS,
  Allocation,
  Budget,
  BudgetExceeded,
  MemoryLedger,
  format_bytes,
  parse_bytes,
)
from hetflow.memory.buffers import (
  PAGE,
  aligned_empty,
  dtype_from_name,
  is_aligned,
  round_up,
  view_as,
)
from hetflow.memory.limit import MemoryLimit, MemoryLimitError, mem_available
from hetflow.memory.reader import ReaderPool, ReadError, StoreView, drop_page_cache
from hetflow.memory.store import GroupInfo, IncompleteStoreError, LayerStore, TensorInfo
from hetflow.memory.tiers import (
  device_sharding,
  host_memory_kind,
  host_sharding,
  memory_kinds,
  sharding_for_tier,
)

__all__ = [
  "PAGE",
  "TIERS",
  "Allocation",
  "Budget",
  "BudgetExceeded",
  "GroupInfo",
  "IncompleteStoreError",
  "LayerStore",
  "MemoryLedger",
  "MemoryLimit",
  "MemoryLimitError",
  "ReadError",
  "ReaderPool",
  "StoreView",
  "TensorInfo",
  "aligned_empty",
  "device_sharding",
  "drop_page_cache",
  "dtype_from_name",
  "format_bytes",
  "host_memory_kind",
  "host_sharding",
  "is_aligned",
  "mem_available",
  "memory_kinds",
  "parse_bytes",
  "round_up",
  "sharding_for_tier",
  "view_as",
]
