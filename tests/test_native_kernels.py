"""The native CPU matrix-vector kernels (hetflow/models/native) against the pure-XLA ones.

Both accumulate in float32 from exactly widened weights; they differ only in the order
of the additions. So each is held to the classic bound of float32 summation against the
exact (float64) product of the same dequantized kernel, |y - y_exact| <= n * eps * (|W| @ |x|)
with n the terms summed (`in`), and native and XLA to the same bound between them (twice
it). Measured differences are ~1e-7 of max |y| (in = 2048). Greedy tokens must be equal.
Without a compiler these tests run the fallback only (the ones that need the library
skip, saying why); the fallback and the build-failure path are tested everywhere.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hetflow
from hetflow.engine import Engine
from hetflow.hardware import cpuinfo_field
from hetflow.models import formats, kernels, native
from hetflow.models.formats import WeightFormat

pytestmark = pytest.mark.usefixtures("cache_dir")

SPECS = ("float32", "bfloat16", "int8", "int8-g32", "int8-g64", "int8-g128", "int4", "int4-g64",
         "int4-asym", "int4-g64-asym")
XLA = {"float32": kernels.float32_dot, "bfloat16": kernels.bfloat16_ew_t_xla, "int8": kernels.int8_channel_ew_t_xla,
       "int8-g": kernels.int8_group_scan_gm_xla, "int4": kernels.int4_scan_gm_xla,
       "int4-asym": kernels.int4_min_scan_gm_xla}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = float(np.finfo(np.float32).eps)


def _needs_native():
  if not native.enabled():
    pytest.skip("the native kernels are not built here (no compiler, or HETFLOW_NATIVE=0)")


def _kernel(spec, n_in, n_out, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)
  kernel = jax.device_put(w if spec == "float32" else WeightFormat.parse(spec).quantize(w))
  x = jnp.asarray(rng.standard_normal(n_in, dtype=np.float32))
  return kernel, x


def _leaves(kernel):
  if not isinstance(kernel, dict):  # float32: the array [in, out] itself
    return [kernel]
  return [kernel["q"]] + [kernel[n] for n in ("scale", "min") if n in kernel]


def _bound(kernel, x):
  """n * eps * (|W| @ |x|) per output, and the exact product, from the dequantized kernel."""
  dense = np.asarray(formats.dequantize(kernel), np.float64)
  xd = np.asarray(x, np.float64)
  return x.shape[0] * EPS * (np.abs(dense).T @ np.abs(xd)), xd @ dense


@pytest.mark.parametrize("spec", SPECS)
# Shapes: several full row tiles and the tail of a short one (37, 5 rows); in not a multiple
# of the SIMD width for the row-major formats (200).
@pytest.mark.parametrize("n_in,n_out", [(256, 96), (128, 37), (2048, 5)])
def test_native_matches_xla_and_the_exact_product(spec, n_in, n_out):
  _needs_native()
  kernel, x = _kernel(spec, n_in, n_out)
  fmt = formats.format_of(kernel)
  y_native = np.asarray(jax.jit(lambda x, *a: native.matvec(fmt, x, *a))(x, *_leaves(kernel)))
  y_xla = np.asarray(jax.jit(XLA[fmt])(x, *_leaves(kernel)))
  bound, exact = _bound(kernel, x)
  assert y_native.dtype == np.float32 and y_native.shape == (n_out,)
  assert np.all(np.abs(y_native - exact) <= bound)
  assert np.all(np.abs(y_xla - exact) <= bound)
  assert np.all(np.abs(y_native - y_xla) <= 2 * bound)
  assert np.max(np.abs(y_native - y_xla)) <= 1e-5 * np.max(np.abs(exact))


@pytest.mark.parametrize("n_in,n_out", [(2048, 96), (203, 37)])
def test_float32_column_blocks_give_the_same_values(n_in, n_out):
  """A block of W's columns (tensor_split's shares, `formats.take_outputs`) is summed in the
  same order as the whole, output for output: the chunks of `in` do not depend on `out`."""
  _needs_native()
  kernel, x = _kernel("float32", n_in, n_out)
  whole = np.asarray(native.matvec("float32", x, kernel))
  for lo, hi in ((0, 16), (5, n_out - 3), (n_out - 1, n_out)):
    part = np.asarray(native.matvec("float32", x, formats.take_outputs(kernel, lo, hi)))
    np.testing.assert_array_equal(part, whole[lo:hi])


@pytest.mark.parametrize("spec", ["bfloat16", "int8"])
def test_row_major_tail_of_in(spec):
  _needs_native()
  kernel, x = _kernel(spec, 200, 9)  # 200 = 6 * 32 + 8: the scalar tail of each row
  fmt = formats.format_of(kernel)
  y = np.asarray(native.matvec(fmt, x, *_leaves(kernel)))
  bound, exact = _bound(kernel, x)
  assert np.all(np.abs(y - exact) <= bound)


def _compiled(x, kernel) -> str:
  """The compiled HLO of formats.matmul (a new function: jit caches traces by function, and
  the choice of kernel is made when tracing)."""
  return jax.jit(lambda x, k: formats.matmul(x, k)).lower(x, kernel).compile().as_text()


@pytest.mark.parametrize("spec", ["float32", "bfloat16", "int8", "int8-g32", "int4", "int4-asym"])
def test_decode_uses_the_native_kernel_and_prefill_xla(spec, monkeypatch):
  _needs_native()
  kernel, _ = _kernel(spec, 128, 64)
  x1, x8 = jnp.ones((1, 128)), jnp.ones((8, 128))
  assert "hetflow_matvec" in _compiled(x1, kernel)
  assert "hetflow_matvec" not in _compiled(x8, kernel)
  monkeypatch.setenv("HETFLOW_NATIVE", "0")
  assert not native.enabled()
  assert "hetflow_matvec" not in _compiled(x1, kernel)


@pytest.mark.parametrize("spec", ["int8-g32", "int4-asym"])
def test_forced_fallback_computes_the_same(spec, monkeypatch):
  kernel, x = _kernel(spec, 256, 48)
  with_native = np.asarray(jax.jit(lambda x, k: formats.matmul(x[None], k))(x, kernel))
  monkeypatch.setenv("HETFLOW_NATIVE", "off")
  fallback = np.asarray(jax.jit(lambda x, k: formats.matmul(x[None], k))(x, kernel))
  bound, exact = _bound(kernel, x)
  assert np.all(np.abs(fallback[0] - exact) <= bound)
  assert np.all(np.abs(with_native[0] - fallback[0]) <= 2 * bound)


def _tokens(spec, prompt=((5, 6, 7, 8, 9, 10),), new=8):
  model = hetflow.synthetic_model("llama-tiny", weights=spec)  # its own jitted functions
  with Engine(model, "resident") as engine:
    out = engine.generate([list(prompt[0])], max_new_tokens=new, stop_tokens=())
    return np.asarray(out.tokens), np.asarray(engine.forward([list(prompt[0][:1])]))


@pytest.mark.parametrize("spec", ["float32", "bfloat16", "int8", "int8-g32", "int4", "int4-asym"])
def test_resident_greedy_tokens_native_equal_fallback(spec, monkeypatch):
  _needs_native()
  before = native.calls()
  tokens, logits = _tokens(spec)  # decode (one row) runs the native kernels
  assert native.calls() > before
  monkeypatch.setenv("HETFLOW_NATIVE", "0")
  before = native.calls()
  tokens_xla, logits_xla = _tokens(spec)
  assert native.calls() == before  # the fallback ran no native kernel
  np.testing.assert_array_equal(tokens, tokens_xla)
  # One position: every kernel through the one-row path, native against XLA.
  np.testing.assert_allclose(logits, logits_xla, atol=1e-5, rtol=0)


def _python(code: str, **env) -> subprocess.CompletedProcess:
  full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, cwd=ROOT, env=full, timeout=600)


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
  bogus = tmp_path / "cxx"
  bogus.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo bogus 1.0 && exit 0\n"
                   "echo 'bogus: cannot compile' >&2\nexit 1\n")
  bogus.chmod(0o755)
  done = _python("""
      import numpy as np, jax, jax.numpy as jnp
      from hetflow.models import formats, native
      assert not native.enabled() and not native.enabled()  # one attempt, one warning
      w = np.random.default_rng(0).standard_normal((64, 16), dtype=np.float32)
      k = jax.device_put(formats.WeightFormat.parse("int4").quantize(w))
      y = formats.matmul(jnp.ones((1, 64)), k)
      np.testing.assert_allclose(y[0], np.asarray(formats.dequantize(k)).sum(0), rtol=1e-5,
                                 atol=1e-5)
      print("fell back")
      """, HETFLOW_CXX=str(bogus), HETFLOW_CACHE=str(tmp_path / "cache"))
  assert done.returncode == 0, done.stderr
  assert "fell back" in done.stdout
  assert done.stderr.count("native CPU kernels are not available") == 1
  assert "bogus: cannot compile" in done.stderr
  # Nothing half-written: no library, no temporary file.
  left = [f for _, _, files in os.walk(tmp_path / "cache") for f in files]
  assert not [f for f in left if f.endswith(".so")], left


def test_build_errors_name_the_compiler(tmp_path):
  with pytest.raises(native.NativeBuildError, match="does not run.*HETFLOW_CXX"):
    native.build(str(tmp_path / "no-such-compiler"), str(tmp_path))


def test_build_is_cached_by_key(tmp_path):
  """A second build of the same key compiles nothing; another key (flags, compiler) does."""
  calls = tmp_path / "calls"
  fake = tmp_path / "cxx"  # a "compiler" that writes its -o file and counts its runs
  fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake 1.0 && exit 0\n"
                  f"echo run >> {calls}\n"
                  "while [ $# -gt 1 ]; do [ \"$1\" = -o ] && echo lib > \"$2\"; shift; done\n")
  fake.chmod(0o755)
  path = native.build(str(fake), str(tmp_path / "lib"))
  assert open(path).read() == "lib\n" and native.build_key(str(fake)) in path
  assert native.build(str(fake), str(tmp_path / "lib")) == path
  assert calls.read_text().count("run") == 1
  other = native.build(str(fake), str(tmp_path / "lib"), native.FLAGS + ("-DX",))
  assert other != path and calls.read_text().count("run") == 2
  assert sorted(os.listdir(os.path.dirname(path))) == ["build.lock", native.LIBRARY]


def _cpu_has(*features) -> bool:
  flags = (cpuinfo_field("flags") or "").split()
  return all(f in flags for f in features)


# The code each build holds: HETFLOW_NO_SIMD gives the portable loops (what a machine without
# AVX2 or AVX-512 builds); -mno-avx512f gives the AVX2 kernels where the CPU has AVX-512 too.
@pytest.mark.parametrize("flag,code", [("-DHETFLOW_NO_SIMD", None), ("-mno-avx512f", "avx2")])
def test_each_build_of_the_kernels(tmp_path, flag, code):
  """Every build (portable, AVX2) stays within the float32 bound of the exact product, on
  full and short row tiles and, row-major, an `in` that is no multiple of the lanes; and so
  do its record kernels (neuron.cc)."""
  cxx = native.compiler()
  if cxx is None:
    pytest.skip("no C++ compiler")
  if code == "avx2" and not _cpu_has("avx2", "fma", "f16c"):
    pytest.skip("the CPU has no AVX2, FMA and F16C")
  done = _python(f"""
      import numpy as np, jax
      from hetflow.models import formats, native
      native._register(native.build({cxx!r}, {str(tmp_path)!r}, native.FLAGS + ({flag!r},)))
      assert native.simd() == {code!r}, native.simd()
      rng = np.random.default_rng(0)
      for spec in {SPECS!r}:
        for n_in, n_out in ((256, 40), (200, 37)):
          if n_in % 64 and spec not in ("float32", "bfloat16", "int8"):
            continue  # grouped formats need whole groups
          w = rng.standard_normal((n_in, n_out), dtype=np.float32) / 16
          k = w if spec == "float32" else formats.WeightFormat.parse(spec).quantize(w)
          k = jax.device_put(k)
          x = rng.standard_normal(n_in, dtype=np.float32)
          leaves = [k] if spec == "float32" else [k["q"]] + [k[n] for n in ("scale", "min") if n in k]
          y = np.asarray(native.matvec(formats.format_of(k), x, *leaves))
          dense = np.asarray(formats.dequantize(k), np.float64)
          bound = n_in * {EPS!r} * (np.abs(dense).T @ np.abs(x.astype(np.float64)))
          assert np.all(np.abs(y - x.astype(np.float64) @ dense) <= bound), (spec, n_in)
      # neuron_cluster's record kernels (neuron.cc) of the same build, against the exact
      # products of the records' decoded weights: 40 records of several down groups.
      import hetflow
      from hetflow.sparsity import bundles
      for spec in ("bfloat16", "int8", "int8-g32", "int4", "int4-asym"):
        model = hetflow.synthetic_model("llama-tiny-sparse", seed=0, weights=spec)
        c = model.config
        codec = bundles.record_codec(model)
        a, b, table = codec.encode(model, 1, bundles.neuron_matrices(c))
        pick = np.sort(rng.choice(c.intermediate_size, 40, replace=False))
        group = codec.group if codec.grouped_down else c.intermediate_size
        group_of = (pick // group).astype(np.int32)
        table = {{k: v.astype(np.float32) for k, v in table.items()}}
        a, b = a[pick], b[pick]
        x = rng.standard_normal((1, c.hidden_size)).astype(np.float32)
        z = rng.standard_normal((1, 40)).astype(np.float32) * (rng.random((1, 40)) < 0.7)
        w_in = np.asarray(codec.input_weights(a), np.float64).reshape(40 * codec.inputs, -1)
        w_down = np.asarray(codec.down_weights(b, table, group_of), np.float64)
        y_in = np.asarray(bundles._input_products_native(codec, x, a), np.float64)[0]
        y_down = np.asarray(bundles._down_product_native(codec, z, b, table, group_of))[0]
        x64, z64 = x[0].astype(np.float64), z[0].astype(np.float64)
        # + 2: a scale's product before the sum (grouped) or after it (int8), fused or not
        bound_in = (c.hidden_size + 2) * {EPS!r} * (np.abs(w_in) @ np.abs(x64))
        # (int8's down rows are unscaled: `down_after` applies the scale (> 0) after the sum)
        bound_down = (40 + 2) * {EPS!r} * codec.down_after(np.abs(z64) @ np.abs(w_down), table)
        exact_down = codec.down_after(z64 @ w_down, table)
        assert np.all(np.abs(y_in - w_in @ x64) <= bound_in), ("in", spec)
        assert np.all(np.abs(y_down - exact_down) <= bound_down), ("down", spec)
      print("build ok")
      """)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "build ok" in done.stdout
