"""The mesh benchmark: layer-wise from disk, N processes (one shard each) against 1.

  python -m experiments.mesh_benchmark --shards=1 --out=/tmp/meshbench          # 1 process
  python -m hetflow.launch --processes=2 --cpus=0,1 -- \
      python -m experiments.mesh_benchmark --shards=2 --out=/tmp/meshbench      # 2 processes

Each process writes <out>/shards<N>-p<id>.json (hetflow/bench/mesh.py): decode
tokens/s, bytes read per pass (/proc/self/io and the store's counters), a traced
timeline and, on a mesh, the all-reduce latency. Expect (llama-1b on this
machine, WORKSPACE_NOTES.md): the bytes per pass of each of 2 processes are half
of one process's, and tokens/s about the same (the two share one disk).
"""

import sys

from absl import app, flags

from hetflow import distributed

_MODEL = flags.DEFINE_string("model", "llama-1b", "synthetic model shape")
_SHARDS = flags.DEFINE_integer("shards", 1, "mesh model axis (processes x local devices)")
_STORE = flags.DEFINE_string("store_dir", None, "layerwise store (shard-<r>-of-<N> inside)")
_NEW = flags.DEFINE_integer("new_tokens", 8, "tokens of the measured run")
_TRACE = flags.DEFINE_integer("trace_tokens", 3, "tokens of the traced run (0: none)")
_BUDGET = flags.DEFINE_string("device_budget", None, "device budget per device, e.g. 1GiB")
_RESIDENT = flags.DEFINE_integer("resident_layers", 0, "layers kept on the device (all: compute"
                                 " and all-reduces only)")
_OUT = flags.DEFINE_string("out", "/tmp/hetflow-meshbench", "folder of the JSON records")


def main(argv):
  del argv
  try:
    distributed.initialize()  # from $HETFLOW_* (python -m hetflow.launch); before jax starts
  except distributed.DistributedError as e:
    sys.exit(f"error: {e}")
  from hetflow.bench import mesh

  record = mesh.run(mesh.MeshBenchmark(model=_MODEL.value, shards=_SHARDS.value,
                                       store_dir=_STORE.value, new_tokens=_NEW.value,
                                       trace_tokens=_TRACE.value,
                                       device_budget=_BUDGET.value,
                                       resident_layers=_RESIDENT.value))
  path = mesh.write(record, _OUT.value)
  summary = {k: record.get(k) for k in ("process", "shards", "cpus", "decode_tokens_per_s",
                                        "proc_read_bytes_per_pass", "store_bytes_per_pass",
                                        "allreduce", "peak_rss")}
  print(f"{path}: {summary}")
  print(f"per layer (traced decode passes): {mesh.layer_summary(record)}")


if __name__ == "__main__":
  app.run(main)
