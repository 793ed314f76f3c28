import os

# Tests run on the CPU with float32 matmuls at full precision: the parity
# tolerances assume it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
