"""The benchmark harness: several systems, one model, one budget, one run.

`benchmark(config, workdir)` runs every system of a config (hetflow
strategies with their options, and HF peers) on the same model and prompt,
each in a fresh process (`python -m hetflow.benchmark --one=SPEC`) with the
page cache dropped before it, optionally under a `MemoryLimit` held for the
whole run, and writes into `workdir`:

  results.json   every figure, the probes, the machine, the config
  results.md     the table
  decode.png     decode tok/s per system (for an ablation config: its chart)
  timeline.png   per-layer reads, transfers and compute of one decode step
                 (a separate short run with Engine(trace=True)); timeline.json
                 is the same as a Chrome/Perfetto trace
  profile/       a jax.profiler trace per hetflow system, on request

What is measured (MEASURING.md): time to first token (prefill), decode
tokens/s, bytes per decode token from each tier, peak ledger bytes per tier,
peak RSS, achieved disk bandwidth, and `fraction_of_limit` = limit_time /
measured time per token, where limit_time = streamed bytes / the disk (or
host->device) bandwidth + resident bytes / the memory (matvec) bandwidth,
both probed in the same run: a cold O_DIRECT read of the store itself, and an
XLA matrix-vector product over weights that do not fit in the caches.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from hetflow import config as config_lib
from hetflow.memory.budget import format_bytes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


def bench_config(model: str = "llama-tiny", **overrides) -> ml_collections.ConfigDict:
  """A bench config with the harness's defaults; configs state only what differs.

  Fields:
    model: the model section (hetflow.config.model_section(model)).
    budget: device/host/disk sizes ("" = unlimited).
    store_dir: the layerwise disk store ("" = the model's default, converted
      on first use).
    prompt_tokens, new_tokens: the workload.
    repeats: measured runs per system; the fastest decode is kept, all are reported.
    warmup: an identical run first, so the measured one compiles nothing.
    memory_limit: e.g. "3GiB": lock the rest of RAM for the whole run.
    drop_caches: evict the model's files before each run (and after warm-up).
    drop_method: "fadvise" (per file) or "drop_caches" (machine-wide; disturbs
      other jobs on the machine).
    timeline: write timeline.png of one traced decode step.
    profile_trace: a jax.profiler (Perfetto) trace per hetflow system.
    timeout_s: per system.
    order: comma-separated names of `systems` to run, in this order.
    systems: name -> SystemSpec fields.
    smoke: overrides that make the config a seconds-long run (tests).
  """
  c = ml_collections.ConfigDict(dict(
      model=config_lib.model_section(model).to_dict(),
      budget=dict(device="", host="", disk=""), store_dir="", prompt_tokens=16,
      new_tokens=8, repeats=2, warmup=True, memory_limit="", drop_caches=True,
      drop_method="fadvise", timeline=True, profile_trace=False, timeout_s=900, order="",
      systems={}, smoke={}))
  for key, value in overrides.items():
    c[key] = value
  return c


@dataclasses.dataclass(frozen=True)
class SystemSpec:
  """One row of the table.

  Attributes:
    name: the row's label.
    kind: "hetflow" (a strategy), "transformers" (plain from_pretrained, torch
      CPU) or "accelerate" (device_map with disk offload).
    strategy: registered strategy name (kind "hetflow").
    options: the strategy's options (kind "hetflow").
    resident_layers: kind "accelerate": blocks kept in RAM, spread like
      layerwise's; the others go to disk (offload_folder). None: all in RAM.
    budget: overrides the config's budget for this system (device/host/disk).
  """

  name: str
  kind: str = "hetflow"
  strategy: str = "layerwise"
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  resident_layers: int | None = None
  budget: dict[str, Any] | None = None

  def __post_init__(self):
    if self.kind not in ("hetflow", "transformers", "accelerate"):
      raise ValueError(f"system {self.name!r}: kind={self.kind!r}; expected 'hetflow',"
                       " 'transformers' or 'accelerate'.")


def systems_from_config(config) -> list[SystemSpec]:
  """The systems a config lists, in `config.order` (comma-separated; empty: sorted names)."""
  names = [n.strip() for n in (config.get("order") or "").split(",") if n.strip()]
  names = names or sorted(config.systems.keys())
  out = []
  for name in names:
    if name not in config.systems:
      raise ValueError(f"order names {name!r}, which is not in systems {sorted(config.systems)}.")
    s = config_lib.to_dict(config.systems[name])
    budget = s.pop("budget", None)
    out.append(SystemSpec(name=name, budget=({k: v for k, v in budget.items() if v} or None)
                          if budget else None, **s))
  return out


# -- probes (parent process) ------------------------------------------------------


def probe_disk_bandwidth(store, bytes_per_setting: int = 512 << 20,
                         settings: tuple[tuple[int, int], ...] = ((8, 1 << 20), (4, 4 << 20),
                                                                  (16, 1 << 20)),
                         start: int = 0, in_flight: int = 3) -> dict[str, Any]:
  """Cold O_DIRECT reads of the store's own layer files: the disk the strategy streams from.

  Tries a few (threads, request size) settings, each on distinct files with
  `in_flight` group reads queued (as a prefetching reader keeps it), and keeps
  the best: the limit is what the disk can do, not what one setting gets.

  Args:
    store: the LayerStore.
    bytes_per_setting: bytes read per setting.
    settings: (reader threads, request bytes) pairs to try.
    start: index of the first layer file to read; pass the previous probe's
      `next` so that successive probes read files not read before.

  Returns:
    bytes_per_s (the best), direct, cache_drop, per-setting figures, next.
  """
  from hetflow.memory import ReaderPool, aligned_empty, drop_page_cache

  groups = [g for g in store.groups if g.startswith("layers/")] or list(store.groups)
  # O_DIRECT needs no cache drop; fadvise keeps a buffered fallback honest
  # without a machine-wide drop (see drop_cold).
  method = drop_page_cache(store.path, method="fadvise")
  bufs = [aligned_empty(store.max_group_nbytes) for _ in range(in_flight)]
  for b in bufs:
    b.fill(0)  # O_DIRECT into never-touched pages is several times slower here
  per_setting, direct, index = {}, True, start
  for threads, chunk in settings:
    total, pending = 0, []
    with ReaderPool(threads) as pool:
      t0 = time.perf_counter()
      first = index
      while total < bytes_per_setting and index < first + len(groups):
        g = groups[index % len(groups)]  # wraps only on tiny stores
        index += 1
        if len(pending) == in_flight:
          pending.pop(0).result()
        pending.append(pool.read_group(store, g, bufs[index % in_flight], chunk=chunk))
        total += store.group_nbytes(g)
      for r in pending:
        r.result()
      seconds = time.perf_counter() - t0
      direct = direct and pool.direct
    rate = total / seconds
    if not per_setting or rate > max(per_setting.values()):
      best = [threads, chunk]
    per_setting[f"{threads} threads x {format_bytes(chunk)}"] = rate
  return {"bytes_per_s": max(per_setting.values()), "settings": per_setting, "direct": direct,
          "cache_drop": method, "bytes": bytes_per_setting * len(settings), "next": index,
          "best_setting": best}


def probe_memory_bandwidth(total_bytes: int = 512 << 20, repeats: int = 3) -> dict[str, Any]:
  """Bytes of f32 weights per second through an XLA matrix-vector product (the decode roof)."""
  import jax
  import jax.numpy as jnp

  rows, cols = 2048, 8192
  count = max(1, total_bytes // (rows * cols * 4))
  ws = [jnp.full((rows, cols), 1.0 / cols, jnp.float32) + i for i in range(count)]
  x = jnp.ones((cols,), jnp.float32)
  fn = jax.jit(lambda w, x: w @ x)
  fn(ws[0], x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for w in ws:
      fn(w, x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  nbytes = count * rows * cols * 4
  return {"bytes": nbytes, "seconds": best, "bytes_per_s": nbytes / best}


def probe_host_to_device(nbytes: int = 64 << 20, repeats: int = 3) -> dict[str, Any]:
  """jax.device_put from the host memory kind to the device (a memcpy on CPU)."""
  import jax

  from hetflow.memory import tiers

  src = jax.device_put(np.ones(nbytes // 4, np.float32), tiers.host_sharding())
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    y = jax.device_put(src, tiers.device_sharding())
    y.block_until_ready()
    best = min(best, time.perf_counter() - t0)
    y.delete()
  return {"bytes": nbytes, "seconds": best, "bytes_per_s": nbytes / best}


def machine_info() -> dict[str, Any]:
  """What the run was taken on, including how busy the machine was."""
  info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "loadavg": os.getloadavg()}
  try:
    with open("/proc/cpuinfo") as f:
      info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    with open("/proc/meminfo") as f:
      info["mem_total"] = next(int(line.split()[1]) * 1024 for line in f
                               if line.startswith("MemTotal"))
  except (OSError, StopIteration):
    pass
  import jax
  info["jax"] = jax.__version__
  return info


# -- one system (child process) ---------------------------------------------------


def _proc_read_bytes() -> int:
  """Bytes this process caused to be fetched from storage (page-cache misses and O_DIRECT)."""
  try:
    with open("/proc/self/io") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
  except (OSError, StopIteration):
    return -1


def peak_rss() -> int:
  """Peak resident set of this process in bytes.

  VmHWM, not getrusage's ru_maxrss: the latter survives exec, so a child
  started by a big parent would report the parent's peak.
  """
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(vocab_size: int, length: int, seed: int = 0) -> np.ndarray:
  """The prompt every system gets: fixed random ids (synthetic models have no tokenizer)."""
  return np.random.default_rng(seed).integers(3, vocab_size, (1, length)).astype(np.int32)


def touched_bytes(model) -> int:
  """Weight bytes one decode token reads: every block, the head, one embedding row."""
  n = sum(model.group_nbytes(g) for g in model.group_names() if g.startswith("layers/"))
  n += model.group_nbytes("head")
  if model.config.tie_word_embeddings:
    n += model.group_nbytes("embed")  # the tied LM head is the embedding table
  return n


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs one system as a spec (see `benchmark`) describes; returns its figures."""
  system = SystemSpec(**spec["system"])
  model = config_lib.build_model(ml_collections.ConfigDict(spec["model"]))
  prompt = prompt_ids(model.config.vocab_size, spec["prompt_tokens"])
  if system.kind != "hetflow":
    from hetflow import peers

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
    if spec.get("warmup", True):
      engine.generate(prompt, max_new_tokens=n, stop_tokens=())  # compiles every shape
      drop_cold(spec)
    # Several measured runs on a shared machine: keep the fastest decode (noise
    # from other work only ever slows a run down) and report them all.
    runs = []
    for repeat in range(max(1, spec.get("repeats", 1))):
      if repeat:
        drop_cold(spec)
      before = engine.strategy.stats()
      io0 = _proc_read_bytes()
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
      runs.append((out, before, engine.strategy.stats(), _proc_read_bytes() - io0))
      busy = _busy_fraction(engine.timeline, t_start + out.stats["prefill_s"], time.perf_counter())
      runs[-1][0].stats["disk_busy"] = busy
    result["decode_tok_s_all"] = [o.stats["decode_tokens_per_s"] for o, *_ in runs]
    result["ttft_s_all"] = [o.stats["prefill_s"] for o, *_ in runs]
    out, before, after, proc_read = max(runs, key=lambda r: r[0].stats["decode_tokens_per_s"])
    s = out.stats
    steps = s["new_tokens"] - 1
    decode = _delta(after.get("decode", {}), before.get("decode", {}))
    per_token = lambda key: decode.get(key, 0) / steps if steps else float("nan")  # noqa: E731
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
        "disk_busy": s.get("disk_busy"),
        "new_tokens": s["new_tokens"],
        "disk_bytes_per_token": per_token("disk_bytes"),
        "host_to_device_bytes_per_token": per_token("host_to_device_bytes"),
        "fetch_wait_s_per_token": per_token("fetch_wait_s"),
        "proc_read_bytes": proc_read,
        "peak_ledger": {t: row["peak"] for t, row in s["ledger"]["tiers"].items()},
        "planned_bytes": planned,
        "touched_bytes": touched_bytes(model),
        # Bytes a decode token must bring from each slow tier, as placed.
        "streamed": {"disk": layer_tiers["disk"], "host": layer_tiers["host"]},
        "recompilations": s["recompilations"],
        "page_cache": "no (O_DIRECT)" if system.options.get("direct_io", True)
                      and layer_tiers["disk"] else ("n/a" if not layer_tiers["disk"] else "yes"),
        "strategy_stats": after,
    })
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


