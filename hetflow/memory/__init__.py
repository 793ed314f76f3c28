"""Tiers, budgets, aligned buffers, the disk stores, the reader and the cache root.

Everything a strategy needs to hold bytes in a tier and move them between
tiers: ``Budget`` and ``MemoryLedger`` (what may be placed, and what is),
``device_sharding``/``host_sharding`` (where jax puts it), ``aligned_empty``
(host buffers that O_DIRECT can fill and jax can alias), ``LayerStore`` (the
disk tier; ``store`` also builds a model's layer store and ``bundle_store``
its neuron-bundle store), ``ReaderPool`` (the one reader: whole groups or many
small records, several requests in flight, with a ``ReadRecord`` of what it
did) and ``cache_root`` (where stores and profiles are cached).
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
from hetflow.memory.cache import cache_root
from hetflow.memory.limit import MemoryLimit, MemoryLimitError, mem_available
from hetflow.memory.reader import (
  ReaderPool,
  ReadError,
  ReadRecord,
  Requests,
  StoreView,
  coalesce_requests,
  drop_page_cache,
)
from hetflow.memory.store import (
  GroupInfo,
  IncompleteStoreError,
  InsufficientDiskSpaceError,
  LayerStore,
  NotAStoreError,
  StoreInUseError,
  StoreMismatchError,
  TensorInfo,
)
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
  "InsufficientDiskSpaceError",
  "LayerStore",
  "MemoryLedger",
  "MemoryLimit",
  "MemoryLimitError",
  "NotAStoreError",
  "ReadError",
  "ReadRecord",
  "ReaderPool",
  "Requests",
  "StoreInUseError",
  "StoreMismatchError",
  "StoreView",
  "TensorInfo",
  "aligned_empty",
  "cache_root",
  "coalesce_requests",
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
