"""The mesh benchmark (issue 15; WORKSPACE_NOTES.md): layer-wise from disk on N processes.

Each process of a run (`python -m hetflow.launch --processes=N -- python -m
experiments.mesh_benchmark ...`, or one process with `--shards=1`) measures
itself and writes one JSON record:

- a warm-up generate (compiles every shape), then a measured one: decode
  tokens/s, and the bytes this process read from storage (/proc/self/io) and
  from its store (the strategy's counters) per forward pass;
- a traced generate (the engine blocks after every half-block): per-layer
  compute, read and wait intervals on the shared monotonic clock, so the
  records of all processes form one timeline;
- on a mesh, the latency of one all-reduce of the residual stream [1, 1, D]
  (what each half-block adds), timed alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from hetflow.bench.process import peak_rss, proc_read_bytes, prompt_ids
from hetflow.checkpoints import synthetic_model
from hetflow.engine import Engine
from hetflow.memory.budget import Budget
from hetflow.models import sharding
from hetflow.trace import Timeline


@dataclasses.dataclass(frozen=True)
class MeshBenchmark:
  """One process's part of a run.

  Attributes:
    model: synthetic shape (hetflow.checkpoints.SHAPES).
    shards: the mesh's model axis (1: no mesh).
    store_dir: layerwise's store (its shard-<r>-of-<N> folders on a mesh); None: the cache's.
    prompt_len: prompt tokens.
    new_tokens: tokens of the measured generate.
    trace_tokens: tokens of the traced generate (0: none).
    device_budget: the budget per device ("" or None: unlimited).
    resident_layers: layers kept on the device (the rest streamed); all of them
      measures compute and all-reduces alone, the split's own cost.
    allreduce_repeats: all-reduces timed (mesh only).
  """

  model: str = "llama-1b"
  shards: int = 1
  store_dir: str | None = None
  prompt_len: int = 16
  new_tokens: int = 8
  trace_tokens: int = 3
  device_budget: str | None = None
  resident_layers: int = 0
  allreduce_repeats: int = 200


def allreduce_latency(mesh, width: int, repeats: int) -> dict[str, float]:
  """Seconds per all-reduce of a [1, 1, width] float32 array over `mesh` (median, p90)."""
  from jax.sharding import PartitionSpec as P

  psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, sharding.MODEL_AXIS), mesh=mesh,
                               in_specs=P(), out_specs=P(), check_vma=False))
  x = jax.make_array_from_callback((1, 1, width), jax.sharding.NamedSharding(mesh, P()),
                                   lambda index: np.ones((1, 1, width), np.float32)[index])
  psum(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    psum(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  return {"median_s": float(np.median(times)), "p90_s": float(np.percentile(times, 90))}


def run(bench: MeshBenchmark) -> dict[str, Any]:
  """Measures this process's part (see the module docstring); returns its record."""
  model = synthetic_model(bench.model)
  options = dict(offload_tier="disk", resident_layers=bench.resident_layers, prefetch_depth=1,
                 store_dir=bench.store_dir)
  budget = Budget(device=bench.device_budget or None)
  t0 = time.perf_counter()
  engine = Engine(model, "layerwise", budget=budget, options=options,
                  mesh=bench.shards if bench.shards > 1 else None)
  start_s = time.perf_counter() - t0
  prompt = prompt_ids(model.config.vocab_size, bench.prompt_len)
  record: dict[str, Any] = {"process": jax.process_index(), "processes": jax.process_count(),
                            "shards": bench.shards, "cpus": sorted(os.sched_getaffinity(0)),
                            "resident_layers": bench.resident_layers,
                            "start_s": start_s}
  with engine:
    engine.generate(prompt, max_new_tokens=2, stop_tokens=())  # warm-up: compiles
    before = engine.strategy.stats().copy()
    io0 = proc_read_bytes()
    out = engine.generate(prompt, max_new_tokens=bench.new_tokens, stop_tokens=())
    io1 = proc_read_bytes()
    after = out.stats["strategy"]
    passes = ((after.prefill.passes + after.decode.passes)
              - (before.prefill.passes + before.decode.passes))
    disk = ((after.prefill.disk_bytes + after.decode.disk_bytes)
            - (before.prefill.disk_bytes + before.decode.disk_bytes))
    record.update(
        tokens=out.tokens.tolist(), decode_tokens_per_s=out.stats["decode_tokens_per_s"],
        prefill_s=out.stats["prefill_s"], passes=passes,
        proc_read_bytes_per_pass=(io1 - io0) / passes if io0 >= 0 else None,
        store_bytes_per_pass=disk / passes,
        decode_wait_s_per_token=(after.decode.wait_s - before.decode.wait_s)
        / max(after.decode.passes - before.decode.passes, 1),
        ledger_peak={t: v["peak"] for t, v in out.stats["ledger"]["tiers"].items()})
    if bench.trace_tokens:
      engine.trace = True
      engine.timeline = engine.strategy.timeline = Timeline()  # unbounded
      engine.generate(prompt, max_new_tokens=bench.trace_tokens, stop_tokens=())
      record["timeline"] = [dataclasses.asdict(e) for e in engine.timeline.events]
    if engine.shards.mesh is not None:
      record["allreduce"] = allreduce_latency(engine.shards.mesh, model.config.hidden_size,
                                              bench.allreduce_repeats)
  record["peak_rss"] = peak_rss()
  return record


def layer_summary(record: dict[str, Any]) -> dict[str, Any]:
  """Per-layer means over the traced decode passes of one record.

  The first traced decode pass is left out (it compiles the new KV length). A
  layer's time is the engine's interval (fetch to the FFN's output, blocking);
  `wait_ms` is the part spent waiting in `fetch` for the layer's read, and
  `compute_ms` the rest: both halves' compute, their all-reduces and, on a mesh,
  waiting for the slowest process at each all-reduce.
  """
  events = record.get("timeline", ())
  passes, current = [], []
  for e in (e for e in events if e["kind"] == "compute"):
    if current and e["layer"] <= current[-1]["layer"]:
      passes.append(current)
      current = []
    current.append(e)
  if current:
    passes.append(current)
  passes = passes[2:]  # the prefill and the compiling decode pass
  waits = [e for e in events if e["kind"] == "wait"]
  reads = [e for e in events if e["kind"] == "read"]
  layer, wait = [], []
  for e in (e for p in passes for e in p):
    layer.append(e["end"] - e["start"])
    wait.append(sum(max(0.0, min(e["end"], w["end"]) - max(e["start"], w["start"]))
                    for w in waits))
  if not layer:
    return {"passes": 0}
  read_s = sum(e["end"] - e["start"] for e in reads)
  return {"passes": len(passes),
          "pass_s": [p[-1]["end"] - p[0]["start"] for p in passes],
          "layer_ms": 1e3 * float(np.mean(layer)), "wait_ms": 1e3 * float(np.mean(wait)),
          "compute_ms": 1e3 * float(np.mean(np.subtract(layer, wait))),
          "compute_median_ms": 1e3 * float(np.median(np.subtract(layer, wait))),
          "read_GBps": sum(e["nbytes"] for e in reads) / read_s / 1e9 if read_s else None}


def write(record: dict[str, Any], out_dir: str) -> str:
  """Writes one process's record as out_dir/p<id>-of-<N>.json; returns the path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"shards{record['shards']}-p{record['process']}.json")
  with open(path, "w") as f:
    json.dump(record, f)
  return path
