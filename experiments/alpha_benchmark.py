"""HeteGen's alpha benchmark: time of one split matrix-vector product vs alpha.

  python -m experiments.alpha_benchmark                       # 4 CPU devices here
  python -m experiments.alpha_benchmark --d_in=4096 --d_out=16384 --out=/tmp/alpha.json

On a CPU-only machine the "device" is CPU device 0 and the CPU side CPU device
3 (XLA is started with 4 host devices, set below before jax loads), so the
"link" is a memcpy between two CPU buffers; on a GPU machine the device is the
GPU. Prints, per alpha, the CPU side alone, the device side alone (copy +
multiply) and the split, then the measured crossing point next to the
formula's alpha from rates measured on the same matrix.
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

from absl import app, flags  # noqa: E402

_D_IN = flags.DEFINE_integer("d_in", 4096, "rows of the weight (input features)")
_D_OUT = flags.DEFINE_integer("d_out", 16384, "columns (output features), the split axis")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timings per point; the best is kept")
_OUT = flags.DEFINE_string("out", "", "write the result as JSON here")


def main(argv):
  del argv
  from hetflow.bench.alpha import alpha_sweep

  r = alpha_sweep(_D_IN.value, _D_OUT.value, repeats=_REPEATS.value)
  print(f"matrix {r['matrix']}, device {r['devices']['device']}, CPU side"
        f" {r['devices']['cpu_side']}")
  print(f"{'alpha':>6} {'cpu ms':>8} {'device ms':>10} {'split ms':>9}")
  for row in r["rows"]:
    print(f"{row['alpha']:6.2f} {row['cpu_s'] * 1e3:8.2f} {row['device_s'] * 1e3:10.2f}"
          f" {row['split_s'] * 1e3:9.2f}")
  rates = ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in r["rates"].items())
  print(f"rates on this matrix: {rates}")
  crossing = "none" if r["crossing_alpha"] is None else f"{r['crossing_alpha']:.3f}"
  print(f"measured crossing alpha {crossing}; fastest split at alpha {r['best_alpha']:.2f};"
        f" formula alpha {r['formula_alpha']:.3f}")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(r, f, indent=1)


if __name__ == "__main__":
  app.run(main)
