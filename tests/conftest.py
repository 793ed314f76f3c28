import os

# Tests run on the CPU with float32 matmuls at full precision: the parity
# tolerances assume it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Stores, profiles and calibrations that tests write go to a cache of their own,
# removed at exit, never into the user's (hetflow.memory.cache.cache_root).
if not os.environ.get("HETFLOW_CACHE"):
  import atexit
  import shutil
  import tempfile

  _CACHE = tempfile.mkdtemp(prefix="hetflow-test-cache-")
  os.environ["HETFLOW_CACHE"] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, True)

import pytest  # noqa: E402  (after the environment the imports of jax read)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """$HETFLOW_CACHE for a test module: stores converted on first use, neuron stores and
  sparse calibrations go here, not into the user's cache."""
  path = str(tmp_path_factory.mktemp("hetflow-cache"))
  old = os.environ.get("HETFLOW_CACHE")
  os.environ["HETFLOW_CACHE"] = path
  yield path
  if old is None:
    os.environ.pop("HETFLOW_CACHE", None)
  else:
    os.environ["HETFLOW_CACHE"] = old
