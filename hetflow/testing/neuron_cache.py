"""A check for tests of neuron_cluster and moe_sparse: the cache holds what it says."""

import numpy as np

from hetflow.memory import ReaderPool, aligned_empty


def assert_cache_holds_its_records(inner) -> int:
  """Every cached slot of a NeuronCluster holds the store's record of the position it
  is cached for (byte for byte), and every jax view of the pool the strategy keeps
  shows the pool's bytes as they are now (it aliases them); returns how many records
  were checked."""
  pa, pb = inner.pool_planes.views(inner.pool, np.uint8, inner.pool_planes.b_nbytes)
  for (which, start, size), views in inner._views.items():
    if which == "pool":
      for view, plane in zip(views, (pa, pb)):
        np.testing.assert_array_equal(np.asarray(view).view(np.uint8).reshape(size, -1),
                                      plane[start:start + size], err_msg=f"view {start}+{size}")
  checked = 0
  with ReaderPool(2, direct=False) as reader:
    for layer in range(inner.cache.slot_of.shape[0]):
      positions = np.flatnonzero(inner.cache.slot_of[layer] >= 0)
      if not len(positions):
        continue
      planes = inner.store.planes(len(positions))
      buf = aligned_empty(planes.nbytes)
      reqs = inner.store.planar_requests(positions, planes)
      reader.read_many(inner.store.file(layer), buf, reqs).result()
      a, b = planes.views(buf, np.uint8, planes.b_nbytes)
      slots = inner.cache.slot_of[layer, positions]
      np.testing.assert_array_equal(pa[slots], a)
      np.testing.assert_array_equal(pb[slots], b)
      checked += len(positions)
  return checked
