"""The native CPU matrix-vector kernels (hetflow/models/native) against the pure-XLA ones.

Both accumulate in float32 from exactly widened weights (int4: exact integer sums of its
weights times its int8 activations, the same in both); they differ only in the order
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
  if not isinstance(kernel, dict):
    return [kernel]  # float32: the kernel [in, out] itself
  return [kernel["q"]] + [kernel[n] for n in ("scale", "min") if n in kernel]


def _operand(kernel, x):
  """What the kernel multiplies: x, or for int4 its int8 activations q * d (dequantized)."""
  if formats.format_of(kernel) in ("int4", "int4-asym"):
    return kernels.int4_activations_dequantized(x, 2 * kernel["q"].shape[-1])
  return x


def _bound(kernel, x):
  """n * eps * (|W| @ |x|) per output, and the exact product, from the dequantized kernel (and
  int4's dequantized int8 activations: their integer sums are exact, so only the float32
  additions differ, as for the other formats)."""
  dense = np.asarray(formats.dequantize(kernel), np.float64)
  xd = np.asarray(_operand(kernel, x), np.float64)
  return x.shape[0] * EPS * (np.abs(dense).T @ np.abs(xd)), xd @ dense


@pytest.mark.parametrize("spec", SPECS)
# Shapes: several full row tiles and the tail of a short one (37, 5 rows); float32: one block
# of rows (256, 128) and several (2048), one panel of columns and a masked tail (37, 5).
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


INT4_FLOAT_XLA = {"int4": kernels.int4_float_scan_gm_xla,
                  "int4-asym": kernels.int4_min_float_scan_gm_xla}


@pytest.mark.parametrize("spec", ["int4", "int4-g64", "int4-asym", "int4-g64-asym"])
@pytest.mark.parametrize("n_in,n_out", [(256, 96), (128, 37), (2048, 5)])
def test_int4_float_input_matches_xla_and_the_exact_product(spec, n_in, n_out):
  """int4's float-input kernels (down's input, formats.FLOAT_INPUT_LEAVES) multiply x itself:
  native and XLA within float32 summation of the exact product with float x."""
  _needs_native()
  kernel, x = _kernel(spec, n_in, n_out)
  fmt = formats.format_of(kernel)
  y_native = np.asarray(jax.jit(lambda x, *a: native.matvec(fmt, x, *a, float_input=True))(
      x, *_leaves(kernel)))
  y_xla = np.asarray(jax.jit(INT4_FLOAT_XLA[fmt])(x, *_leaves(kernel)))
  dense = np.asarray(formats.dequantize(kernel), np.float64)
  xd = np.asarray(x, np.float64)
  bound, exact = n_in * EPS * (np.abs(dense).T @ np.abs(xd)), xd @ dense
  assert np.all(np.abs(y_native - exact) <= bound)
  assert np.all(np.abs(y_xla - exact) <= bound)
  # Not int4's int8 activations: those are further from x's product than float32 sums.
  y_int8 = np.asarray(native.matvec(fmt, x, *_leaves(kernel)))
  assert np.max(np.abs(y_int8 - exact)) > 10 * np.max(np.abs(y_native - exact))


@pytest.mark.parametrize("spec", ["int4", "int4-g64-asym"])
def test_matmul_float_input_in_decode_and_prefill(spec, monkeypatch):
  """formats.matmul(..., float_input=True): one row (native, and the forced fallback) and 8
  rows (prefill) all multiply x itself; float_input does not change other formats."""
  kernel, x = _kernel(spec, 256, 48)
  dense = np.asarray(formats.dequantize(kernel), np.float64)
  xd = np.asarray(x, np.float64)
  bound, exact = 256 * EPS * (np.abs(dense).T @ np.abs(xd)), xd @ dense
  got = [np.asarray(formats.matmul(x[None], kernel, float_input=True))[0],
         *np.asarray(formats.matmul(jnp.stack([x] * 8), kernel, float_input=True))]
  monkeypatch.setenv("HETFLOW_NATIVE", "0")
  got.append(np.asarray(formats.matmul(x[None], kernel, float_input=True))[0])
  for y in got:
    assert np.all(np.abs(y - exact) <= bound)
  k8, x8 = _kernel("int8-g32", 256, 48)
  np.testing.assert_array_equal(np.asarray(formats.matmul(x8[None], k8, float_input=True)),
                                np.asarray(formats.matmul(x8[None], k8)))


def test_float32_blocks_panels_and_tails():
  """float32 [in, out]: rows not a multiple of 4 (a row at a time at the end of a block),
  several 256-row blocks and 1024-column panels, and a column tail under a mask."""
  _needs_native()
  kernel, x = _kernel("float32", 1030, 2100)
  y = np.asarray(native.matvec("float32", x, kernel))
  bound, exact = _bound(kernel, x)
  assert np.all(np.abs(y - exact) <= bound)
  np.testing.assert_array_equal(y, np.asarray(jax.jit(
      lambda x, w: native.matvec("float32", x, w))(x, kernel)))  # deterministic


@pytest.mark.parametrize("spec", ["float32", "int4", "int4-asym", "int4-g64", "int4-g64-asym"])
def test_a_slice_of_outputs_gives_the_same_values_bit_for_bit(spec):
  """An output's value does not depend on `out` nor on its place in a tile: tensor_split's
  share (formats.take_outputs) computes exactly what the whole kernel computes for it."""
  _needs_native()
  kernel, x = _kernel(spec, 1024, 1100)
  fmt = formats.format_of(kernel)
  whole = np.asarray(native.matvec(fmt, x, *_leaves(kernel)))
  for lo, hi in ((0, 1), (3, 40), (517, 1100)):
    part = jax.device_put(formats.take_outputs(kernel, lo, hi))
    np.testing.assert_array_equal(np.asarray(native.matvec(fmt, x, *_leaves(part))),
                                  whole[lo:hi])


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


def test_int4_activations_follow_q8_0s_rule_per_group():
  """int8 per group of g: d = max |x| * float32(1/127), q = round-half-even(x / d); a group of
  zeros has d = 0 and q = 0."""
  x = np.random.default_rng(3).standard_normal(96).astype(np.float32)
  x[32:64] = 0
  x[70] = 2.5 * np.abs(x[64:]).max()  # the max of the third group (its q is 127)
  q, d = (np.asarray(a) for a in kernels.int4_activations(jnp.asarray(x), 32))
  assert q.shape == (3, 32) and q.dtype == np.int8 and d.dtype == np.float32
  amax = np.abs(x.reshape(3, 32)).max(-1)
  np.testing.assert_array_equal(d, amax * (np.float32(1) / np.float32(127)))
  inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
  np.testing.assert_array_equal(q, np.rint(x.reshape(3, 32) * inv[:, None]).astype(np.int8))
  assert q[2, 6] == 127 and not q[1].any() and d[1] == 0
  assert np.all(np.abs(q * d[:, None] - x.reshape(3, 32)) <= 0.5 * (1 + 1e-5) * d[:, None])


@pytest.mark.parametrize("spec", ["int4", "int4-g64-asym"])
def test_int4_prefill_multiplies_the_same_activations_as_decode(spec):
  """Prefill (dequantize + XLA's dot) takes int4's int8 activations too: one row through the
  matrix-vector kernel and the same row among 8 give the same values up to float32 sums."""
  kernel, x = _kernel(spec, 256, 48)
  one = np.asarray(formats.matmul(x[None], kernel))[0]
  eight = np.asarray(formats.matmul(jnp.stack([x] * 8), kernel))
  bound, exact = _bound(kernel, x)
  for y in (one, *eight):
    assert np.all(np.abs(y - exact) <= bound)


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


def test_the_portable_kernels(tmp_path):
  """The C++ loops a compiler without AVX-512 builds (HETFLOW_NO_SIMD here) give the same."""
  cxx = native.compiler()
  if cxx is None:
    pytest.skip("no C++ compiler")
  done = _python(f"""
      import numpy as np, jax
      from hetflow.models import formats, kernels, native
      native._register(native.build({cxx!r}, {str(tmp_path)!r},
                                    native.FLAGS + ("-DHETFLOW_NO_SIMD",)))
      assert not native.simd()
      rng = np.random.default_rng(0)
      for spec in {SPECS!r}:
        w = rng.standard_normal((256, 40), dtype=np.float32) / 16
        if spec == "float32":
          fmt, leaves, dense = "float32", [w], w.astype(np.float64)
        else:
          k = jax.device_put(formats.WeightFormat.parse(spec).quantize(w))
          fmt, leaves = formats.format_of(k), [k["q"]] + [k[n] for n in ("scale", "min") if n in k]
          dense = np.asarray(formats.dequantize(k), np.float64)
        x = rng.standard_normal(256, dtype=np.float32)
        y = np.asarray(native.matvec(fmt, x, *leaves))
        if fmt in ("int4", "int4-asym"):  # float input (down's), then its int8 activations
          y_float = np.asarray(native.matvec(fmt, x, *leaves, float_input=True))
          bound = 256 * {EPS!r} * (np.abs(dense).T @ np.abs(x.astype(np.float64)))
          assert np.all(np.abs(y_float - x.astype(np.float64) @ dense) <= bound), spec
          x = np.asarray(kernels.int4_activations_dequantized(x, 2 * leaves[0].shape[-1]))
        bound = 256 * {EPS!r} * (np.abs(dense).T @ np.abs(x.astype(np.float64)))
        assert np.all(np.abs(y - x.astype(np.float64) @ dense) <= bound), spec
      print("portable ok")
      """)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "portable ok" in done.stdout


def test_the_kernel_table_checks_every_native_row():
  """hetflow/bench/kernels.py times a native row for every format, against float32 of its own
  weights (int4: and its int8 activations), so a wrong kernel cannot look fast."""
  _needs_native()
  from hetflow.bench import kernels as table
  rows = table.measure(128, 48, repeats=1, qwix=False)
  natives = {t.format: t.max_rel_error for t in rows if t.name == table.NATIVE}
  assert set(natives) == {"float32", "bfloat16", "int8", "int8-g32", "int8-g64", "int8-g128",
                          "int4", "int4-g64", "int4-asym", "int4-g64-asym"}
  assert max(natives.values()) < 1e-5, natives
  floats = {t.format: t.max_rel_error for t in rows if t.name == table.NATIVE_FLOAT}
  assert set(floats) == {"int4", "int4-g64", "int4-asym", "int4-g64-asym"}
  assert max(floats.values()) < 1e-5, floats
