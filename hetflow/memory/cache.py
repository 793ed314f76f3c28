"""The one cache root of hetflow: hardware profiles, layer stores, neuron stores."""

from __future__ import annotations

import os


def cache_root() -> str:
  """$HETFLOW_CACHE, or ~/.cache/hetflow when it is unset or empty.

  Everything hetflow caches between runs lives under it: the hardware profile
  (``hardware_profile.json``), layer stores (``stores/``) and neuron-bundle
  stores (``neuron_stores/``), each keyed by what it was made from.
  """
  return os.environ.get("HETFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "hetflow")
