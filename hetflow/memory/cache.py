"""The one cache root of hetflow: hardware profiles, layer stores, neuron stores."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np


def cache_root() -> str:
  """$HETFLOW_CACHE, or ~/.cache/hetflow when it is unset or empty.

  Everything hetflow caches between runs lives under it: the hardware profile
  (``hardware_profile.json``), layer stores (``stores/``) and neuron-bundle
  stores (``neuron_stores/``), each keyed by what it was made from.
  """
  return os.environ.get("HETFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "hetflow")


def cached_arrays(path: str, compute: Callable[[], dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
  """The arrays saved at `path` (.npz), or `compute()`'s, written there first.

  The write goes to a process-private temporary file renamed into place, so a crash
  leaves no half-written cache and two processes computing at once both succeed.
  """
  if os.path.exists(path):
    with np.load(path) as f:
      return dict(f)
  arrays = compute()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return arrays
