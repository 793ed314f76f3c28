"""Times every weight format's matrix-vector formulations on XLA CPU (hetflow/bench/kernels.py).

  python -m experiments.kernels                      # [4096 x 11008] and [2048 x 5632]
  python -m experiments.kernels --shapes=4096x11008 --formats=int8,int4 --repeats=50

Run it under the bench lock on a shared machine (`flock /tmp/hetflow-bench.lock ...`).
"""

from absl import app, flags

from hetflow.bench import kernels

_SHAPES = flags.DEFINE_list("shapes", ["4096x11008", "2048x5632"], "kernels as INxOUT")
_FORMATS = flags.DEFINE_list("formats", None, "format labels to keep (default: all)")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed calls per case (best is kept)")
_BATCH = flags.DEFINE_integer("batch", 1, "rows of x")
_QWIX = flags.DEFINE_bool("qwix", True, "include qwix's QArray formulations")


def main(argv):
  del argv
  print("| shape | format | formulation | GB/s of weights | Gweights/s | us | max rel err |")
  print("|---|---|---|---|---|---|---|")
  for shape in _SHAPES.value:
    n_in, n_out = (int(v) for v in shape.lower().split("x"))
    kernels.measure(
        n_in, n_out, formats=_FORMATS.value, repeats=_REPEATS.value, batch=_BATCH.value,
        qwix=_QWIX.value,
        progress=lambda t: print(
            f"| {t.shape[0]}x{t.shape[1]} | {t.format} | {t.name} | {t.gbps:.1f} |"
            f" {t.gweights:.2f} | {t.seconds * 1e6:.0f} | {t.max_rel_error:.1e} |", flush=True))


if __name__ == "__main__":
  app.run(main)
