"""hetflow's native CPU matrix-vector kernels (matvec.cc beside this file), through XLA's FFI.

XLA CPU reads grouped int8 and int4 kernels at 0.3-0.7x float32's weights per second in
every pure-XLA formulation measured (docs/formats.md); these C++ kernels read every
stored format (float32 [in, out], bfloat16, int8 per channel, int8-gN, int4, int4-asym),
the quantized ones at or above float32's rate, on both cores, with float32 accumulation
(no activation quantization: they differ from the XLA formulations only in the order of
float32 additions).

The library is compiled on first use, with the system's C++ compiler (`$HETFLOW_CXX`, else
`g++` or `c++` on the PATH; `-O3 -march=native`), into `<cache root>/native/<key>/`,
keyed by the source, the compiler, the flags, jax's version and the CPU's feature flags,
under a file lock so concurrent processes build it once. Without a compiler, or when
the build or the load fails, `available()` says False once with one logged warning,
and `hetflow.models.kernels` uses its pure-XLA formulations (the same results up to
float32 rounding). `HETFLOW_NATIVE=0` forces that fallback.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading

import jax
import jax.numpy as jnp

from hetflow.hardware import cpuinfo_field
from hetflow.memory import compiled
from hetflow.memory.cache import cache_root

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "matvec.cc")
# neuron_cluster's sparse step over quantized records (hetflow/sparsity/bundles.py), built in.
NEURON_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "neuron.cc")
# What both include: the split between XLA's pool threads, and the 16-lane SIMD layer.
HEADERS = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), h)
                for h in ("parallel.h", "simd.h"))
NEURON_TARGETS = ("hetflow_neuron_in", "hetflow_neuron_down")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
LIBRARY = "libhetflow_matvec.so"

# Target name per format (as hetflow.models.formats.format_of names them).
TARGETS = {
    "float32": "hetflow_matvec_f32",
    "bfloat16": "hetflow_matvec_bf16",
    "int8": "hetflow_matvec_int8",
    "int8-g": "hetflow_matvec_int8g",
    "int4": "hetflow_matvec_int4",
    "int4-asym": "hetflow_matvec_int4_asym",
}

_log = logging.getLogger(__name__)


NativeBuildError = compiled.BuildError  # the kernels could not be compiled or loaded
compiler = compiled.compiler


def _cpu_flags() -> str:
  """The CPU's feature flags (-march=native code runs only where they are the same)."""
  import platform
  return cpuinfo_field("flags") or platform.processor() or platform.machine()


def build_key(cxx: str, flags: tuple[str, ...] = FLAGS) -> str:
  """What a built library depends on, hashed: source, compiler (its --version), flags,
  jax's version and the CPU's features."""
  return compiled.build_key([*(open(p, "rb").read().decode()
                               for p in (SOURCE, NEURON_SOURCE, *HEADERS)),
                             cxx, compiled.compiler_version(cxx), " ".join(flags),
                             jax.__version__, _cpu_flags()])


def build(cxx: str, directory: str, flags: tuple[str, ...] = FLAGS) -> str:
  """Compiles matvec.cc and neuron.cc into `directory`/<key>/ unless it is there already
  (`hetflow.memory.compiled.build`); returns the library's path.

  Raises:
    NativeBuildError: the compiler is missing or failed (its output in the message).
  """
  return compiled.build(cxx, [SOURCE, NEURON_SOURCE], [*flags, "-I", jax.ffi.include_dir()],
                        os.path.join(directory, build_key(cxx, flags)), LIBRARY)


_registered: ctypes.CDLL | None = None
_lock = threading.Lock()  # strategies trace from more than one thread


def _register(path: str) -> ctypes.CDLL:
  """Loads the library and registers its handlers with XLA (once per process: every
  build of the same source has the same handlers)."""
  global _registered
  if _registered is None:
    lib = ctypes.cdll.LoadLibrary(path)
    for target in (*TARGETS.values(), *NEURON_TARGETS):
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)),
                                  platform="cpu")
    _registered = lib
  return _registered


def _load(cxx: str | None) -> bool:
  with _lock:
    return _load_once(cxx)


@functools.cache
def _load_once(cxx: str | None) -> bool:
  """One attempt per compiler in a process (into the cache root of that moment); one
  warning if it fails."""
  try:
    if cxx is None:
      raise NativeBuildError("no C++ compiler found (g++, c++ or $HETFLOW_CXX)")
    _register(build(cxx, os.path.join(cache_root(), "native")))
    return True
  except (NativeBuildError, OSError, AttributeError) as e:
    _log.warning("hetflow's native CPU kernels are not available, so quantized decode uses"
                 " the slower pure-XLA kernels: %s", e)
    return False


def enabled() -> bool:
  """Whether hetflow computes matrix-vector products with the native kernels: not when
  HETFLOW_NATIVE=0, nor when they could not be built (one warning says why)."""
  if compiled.switched_off():
    return False
  return _load(compiler())


def calls() -> int:
  """How many native kernel calls this process has made (0 when none is loaded)."""
  if _registered is None:
    return 0
  _registered.hetflow_native_calls.restype = ctypes.c_int64
  return int(_registered.hetflow_native_calls())


def simd() -> str | None:
  """The SIMD code the loaded library has ("avx512", "avx2"), or None: the portable C++ loops
  (or no library)."""
  bits = _registered.hetflow_native_simd() if _registered is not None else 0
  return {512: "avx512", 256: "avx2"}.get(bits)


# What each format's handler takes: (q's rank, q's dtype, the params' dtypes).
_SIGNATURES = {
    "float32": (2, jnp.float32, ()),
    "bfloat16": (2, jnp.bfloat16, ()),
    "int8": (2, jnp.int8, (jnp.float32,)),
    "int8-g": (3, jnp.int8, (jnp.float16,)),
    "int4": (3, jnp.uint8, (jnp.float16,)),
    "int4-asym": (3, jnp.uint8, (jnp.float16, jnp.float16)),
}


def accepts(fmt: str, x, q, *params) -> bool:
  """Whether `matvec` takes these arrays: one row x, and leaves of the stored layout
  (no leading axes, e.g. a stack of experts' kernels)."""
  rank, q_dtype, dtypes = _SIGNATURES[fmt]
  return (x.ndim == 1 and q.ndim == rank and q.dtype == q_dtype
          and tuple(p.dtype for p in params) == dtypes)


def matvec(fmt: str, x, q, *params):
  """One row x [in] @ a stored kernel -> [out] float32, by the native kernel of `fmt`.

  Args:
    fmt: the kernel's format, as `hetflow.models.formats.format_of` names it.
    x: the row [in] (any float dtype; widened to float32).
    q: the kernel's values (its "q" leaf).
    *params: its "scale" (and "min") leaves, as stored.

  Returns:
    y [out] float32.

  Raises:
    NativeBuildError: the library could not be built (`enabled()` says so without raising).
  """
  if _registered is None and not _load(compiler()):
    raise NativeBuildError("hetflow's native kernels could not be built (see the warning).")
  n_out = q.shape[1] if q.ndim == 3 or fmt == "float32" else q.shape[0]  # float32: [in, out]
  call = jax.ffi.ffi_call(TARGETS[fmt], jax.ShapeDtypeStruct((n_out,), jnp.float32),
                          vmap_method="sequential")
  return call(x.astype(jnp.float32), q, *params)