def drop_cold(spec: dict[str, Any]) -> str:
  """Evicts the model's files (store, HF copy) from the page cache before a measured run.

  Per file (fsync + fadvise DONTNEED), not machine-wide drop_caches, unless
  the spec asks for "drop_caches": on a shared machine a global drop makes
  every other process re-read its files, and that burst of reads lands on the
  disk exactly while the next run measures it. (Neither evicts pages a process
  still has mapped; a peer's warm-up mapping stays warm, as it would in use.)
  """
  from hetflow.memory import drop_page_cache

  method = spec.get("drop_method", "fadvise")
  if method == "none":
    return "none"
  files = [p for p in (spec.get("store_dir"), spec.get("hf_dir")) if p]
  return drop_page_cache(files, method=method)


def _delta(after: dict, before: dict) -> dict:
  return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, (int, float))}


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
  plot_step(keep, start, png, title=f"{spec['system']['name']}: one decode step,"
            f" {(end - start) * 1e3:.0f} ms (trace mode: blocks after each layer)")
  window.to_chrome_trace(os.path.join(spec["workdir"], "timeline.json"))
  return {"timeline_png": png, "events": len(keep), "step_s": end - start}


def plot_step(events, origin: float, path: str, title: str = "") -> None:
  """One lane per kind (read, transfer, wait, compute), one labelled bar per layer.

  The engine's compute interval starts before its fetch; the part spent
  waiting for the block (the strategy's "wait" event) is drawn in its own lane.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lanes = ["read", "transfer", "wait", "compute"]
  colors = {"read": "tab:orange", "transfer": "tab:blue", "wait": "tab:red",
            "compute": "tab:green"}
  waits = {e.layer: e.end for e in events if e.kind == "wait"}
  fig, ax = plt.subplots(figsize=(14, 3.2))
  span = max((e.end for e in events), default=origin) - origin
  for e in events:
    if e.kind not in lanes:
      continue
    start = max(e.start, waits.get(e.layer, e.start)) if e.kind == "compute" else e.start
    width = (e.end - start) * 1e3
    y = lanes.index(e.kind)
    ax.barh(y, width, left=(start - origin) * 1e3, color=colors[e.kind], edgecolor="black",
            linewidth=0.3)
    if e.layer is not None and width > span * 1e3 / 60:
      ax.text((start - origin) * 1e3 + width / 2, y, str(e.layer), ha="center", va="center",
              fontsize=7)
  ax.set_yticks(range(len(lanes)), lanes)
  ax.set_xlabel("ms (bars labelled with the layer)")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


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
      proc = subprocess.run([sys.executable, "-m", "hetflow.benchmark", f"--one={spec_path}",
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


def _limit(result: dict[str, Any], probes: dict[str, Any]) -> dict[str, Any]:
  """limit_time and fraction_of_limit for one system (MEASURING.md)."""
  streamed = result.get("streamed", {})
  disk = streamed.get("disk", 0)
  host = streamed.get("host", 0)
  resident = max(0, result["touched_bytes"] - disk - host)
  disk_s = disk / probes["disk"]["bytes_per_s"]
  host_s = host / probes["host_to_device"]["bytes_per_s"]
  mem_s = resident / probes["memory"]["bytes_per_s"]
  limit = disk_s + host_s + mem_s
  measured = result.get("decode_s_per_token")
  out = {"limit_s_per_token": limit, "disk_bw_limit": probes["disk"]["bytes_per_s"],
         "limit_overlapped_s_per_token": max(disk_s + host_s,
                                             result["touched_bytes"] / probes["memory"]["bytes_per_s"]),
         "fraction_of_limit": limit / measured if measured else float("nan")}
  if disk and measured:
    out["disk_bw_achieved"] = result.get("disk_bytes_per_token", disk) / measured
  return out


def benchmark(config, workdir: str) -> dict[str, Any]:
  """Runs every system of a bench config; writes results.json, results.md, timeline.png.

  Args:
    config: a ConfigDict as configs/bench/*.py return (model, budget, systems,
      order, prompt_tokens, new_tokens, warmup, memory_limit, drop_caches,
      timeline, profile_trace, timeout_s).
    workdir: output directory (created).

  Returns:
    The results dict written to results.json.
  """
  from hetflow.memory import MemoryLimit
  from strategies import layerwise

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  systems = systems_from_config(config)
  model = config_lib.build_model(config.model)
  print(f"model: {model.description}, {format_bytes(model.nbytes)}; systems:"
        f" {[s.name for s in systems]}", flush=True)

  # Preparation, before any limit: the disk store (its own disk bandwidth is the
  # limit's), and the HF directory the peers load.
  store = layerwise.open_store(model, config.get("store_dir") or None)
  hf_dir = None
  if any(s.kind != "hetflow" for s in systems):
    from hetflow import peers

    hf_dir = peers.hf_dir_for(model)
  probes = {"disk": probe_disk_bandwidth(store), "memory": probe_memory_bandwidth(),
            "host_to_device": probe_host_to_device()}
  for k, p in probes.items():
    print(f"probe {k}: {p['bytes_per_s'] / GB:.2f} GB/s", flush=True)
  cursor = probes["disk"]["next"]
  disk_probes = [probes["disk"]["bytes_per_s"]]

  base = {"model": config_lib.to_dict(config.model), "budget": config_lib.to_dict(config.budget),
          "prompt_tokens": config.prompt_tokens, "new_tokens": config.new_tokens,
          "warmup": config.warmup, "repeats": config.get("repeats", 1), "hf_dir": hf_dir,
          "drop_method": config.get("drop_method", "fadvise") if config.get("drop_caches", True)
                         else "none", "workdir": workdir,
          "store_dir": store.path}
  results = {"machine": machine_info(), "probes": probes, "config": config.to_dict(),
             "systems": []}
  limit = None
  if config.get("memory_limit"):
    limit = MemoryLimit(config.memory_limit)
  try:
    if limit is not None:
      limit.__enter__()
      results["memory_limit"] = {"limit": config.memory_limit, "locked": limit.locked_bytes}
    for system in systems:
      spec = dict(base, system=dataclasses.asdict(system))
      if system.kind == "hetflow" and "store_dir" not in system.options and \
          system.strategy == "layerwise":
        spec["system"]["options"] = dict(system.options, store_dir=store.path)
      if config.get("profile_trace") and system.kind == "hetflow":
        spec["profile_dir"] = os.path.join(workdir, "profile", system.name)
      available_before = None
      if limit is not None:
        from hetflow.memory.limit import mem_available

        limit.top_up()  # what this process freed since the lock must not raise the limit
        available_before = mem_available()
      drop_cold(spec)
      print(f"running {system.name} ...", flush=True)
      # The disk is shared with other work: probe it again after each system.
      # Every row's limit uses the best figure of the whole run (the disk's
      # demonstrated rate, the strictest limit); the probes next to a row show
      # how busy the disk was around it.
      r = _child(spec, workdir, config.get("timeout_s", 1800))
      if available_before is not None:
        r["mem_available_at_start"] = available_before
      after = probe_disk_bandwidth(store, 256 << 20, start=cursor)
      cursor = after["next"]
      disk_probes.append(after["bytes_per_s"])
      r["name"], r["kind"] = system.name, system.kind
      r["disk_probe_after"] = after["bytes_per_s"]
      results["systems"].append(r)
      print("  " + (f"{system.name}: done" if r["ok"] else _summary(r)), flush=True)
    if config.get("timeline", True):
      # The first system that streams shows overlap; resident has nothing to overlap.
      hetflow_systems = [s for s in systems if s.kind == "hetflow"]
      traced = next((s for s in hetflow_systems if s.strategy != "resident"),
                    hetflow_systems[0] if hetflow_systems else None)
      if traced is not None:
        spec = dict(base, system=dataclasses.asdict(traced), trace=True)
        if traced.strategy == "layerwise" and "store_dir" not in traced.options:
          spec["system"]["options"] = dict(traced.options, store_dir=store.path)
        results["timeline"] = _child(spec, workdir, config.get("timeout_s", 1800))
  finally:
    if limit is not None:
      results["memory_limit"]["locked_final"] = limit.locked_bytes
      limit.__exit__(None, None, None)
  probes["disk"]["bytes_per_s_all"] = disk_probes
  probes["disk"]["bytes_per_s"] = max(disk_probes)
  for r in results["systems"]:
    if r["ok"]:
      r.update(_limit(r, probes))
    print("  " + _summary(r), flush=True)
  results["machine"]["loadavg_after"] = os.getloadavg()
  reference = next((r["tokens"] for r in results["systems"] if r.get("ok")), None)
  for r in results["systems"]:
    if r.get("ok") and reference is not None:
      r["tokens_match_first"] = r["tokens"] == reference
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(results))
  plot_decode(results, os.path.join(workdir, "decode.png"))
  print(markdown(results))
  return results


def plot_decode(results: dict[str, Any], path: str) -> None:
  """A bar per system: decode tok/s, in the config's order (an ablation's steps
  read left to right). Fractions of the limit stay in the table: the limit
  assumes dense streaming, which sparse strategies beat by design."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in results["systems"] if r.get("ok")]
  fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(rows)), 3.2))
  bars = ax.bar([r["name"] for r in rows], [r["decode_tok_s"] for r in rows],
                color=["tab:blue" if r["kind"] == "hetflow" else "tab:gray" for r in rows])
  for bar, r in zip(bars, rows):
    ax.annotate(f"{r['decode_tok_s']:.3f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                va="bottom", fontsize=7)
  ax.set_ylabel("decode tok/s")
  ax.set_title(f"{results['config']['model'].get('name', '')}: decode (grey: peers)", fontsize=9)
  ax.tick_params(axis="x", labelsize=7, rotation=20)
  ax.margins(y=0.25)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _summary(r: dict[str, Any]) -> str:
  if not r.get("ok"):
    return f"{r['name']}: FAILED {r['error']}"
  return (f"{r['name']}: ttft {r['ttft_s']:.2f} s, decode {r['decode_tok_s']:.3f} tok/s,"
          f" {r['fraction_of_limit']:.2f} of the limit")


def markdown(results: dict[str, Any]) -> str:
  """The results table, with the probes and the machine above it."""
  m, p, cfg = results["machine"], results["probes"], results["config"]
  lines = [
      f"# Benchmark: {cfg['model'].get('checkpoint') or cfg['model']['name']}"
      f" ({cfg['model']['dtype']}), prompt {cfg['prompt_tokens']}, {cfg['new_tokens']} new tokens",
      "",
      f"- machine: {m.get('cpu', '?')}, {m['cpus']} CPUs, {format_bytes(m.get('mem_total'))};"
      f" {m['date']}; load average {m['loadavg'][0]:.2f} before, {m['loadavg_after'][0]:.2f}"
      " after (other work on the machine makes times noisy)",
      f"- probes (same run): disk {p['disk']['bytes_per_s'] / GB:.2f} GB/s cold O_DIRECT over"
      f" layer files of the store, best of {len(p['disk']['bytes_per_s_all'])} probes (at the"
      f" start and after each row: {', '.join(f'{b / GB:.2f}' for b in p['disk']['bytes_per_s_all'])};"
      f" cache drop: {p['disk']['cache_drop']});"
      f" memory {p['memory']['bytes_per_s'] / GB:.1f} GB/s (XLA f32 matvec);"
      f" host->device {p['host_to_device']['bytes_per_s'] / GB:.2f} GB/s",
      f"- budget: {cfg.get('budget')}; memory limit: {cfg.get('memory_limit') or 'none'}",
      "- fraction_of_limit = (streamed bytes / disk or link bandwidth + resident bytes / memory"
      " bandwidth) / measured decode time per token; disk busy = fraction of decode time with"
      " one of the strategy's reads in progress (1.0: the disk never waited for hetflow)",
      "",
      "| system | TTFT s | decode tok/s | fraction of limit | disk busy | disk GB/token | h2d GB/token |"
      " read per token (proc) | peak device | peak host | peak RSS | disk GB/s achieved |"
      " disk GB/s probed after | disk layers via page cache | tokens = first |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results["systems"]:
    if not r.get("ok"):
      lines.append(f"| {r['name']} | failed: {r['error'][:120]} |" + " |" * 13)
      continue
    ledger = r.get("peak_ledger") or {}
    bw = r.get("disk_bw_achieved")
    busy = "-" if r.get("disk_busy") is None else f"{r['disk_busy']:.2f}"
    lines.append(
        f"| {r['name']} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.3f} |"
        f" {r['fraction_of_limit']:.2f} |"
        f" {busy} |"
        f" {r.get('disk_bytes_per_token', 0) / GB:.3f} |"
        f" {r.get('host_to_device_bytes_per_token', 0) / GB:.3f} |"
        f" {format_bytes(r.get('proc_read_bytes', 0) / max(1, r['new_tokens']))} |"
        f" {format_bytes(ledger['device']) if 'device' in ledger else '-'} |"
        f" {format_bytes(ledger['host']) if 'host' in ledger else '-'} |"
        f" {format_bytes(r['peak_rss'])} | {f'{bw / GB:.2f}' if bw else '-'} |"
        f" {r['disk_probe_after'] / GB:.2f} |"
        f" {r.get('page_cache', '?')} | {r.get('tokens_match_first', '?')} |")
  t = results.get("timeline")
  if t:
    lines += ["", f"timeline.png: {'written' if t.get('ok') else 'failed: ' + t.get('error', '')}"]
  return "\n".join(lines) + "\n"


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
