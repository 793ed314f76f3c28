"""The benchmark: several systems, one model, one budget, one run.

`benchmark(config, workdir)` runs every system of a config (hetflow
strategies with their options, and HF peers) on the same model and prompt,
each in a fresh process (`python -m hetflow.bench.runner --one=SPEC`) with the
page cache dropped before it, optionally under a `MemoryLimit` held for the
whole run, and writes into `workdir`:

  results.json   every figure, the probes, the machine, the config
  results.md     the table (hetflow.bench.report)
  decode.png     decode tok/s per system (for an ablation config: its chart)
  timeline.png   per-layer reads, transfers and compute of one decode step
                 (a separate short run with Engine(trace=True)); timeline.json
                 is the same as a Chrome/Perfetto trace
  profile/       a jax.profiler trace per hetflow system, on request

What is measured: time to first token (prefill), decode tokens/s, bytes per
decode token from each tier, peak ledger bytes per tier, peak RSS, the bytes
the process really read (/proc/self/io), whether the strategy's reads were
O_DIRECT or buffered (its reader's own record), achieved disk bandwidth, and
`fraction_of_limit` = limit_time / measured time per token, where limit_time =
streamed bytes / the disk (or host->device) bandwidth + resident bytes / the
memory (matvec) bandwidth, both probed in the same run (hetflow.bench.probes):
reads of the store itself, and an XLA matrix-vector product over weights that
do not fit in the caches. A sparse row (one whose strategy reports its requests
and the records it computed, e.g. neuron_cluster) reads and computes only part
of what it places on disk: its limit_time is the larger of its disk bytes over
the disk's rate at its mean request size (`probes.probe_small_reads`, after
every row) and what it multiplied (the records it computed, the attention and
head) over the matvec bandwidth, all counted in its measured run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import ml_collections

from hetflow import config as config_lib
from hetflow.bench import peers, probes, report
from hetflow.bench.config import SystemSpec, systems_from_config
from hetflow.bench.process import (
  drop_cold,
  peak_rss,
  proc_read_bytes,
  prompt_ids,
  touched_bytes,
)
from hetflow.hardware import cpuinfo_field
from hetflow.memory.budget import format_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GB = 1e9


def machine_info() -> dict[str, Any]:
  """What the run was taken on, including how busy the machine was."""
  info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "loadavg": os.getloadavg()}
  if cpu := cpuinfo_field("model name"):
    info["cpu"] = cpu
  try:
    with open("/proc/meminfo") as f:
      info["mem_total"] = next(int(line.split()[1]) * 1024 for line in f
                               if line.startswith("MemTotal"))
  except (OSError, StopIteration):
    pass
  import jax
  info["jax"] = jax.__version__
  return info


# -- what a strategy says it did -------------------------------------------------------


def strategy_facts(stats) -> dict[str, Any]:
  """The figures the benchmark takes from a strategy's `StrategyStats`, cumulative since load.

  The one place that reads a strategy's stats: the decode counters (bytes read
  from disk, copied host -> device, seconds waited) and the reader's own
  record of its reads (None if the strategy reads no files).

  Args:
    stats: what `engine.strategy.stats()` returned.

  Returns:
    {"decode": {"disk_bytes", "disk_requests", "h2d_bytes", "wait_s", "computed_bytes"
    (records multiplied, a sparse strategy's; else 0)}, "reads": None or
    {"bytes", "requests", "direct_requests", "buffered_requests", "direct",
    "fallbacks"}}, plain numbers (JSON-able).
  """
  d, record = stats.decode, stats.reads
  reads = None if record is None else {
      "bytes": record.bytes, "requests": record.requests,
      "direct_requests": record.direct_requests, "buffered_requests": record.buffered_requests,
      "direct": record.direct, "fallbacks": list(record.fallbacks)}
  return {"decode": {"disk_bytes": d.disk_bytes, "disk_requests": d.disk_requests,
                     "h2d_bytes": d.h2d_bytes, "wait_s": d.wait_s,
                     "computed_bytes": d.get("computed_bytes")},
          "reads": reads}


def _facts_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
  """What happened between two `strategy_facts`: counters subtracted, new fallbacks."""
  decode = {k: v - before["decode"].get(k, 0) for k, v in after["decode"].items()}
  reads = after["reads"]
  if reads is not None:
    old = before["reads"] or {}
    reads = dict(reads)
    for k in ("bytes", "requests", "direct_requests", "buffered_requests"):
      reads[k] -= old.get(k, 0)
    reads["fallbacks"] = reads["fallbacks"][len(old.get("fallbacks", ())):]
    reads["direct"] = (reads["buffered_requests"] == 0) if reads["requests"] else None
  return {"decode": decode, "reads": reads}


# -- one system (child process) ---------------------------------------------------


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs one system as a spec (see `benchmark`) describes; returns its figures."""
  system = SystemSpec(**spec["system"])
  model = config_lib.build_model(ml_collections.ConfigDict(spec["model"]))
  prompt = prompt_ids(model.config.vocab_size, spec["prompt_tokens"])
  if system.kind != "hetflow":
    return peers.run_peer(system, model, spec, prompt)
  return _run_hetflow(system, model, spec, prompt)


def _run_hetflow(system: SystemSpec, model, spec, prompt) -> dict[str, Any]:
  import jax

  from hetflow.engine import Engine

  budget = config_lib.build_budget(system.budget if system.budget else spec.get("budget"))
  t0 = time.perf_counter()
  engine = Engine(model, system.strategy, budget=budget, options=system.options or None,
                  trace=spec.get("trace", False))
  load_s = time.perf_counter() - t0
  n = spec["new_tokens"]
  result: dict[str, Any] = {"load_s": load_s, "placement": str(engine.placement)}
  with engine:
    if spec.get("trace"):
      return _trace_run(engine, prompt, spec)
    other = spec.get("warmup_prompt", "other") == "other"
    warm = prompt_ids(model.config.vocab_size, prompt.shape[1], seed=1) if other else prompt
    if spec.get("warmup", True):
      engine.generate(warm, max_new_tokens=n, stop_tokens=())  # compiles every shape
      drop_cold(spec)
    # Several measured runs on a shared machine: keep the fastest decode (noise
    # from other work only ever slows a run down) and report them all.
    runs = []
    for repeat in range(max(1, spec.get("repeats", 1))):
      if repeat:
        if other:  # the last run left the measured prompt's neurons/experts in the caches
          engine.generate(warm, max_new_tokens=n, stop_tokens=())
        drop_cold(spec)
      before = strategy_facts(engine.strategy.stats())
      io0 = proc_read_bytes()
      engine.timeline.clear()
      t_start = time.perf_counter()
      profile_dir = spec.get("profile_dir") if repeat == 0 else None
      if profile_dir:
        jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
      try:
        out = engine.generate(prompt, max_new_tokens=n, stop_tokens=())
      finally:
        if profile_dir:
          jax.profiler.stop_trace()
      proc_read = proc_read_bytes() - io0
      stats = engine.strategy.stats()
      facts = _facts_delta(strategy_facts(stats), before)
      runs.append((out, facts, stats, proc_read))
      busy = _busy_fraction(engine.timeline, t_start + out.stats["prefill_s"], time.perf_counter())
      runs[-1][0].stats["disk_busy"] = busy
    result["decode_tok_s_all"] = [o.stats["decode_tokens_per_s"] for o, *_ in runs]
    result["ttft_s_all"] = [o.stats["prefill_s"] for o, *_ in runs]
    out, facts, stats, proc_read = max(runs, key=lambda r: r[0].stats["decode_tokens_per_s"])
    s = out.stats
    steps = s["new_tokens"] - 1
    per_token = lambda key: facts["decode"][key] / steps if steps else float("nan")  # noqa: E731
    planned = engine.placement.bytes_per_tier()
    layer_tiers = {"disk": 0, "host": 0, "device": 0}
    for g, p in engine.placement.groups.items():
      if g.startswith("layers/"):
        layer_tiers[p.tier] += p.nbytes
    result.update({
        "tokens": out.tokens.tolist(),
        "ttft_s": s["prefill_s"],
        "decode_tok_s": s["decode_tokens_per_s"],
        "decode_s_per_token": s["decode_s"] / steps if steps else float("nan"),
        "host_cpu_s_per_token": s["decode_host_cpu_s"] / steps if steps else float("nan"),
        "disk_busy": s.get("disk_busy"),
        "new_tokens": s["new_tokens"],
        "disk_bytes_per_token": per_token("disk_bytes"),
        "host_to_device_bytes_per_token": per_token("h2d_bytes"),
        "fetch_wait_s_per_token": per_token("wait_s"),
        "proc_read_bytes": proc_read,
        "reads": facts["reads"],
        "peak_ledger": {t: row["peak"] for t, row in s["ledger"]["tiers"].items()},
        "planned_bytes": planned,
        "touched_bytes": touched_bytes(model),
        # Bytes a decode token must bring from each slow tier, as placed.
        "streamed": {"disk": layer_tiers["disk"], "host": layer_tiers["host"]},
        "recompilations": s["recompilations"],
        "page_cache": report.reads_label(facts["reads"], proc_read),
        "strategy_stats": dataclasses.asdict(stats),
    })
    if facts["decode"]["computed_bytes"]:
      # A sparse row (one that computes only some records): the measured run's own counts,
      # for its limit (`_sparse_limit`).
      result["sparse"] = {
          "requests_per_token": per_token("disk_requests"),
          "computed_bytes_per_token": per_token("computed_bytes"),
          "fixed_bytes_per_token": stats.details.get("fixed_bytes_per_token", 0)}
  result["peak_rss"] = peak_rss()
  return result


def _busy_fraction(timeline, start: float, end: float) -> float | None:
  """Fraction of [start, end] during which at least one of the strategy's reads was running.

  Robust to a shared disk: 1.0 means the strategy kept the disk busy all of
  decode (it is at the disk limit, whatever bandwidth the disk gave it then).
  """
  spans = sorted((max(e.start, start), min(e.end, end)) for e in timeline.events
                 if e.kind == "read" and e.end > start and e.start < end)
  if not spans or end <= start:
    return None
  covered, cur_start, cur_end = 0.0, *spans[0]
  for s, e in spans[1:]:
    if s > cur_end:
      covered += cur_end - cur_start
      cur_start, cur_end = s, e
    else:
      cur_end = max(cur_end, e)
  covered += cur_end - cur_start
  return covered / (end - start)


def _trace_run(engine, prompt, spec) -> dict[str, Any]:
  """Prefill + 2 decode steps with per-layer compute timing; keeps the last decode step."""
  from hetflow.trace import Timeline

  engine.generate(prompt, max_new_tokens=3, stop_tokens=())  # compile
  engine.timeline.clear()
  engine.generate(prompt, max_new_tokens=3, stop_tokens=())
  events = engine.timeline.events
  computes = [e for e in events if e.kind == "compute"]
  num_layers = engine.model.config.num_layers
  last = computes[-num_layers:]  # the last decode pass
  start, end = last[0].start, last[-1].end
  # Reads for this pass started during the previous one: show them clipped at the pass start.
  keep = [dataclasses.replace(e, start=max(e.start, start), end=min(e.end, end))
          for e in events if e.end > start and e.start < end]
  window = Timeline()
  window.events = keep
  window.origin = start
  png = os.path.join(spec["workdir"], "timeline.png")
  report.plot_step(keep, start, png, title=f"{spec['system']['name']}: one decode step,"
                   f" {(end - start) * 1e3:.0f} ms (trace mode: blocks after each layer)")
  window.to_chrome_trace(os.path.join(spec["workdir"], "timeline.json"))
  return {"timeline_png": png, "events": len(keep), "step_s": end - start}


# -- the whole run (parent process) ---------------------------------------------------


def _child(spec: dict[str, Any], workdir: str, timeout: float) -> dict[str, Any]:
  name = spec["system"]["name"] + ("-trace" if spec.get("trace") else "")
  spec_path = os.path.join(workdir, "runs", f"{name}.spec.json")
  out_path = os.path.join(workdir, "runs", f"{name}.result.json")
  log_path = os.path.join(workdir, "runs", f"{name}.log")
  os.makedirs(os.path.dirname(spec_path), exist_ok=True)
  with open(spec_path, "w") as f:
    json.dump(spec, f, indent=1)
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    try:
      proc = subprocess.run([sys.executable, "-m", "hetflow.bench.runner", f"--one={spec_path}",
                             f"--result={out_path}"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, timeout=timeout)
      rc = proc.returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
  wall = time.perf_counter() - t0
  if rc == 0 and os.path.exists(out_path):
    with open(out_path) as f:
      result = json.load(f)
    result.update(ok=True, wall_s=wall)
    return result
  with open(log_path) as f:
    tail = f.read()[-2000:]
  reason = "timed out" if rc == "timeout" else f"exit {rc}" + (" (killed: out of memory?)"
                                                                if rc in (-9, 137) else "")
  return {"ok": False, "error": f"{reason}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
          "log": log_path, "wall_s": wall}


def limits(result: dict[str, Any], probed: dict[str, Any]) -> dict[str, Any]:
  """limit_time and fraction_of_limit for one system, from the probes of the same run.

  Args:
    result: one system's figures (touched_bytes, streamed, decode_s_per_token).
    probed: the run's probes (disk, host_to_device, memory), each with bytes_per_s.

  Returns:
    limit_s_per_token (serial), limit_overlapped_s_per_token (reads hidden
    behind compute), disk_bw_limit, fraction_of_limit, and disk_bw_achieved
    where the system streams from disk. A sparse row with its small-read probe
    (`_sparse_limit`) gets its own limit instead, marked limit_kind "sparse".
  """
  sparse = _sparse_limit(result, probed)
  if sparse is not None:
    return sparse
  streamed = result.get("streamed", {})
  disk = streamed.get("disk", 0)
  host = streamed.get("host", 0)
  resident = max(0, result["touched_bytes"] - disk - host)
  disk_s = disk / probed["disk"]["bytes_per_s"]
  host_s = host / probed["host_to_device"]["bytes_per_s"]
  mem_s = resident / probed["memory"]["bytes_per_s"]
  limit = disk_s + host_s + mem_s
  measured = result.get("decode_s_per_token")
  touched_s = result["touched_bytes"] / probed["memory"]["bytes_per_s"]
  out = {"limit_s_per_token": limit, "disk_bw_limit": probed["disk"]["bytes_per_s"],
         "limit_overlapped_s_per_token": max(disk_s + host_s, touched_s),
         "fraction_of_limit": limit / measured if measured else float("nan")}
  if disk and measured:
    out["disk_bw_achieved"] = result.get("disk_bytes_per_token", disk) / measured
  return out


def sparse_request_bytes(result: dict[str, Any]) -> int | None:
  """A sparse row's mean decode request in its measured run, rounded up to pages (the size
  its limit is probed at); None for other rows, or one that read nothing."""
  from hetflow.memory import round_up

  sparse = result.get("sparse")
  if not sparse or not sparse["requests_per_token"]:
    return None
  return round_up(int(result["disk_bytes_per_token"] / sparse["requests_per_token"]))


def _sparse_limit(result: dict[str, Any], probed: dict[str, Any]) -> dict[str, Any] | None:
  """The limit of a sparse row (issue 13's definition): the larger of its disk bytes over the
  disk's rate at its request size (``probes.probe_small_reads`` in the same run) and what
  it multiplied (the records it computed and the fixed region's weights: attention, norms,
  head) over the f32 matvec rate, all from its measured run. The dense formula would charge
  it for every byte placed on disk. Also its serial floor: the fixed region's compute plus
  the larger of the disk's time and the records' compute, as a layer's reads and records
  wait for its attention's output unless a guess starts the reads earlier.
  None for other rows, or without that probe."""
  sparse, measured = result.get("sparse"), result.get("decode_s_per_token")
  if not sparse or not measured:
    return None
  size = sparse_request_bytes(result)
  small = None
  if size is not None:  # else it read nothing (every record it needed was cached)
    small = (probed.get("small_reads") or {}).get(str(size))
    if small is None:
      return None
  disk_s = result["disk_bytes_per_token"] / small["bytes_per_s"] if small else 0.0
  rate = probed["memory"]["bytes_per_s"]
  fixed_s = sparse["fixed_bytes_per_token"] / rate
  records_s = sparse["computed_bytes_per_token"] / rate
  compute_s = records_s + fixed_s
  limit = max(disk_s, compute_s)
  return {"limit_kind": "sparse", "limit_s_per_token": limit,
          "limit_overlapped_s_per_token": limit, "sparse_disk_s_per_token": disk_s,
          "sparse_compute_s_per_token": compute_s, "sparse_fixed_s_per_token": fixed_s,
          # A layer's reads and records wait for its attention (and a token's first layer
          # for the head before it): with no guess, what no schedule beats.
          "sparse_serial_s_per_token": fixed_s + max(disk_s, records_s), "request_bytes": size,
          "disk_bw_limit": small["bytes_per_s"] if small else None,
          "fraction_of_limit": limit / measured,
          "disk_bw_achieved": result["disk_bytes_per_token"] / measured}


def llama_cpp_available() -> bool:
  """Whether llama-cpp-python (the `peers` extra) is importable, without importing it."""
  import importlib.util

  return importlib.util.find_spec("llama_cpp") is not None


def _leading_agreement(tokens: list[int], reference: list[int]) -> int:
  """How many tokens from the start equal the reference's."""
  n = 0
  for a, b in zip(tokens, reference):
    if a != b:
      break
    n += 1
  return n


def _system_spec(system: SystemSpec, base: dict[str, Any], config, model,
                 store) -> dict[str, Any] | None:
  """One row's spec, its files prepared (before any memory limit); None: a llamacpp row
  without llama_cpp, which the table lists as skipped.

  A row with its own `weights` gets the model section with that format and, for
  layerwise, that format's store (a store of another format is refused).
  A llamacpp row gets the model written as GGUF at its type.
  """
  from hetflow.memory.store import open_store

  spec = dict(base, system=dataclasses.asdict(system))
  if system.kind == "llamacpp":
    if not llama_cpp_available():
      return None
    spec["gguf_path"] = peers.gguf_for(model, system.gguf_type,
                                       positions=config.prompt_tokens + config.new_tokens)
    return spec
  if system.kind != "hetflow":
    return spec
  row_store = store
  if system.weights and system.weights != config.model.get("weights"):
    spec["model"] = dict(base["model"], weights=system.weights)
    if system.strategy == "layerwise" and "store_dir" not in system.options:
      variant = config_lib.build_model(ml_collections.ConfigDict(spec["model"]))
      row_store = open_store(variant, None, lock=False)
      row_store.close()
      spec["store_dir"] = row_store.path
  if system.strategy == "layerwise" and "store_dir" not in system.options:
    spec["system"]["options"] = dict(system.options, store_dir=row_store.path)
  return spec


def benchmark(config, workdir: str) -> dict[str, Any]:
  """Runs every system of a bench config; writes results.json, results.md, timeline.png.

  Args:
    config: a ConfigDict as configs/bench/*.py return (see
      `hetflow.bench.config.bench_config` for the fields).
    workdir: output directory (created).

  Returns:
    The results dict written to results.json; a system that failed has
    `ok: False` and the error.
  """
  from hetflow.memory import MemoryLimit
  from hetflow.memory.store import open_store

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  systems = systems_from_config(config)
  model = config_lib.build_model(config.model)
  print(f"model: {model.description}, {format_bytes(model.nbytes)}; systems:"
        f" {[s.name for s in systems]}", flush=True)

  # Preparation, before any limit: the disk store (its own disk bandwidth is the
  # limit's), the HF directory and GGUF files the peers load, each row's own store.
  store = open_store(model, config.get("store_dir") or None, lock=False)
  hf_dir = None
  if any(s.kind in ("transformers", "accelerate") for s in systems):
    hf_dir = peers.hf_dir_for(model)

  base = {"model": config_lib.to_dict(config.model), "budget": config_lib.to_dict(config.budget),
          "prompt_tokens": config.prompt_tokens, "new_tokens": config.new_tokens,
          "warmup": config.warmup, "warmup_prompt": config.get("warmup_prompt", "other"),
          "repeats": config.get("repeats", 1), "hf_dir": hf_dir,
          "drop_method": config.get("drop_method", "fadvise") if config.get("drop_caches", True)
                         else "none", "workdir": workdir,
          "store_dir": store.path}
  specs = [_system_spec(system, base, config, model, store) for system in systems]
  probed = {"disk": probes.probe_store(store), "memory": probes.probe_memory(),
            "host_to_device": probes.probe_host_to_device()}
  for k, p in probed.items():
    print(f"probe {k}: {p['bytes_per_s'] / GB:.2f} GB/s", flush=True)
  cursor = probed["disk"]["next"]
  disk_probes = [probed["disk"]["bytes_per_s"]]
  disk_direct = [probed["disk"]["direct"]]
  results = {"machine": machine_info(), "probes": probed, "config": config.to_dict(),
             "systems": []}
  limit = None
  if config.get("memory_limit"):
    limit = MemoryLimit(config.memory_limit)
  try:
    if limit is not None:
      limit.__enter__()
      results["memory_limit"] = {"limit": config.memory_limit, "locked": limit.locked_bytes}
    for system, spec in zip(systems, specs):
      if spec is None:
        r = {"ok": False, "skipped": True, "name": system.name, "kind": system.kind,
             "error": "skipped: llama_cpp is not importable (pip install -e '.[peers]')"}
        results["systems"].append(r)
        print(f"  {system.name}: {r['error']}", flush=True)
        continue
      if config.get("profile_trace") and system.kind == "hetflow":
        spec["profile_dir"] = os.path.join(workdir, "profile", system.name)
      available_before = None
      if limit is not None:
        from hetflow.memory.limit import mem_available

        limit.top_up()  # what this process freed since the lock must not raise the limit
        available_before = mem_available()
        limit.held(reset=True)  # the keeper's record of this row starts here
      drop_cold(spec)
      print(f"running {system.name} ...", flush=True)
      # The disk is shared with other work: probe it again after each system.
      # Every row's limit uses the best figure of the whole run (the disk's
      # demonstrated rate, the strictest limit); the probes next to a row show
      # how busy the disk was around it.
      r = _child(spec, workdir, config.get("timeout_s", 1800))
      if available_before is not None:
        r["mem_available_at_start"] = available_before
        r["memory_limit_held"] = limit.held()  # how far the limit strayed during the row
      after = probes.probe_store(store, 256 << 20, start=cursor)
      cursor = after["next"]
      disk_probes.append(after["bytes_per_s"])
      disk_direct.append(after["direct"])
      r["name"], r["kind"] = system.name, system.kind
      r["disk_probe_after"] = after["bytes_per_s"]
      results["systems"].append(r)
      print("  " + (f"{system.name}: done" if r["ok"] else report.summary_line(r)), flush=True)
    if config.get("timeline", True):
      # The first system that streams shows overlap; resident has nothing to overlap.
      hetflow_systems = [s for s in systems if s.kind == "hetflow"]
      traced = next((s for s in hetflow_systems if s.strategy != "resident"),
                    hetflow_systems[0] if hetflow_systems else None)
      if traced is not None:
        spec = dict(specs[systems.index(traced)], trace=True)
        results["timeline"] = _child(spec, workdir, config.get("timeout_s", 1800))
  finally:
    if limit is not None:
      results["memory_limit"]["locked_final"] = limit.locked_bytes
      limit.__exit__(None, None, None)
  probed["disk"]["bytes_per_s_all"] = disk_probes
  probed["disk"]["bytes_per_s"] = max(disk_probes)
  probed["disk"]["direct_all"] = disk_direct
  # Sparse rows' limits: the same disk at each one's request size, after every row ran.
  sizes = sorted({size for r in results["systems"] if r.get("ok")
                  if (size := sparse_request_bytes(r)) is not None})
  if sizes:
    files = [store.file(g) for g in store.groups if g.startswith("layers/")]
    probed["small_reads"] = {}
    for size in sizes:
      small = probes.probe_small_reads(files, size)
      if small is not None:
        probed["small_reads"][str(size)] = small
        print(f"probe small reads of {format_bytes(size)}:"
              f" {small['bytes_per_s'] / GB:.2f} GB/s", flush=True)
  for r in results["systems"]:
    if r["ok"]:
      r.update(limits(r, probed))
    print("  " + report.summary_line(r), flush=True)
  results["machine"]["loadavg_after"] = os.getloadavg()
  reference = next((r["tokens"] for r in results["systems"] if r.get("ok")), None)
  for r in results["systems"]:
    if r.get("ok") and reference is not None:
      r["tokens_match_first"] = r["tokens"] == reference
      # Lossy rows (other formats, llama.cpp's Q8 activations) agree for a while.
      r["tokens_agree_first"] = _leading_agreement(r["tokens"][0], reference[0])
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(report.markdown(results))
  report.plot_decode(results, os.path.join(workdir, "decode.png"))
  print(report.markdown(results))
  return results


def _main(argv: list[str]) -> None:
  import argparse

  parser = argparse.ArgumentParser(description="Runs one benchmark system (used by benchmark()).")
  parser.add_argument("--one", required=True, help="spec JSON written by benchmark()")
  parser.add_argument("--result", required=True, help="where to write the result JSON")
  args = parser.parse_args(argv)
  with open(args.one) as f:
    spec = json.load(f)
  result = run_one(spec)
  tmp = args.result + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(tmp, args.result)


if __name__ == "__main__":
  _main(sys.argv[1:])
