"""HeteGen's alpha benchmark: time of one split matrix-vector product against alpha.

What `python -m experiments.alpha_benchmark` runs. The split is timed with
tensor_split's own kernels (`_matmul_jit`, `_join`, `_split_point`), so the
sweep measures what the strategy runs; the formula's alpha
(`costmodel.hetegen_alpha`) uses rates measured here on the same matrix.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hetflow import costmodel
from hetflow.bench.probes import best_time
from hetflow.memory import tiers
from strategies.tensor_split import _join, _matmul_jit, _split_point


def alpha_sweep(d_in: int = 4096, d_out: int = 16384, alphas=None, repeats: int = 5,
                dtype=jnp.float32) -> dict[str, Any]:
  """Measures one split matrix-vector product against alpha (HeteGen's "alpha benchmark").

  For each alpha the device side copies its columns host -> device and
  multiplies them, while the CPU side multiplies the rest; both are timed
  alone (to find where their curves cross) and together (the split as
  tensor_split runs it). The formula's alpha uses rates measured here on the
  same matrix: CPU multiply, link copy, device multiply.

  Returns:
    {"rows": [{alpha, cpu_s, device_s, split_s}], "crossing_alpha", "formula_alpha",
     "rates": {...}, "devices": ...}.
  """
  alphas = list(np.linspace(0, 1, 11)) if alphas is None else list(alphas)
  accel = jax.devices()[0]
  cpus = jax.devices("cpu")
  host = cpus[-1] if accel.platform == "cpu" else cpus[0]
  dev = tiers.device_sharding(accel)
  rng = np.random.default_rng(0)
  w = rng.standard_normal((d_in, d_out), dtype=np.float32).astype(dtype)
  x = jax.device_put(rng.standard_normal((1, d_in), dtype=np.float32).astype(dtype), dev)

  def best(fn):
    fn()  # compile and warm up
    return best_time(fn, repeats)

  rows = []
  for a in alphas:
    cut = _split_point(a, d_out)
    dev_block = jax.device_put(w[:, :cut], host) if cut else None
    cpu_block = jax.device_put(w[:, cut:], host) if cut < d_out else None

    def cpu_side(cpu_block=cpu_block):
      if cpu_block is None:
        return None
      y = _matmul_jit(jax.device_put(x, host), (cpu_block,))
      return jax.device_put(y, dev)

    def device_side(dev_block=dev_block):
      if dev_block is None:
        return None
      return _matmul_jit(x, (jax.device_put(dev_block, dev),))

    def split():
      parts = [p for p in (device_side(), cpu_side()) if p is not None]
      return _join(tuple(parts), None).block_until_ready()

    rows.append(dict(
        alpha=float(a),
        cpu_s=best(lambda: jax.block_until_ready(cpu_side())),
        device_s=best(lambda: jax.block_until_ready(device_side())),
        split_s=best(split)))
  # Where the two sides' times cross (linear interpolation between samples).
  crossing = None
  for r0, r1 in zip(rows, rows[1:]):
    d0, d1 = r0["cpu_s"] - r0["device_s"], r1["cpu_s"] - r1["device_s"]
    if d0 >= 0 >= d1 and d0 != d1:
      crossing = r0["alpha"] + (r1["alpha"] - r0["alpha"]) * d0 / (d0 - d1)
      break
  nbytes = w.nbytes
  full_cpu = next(r["cpu_s"] for r in rows if r["alpha"] == 0.0)
  w_dev = jax.device_put(w, dev)
  w_host = jax.device_put(w, host)
  t_dev = best(lambda: _matmul_jit(x, (w_dev,)).block_until_ready())
  t_link = best(lambda: jax.device_put(w_host, dev).block_until_ready())
  rates = {"cpu": nbytes / full_cpu, "link": nbytes / t_link, "device": nbytes / t_dev}
  return {
      "rows": rows,
      "crossing_alpha": crossing,
      "formula_alpha": costmodel.hetegen_alpha(rates["cpu"], rates["link"], rates["device"]),
      "best_alpha": min(rows, key=lambda r: r["split_s"])["alpha"],
      "rates": rates,
      "matrix": [d_in, d_out, jnp.dtype(dtype).name],
      "devices": {"device": str(accel), "cpu_side": str(host)},
  }
