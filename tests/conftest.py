import os

# Tests run on the CPU with float32 matmuls at full precision: the parity
# tolerances assume it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

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
