"""Everything tensor-split needs a GPU for, in one call (issue 16; run by scripts/gpu_check.sh).

  python scripts/gpu_tensor_split.py --out=$OUT/gpu_tensor_split.json
  python scripts/gpu_tensor_split.py --smoke --out=/tmp/smoke.json   # CPU, tiny sizes
  python scripts/gpu_tensor_split.py --sections=figure8 --deadline=$(($(date +%s) + 300))

Sections, on the jax default device (a GPU), in this order:
  links       host->device GB/s from pinned and unpinned host memory, from a
              CPU-backend array (where tensor_split's host columns live) and from
              numpy, 256 MiB each; overlap of a host->device transfer with a device
              matmul and with CPU-backend matvecs: each alone and all together.
  alpha       the alpha sweep on one FFN-sized [4096, 16384] fp16 matrix
              (hetflow.bench.alpha.alpha_sweep), with the HeteGen alpha of the
              rates it measures.
  compute_on  tensor_split's CPU share inside ONE jitted function
              (`jax.experimental.compute_on("device_host")`) against the current
              two-program split (CPU backend + device, joined on the device), on a
              chain of 8 [4096, 4096] fp16 kernels at the sweep's HeteGen alpha; if it
              does not compile on this jax the error is recorded instead.
  figure8     HeteGen's Figure 8 at this machine's scale: an OPT-6.7B-shaped
              synthetic model in fp16, batch 1, prompt 512, 64 new tokens;
              tensor_split and layerwise (host tier) at device budgets of 1, 2, 4
              and 8 GiB: time to first token, decode tokens/s, throughput, with the
              simulator's prediction (a profile measured here, the model's halves and
              layer copy calibrated on this GPU) beside each. Expect (HeteGen on an
              A10): tensor_split >= 2.5x layerwise at the smallest budget both run at;
              where the ratio differs, the measured link and CPU rates recorded with
              it say why.

Writes one JSON file, rewritten after every section and every Figure 8 row, so a run
stopped by its time limit still leaves what it measured. `--deadline` (Unix seconds)
skips the Figure 8 rows that would not finish before it (estimated from the previous
row of the same strategy). Uses only hetflow's public API and the simulator / planner
entry points (hetflow.bench.probes.measure, hetflow.bench.calibration.calibrate,
simulate.predict).
"""

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GiB = 2**30
MiB = 2**20
SECTIONS = ("links", "alpha", "compute_on", "figure8")


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The sizes of one run: full (a GPU, minutes) or smoke (the CPU, seconds).

  Attributes:
    transfer_bytes: bytes per host->device copy in `links` and `overlap`.
    matmul_n: side of the device matmul that a transfer overlaps with.
    cpu_matvec: [in, out] of the CPU-backend matvecs in `overlap`.
    chain_dim: side of each kernel in the `compute_on` chain.
    chain_layers: kernels in that chain.
    sweep: [in, out] of the alpha sweep's matrix.
    sweep_alphas: alphas of the sweep.
    model: synthetic model of Figure 8.
    prompt: prompt tokens of Figure 8.
    new_tokens: generated tokens of Figure 8.
    budgets_gib: device budgets of Figure 8, GiB.
    quick_profile: measure the machine with hetflow.bench.probes.measure's quick sizes.
    calibrate: measure the model's decode halves and layer copy on this machine
      (calibration.calibrate); its gather probe draws a 1 GiB pool whatever the
      model, ~40 s on a 2-core CPU, so smoke runs predict from the profile alone.
  """

  transfer_bytes: int
  matmul_n: int
  cpu_matvec: tuple[int, int]
  chain_dim: int
  chain_layers: int
  sweep: tuple[int, int]
  sweep_alphas: tuple[float, ...]
  model: str
  prompt: int
  new_tokens: int
  budgets_gib: tuple[float, ...]
  quick_profile: bool
  calibrate: bool


FULL = Sizes(transfer_bytes=256 * MiB, matmul_n=8192, cpu_matvec=(4096, 16384),
             chain_dim=4096, chain_layers=8, sweep=(4096, 16384),
             sweep_alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), model="opt-6.7b", prompt=512,
             new_tokens=64, budgets_gib=(1.0, 2.0, 4.0, 8.0), quick_profile=False, calibrate=True)
# opt-tiny in fp16 is 389 KiB; at 0.31 and 0.36 MiB both strategies keep part of it in
# host memory (tensor_split plans from 141 KiB, layerwise from 310 KiB).
SMOKE = Sizes(transfer_bytes=4 * MiB, matmul_n=256, cpu_matvec=(256, 1024), chain_dim=256,
              chain_layers=2, sweep=(256, 1024), sweep_alphas=(0.0, 0.5, 1.0), model="opt-tiny",
              prompt=16, new_tokens=8, budgets_gib=(0.31 / 1024, 0.36 / 1024),
              quick_profile=True, calibrate=False)


def _best(fn, repeats=3):
  fn()
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return min(out)


def _error(e: BaseException) -> str:
  return "".join(traceback.format_exception_only(e)).strip()


def _host_device():
  """Where tensor_split multiplies its CPU share: the CPU backend (its last device
  when the accelerator is itself a CPU, as tensor_split does)."""
  accel = jax.devices()[0]
  cpus = jax.devices("cpu")
  return cpus[-1] if accel.platform == "cpu" else cpus[0]


# -- links ---------------------------------------------------------------------


def bandwidth(nbytes):
  """Host->device GB/s from each kind of host array."""
  dev = jax.devices()[0]
  dst = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  out = {}
  host = np.ones(nbytes // 2, np.float16)
  for kind in ("pinned_host", "unpinned_host"):
    try:
      src = jax.device_put(host, jax.sharding.SingleDeviceSharding(dev, memory_kind=kind))
      out[kind] = nbytes / _best(lambda src=src: jax.device_put(src, dst).block_until_ready())
    except Exception as e:  # a backend without that memory kind
      out[kind] = _error(e)
  src = jax.device_put(host, jax.devices("cpu")[0])
  out["cpu_backend"] = nbytes / _best(lambda: jax.device_put(src, dst).block_until_ready())
  out["numpy"] = nbytes / _best(lambda: jax.device_put(host, dst).block_until_ready())
  return {k: (v / 1e9 if isinstance(v, float) else v) for k, v in out.items()}


def overlap(nbytes, n, cpu_matvec):
  """Seconds of a pinned transfer, a device matmul and CPU matvecs, alone and together."""
  dev = jax.devices()[0]
  dst = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  src = jax.device_put(np.ones(nbytes // 2, np.float16), pinned)
  a = jax.device_put(jnp.ones((n, n), jnp.float16), dst)
  mm = jax.jit(lambda a: (a @ a) @ a)
  cpu = jax.devices("cpu")[0]
  wc = jax.device_put(np.ones(cpu_matvec, np.float16), cpu)
  xc = jax.device_put(np.ones((1, cpu_matvec[0]), np.float16), cpu)
  cmv = jax.jit(lambda x, w: x @ w)
  t_x = _best(lambda: jax.device_put(src, dst).block_until_ready())
  t_mm = _best(lambda: mm(a).block_until_ready())
  t_cpu = _best(lambda: [cmv(xc, wc) for _ in range(8)][-1].block_until_ready())

  def both():
    y = jax.device_put(src, dst)
    z = mm(a)
    c = [cmv(xc, wc) for _ in range(8)][-1]
    jax.block_until_ready((y, z, c))

  t_both = _best(both)
  return dict(transfer_s=t_x, device_matmul_s=t_mm, cpu_matvecs_s=t_cpu, all_three_s=t_both,
              overlap=(t_x + t_mm + t_cpu) / t_both,
              sizes=dict(transfer_bytes=nbytes, device_matmul=[n, n, "float16", "(a@a)@a"],
                         cpu_matvecs=[8, *cpu_matvec, "float16"]))


def links(sizes: Sizes) -> dict:
  return dict(bandwidth_GBps=bandwidth(sizes.transfer_bytes),
              overlap=overlap(sizes.transfer_bytes, sizes.matmul_n, sizes.cpu_matvec))


# -- compute_on ----------------------------------------------------------------


def compute_on_split(dim: int, layers: int, alpha: float, repeats: int = 5,
                     dtype=jnp.float16) -> dict:
  """A chain of `layers` [dim, dim] kernels split at `alpha`, as tensor_split runs them,
  in two ways: today's two programs per kernel (the CPU backend multiplies its columns,
  the device multiplies the alpha columns it copies from host memory, a join on the
  device), and ONE jitted function whose CPU share runs under
  `compute_on("device_host")` on weights in the device's pinned host memory.

  Returns:
    {"compiled": bool, "error": str (when not), "two_program_s", "one_program_s",
     "speedup", "max_abs_diff", ...}; timings are the best of `repeats` chains.
  """
  accel = jax.devices()[0]
  host = _host_device()
  device = jax.sharding.SingleDeviceSharding(accel, memory_kind="device")
  cut = min(dim, max(0, round(alpha * dim)))
  rng = np.random.default_rng(0)
  ws = [(rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(dtype)
        for _ in range(layers)]
  x0 = rng.standard_normal((1, dim), dtype=np.float32).astype(dtype)
  out = dict(dim=dim, layers=layers, alpha=alpha, cut=cut, dtype=jnp.dtype(dtype).name,
             device=str(accel), cpu_side=str(host))

  # Today's split: the weights of both sides on the CPU backend (tensor_split's host
  # columns), per kernel one CPU program and one device program, joined on the device.
  dev_cols = [jax.device_put(w[:, :cut], host) for w in ws]
  cpu_cols = [jax.device_put(w[:, cut:], host) for w in ws]
  mm = jax.jit(lambda x, w: x @ w)
  join = jax.jit(lambda a, b: jnp.concatenate([a, b], axis=-1))

  def two_programs():
    x = jax.device_put(x0, device)
    for wd, wc in zip(dev_cols, cpu_cols):
      parts = []
      if cut < dim:
        parts.append(jax.device_put(mm(jax.device_put(x, host), wc), device))
      if cut:
        parts.insert(0, mm(x, jax.device_put(wd, device)))
      x = join(*parts) if len(parts) == 2 else parts[0]
    return x.block_until_ready()

  out["two_program_s"] = _best(two_programs, repeats)
  want = np.asarray(two_programs(), np.float32)
  try:
    from jax.experimental.compute_on import compute_on

    pinned = jax.sharding.SingleDeviceSharding(accel, memory_kind="pinned_host")
    dev_host = [jax.device_put(w[:, :cut], pinned) for w in ws]
    cpu_host = [jax.device_put(w[:, cut:], pinned) for w in ws]

    @compute_on("device_host")
    @jax.jit
    def host_mm(x, w):
      return x @ w

    @jax.jit
    def one_program(x, dev_w, cpu_w):
      for wd, wc in zip(dev_w, cpu_w):
        parts = []
        if cut:
          parts.append(x @ jax.device_put(wd, device))
        if cut < dim:
          parts.append(jax.device_put(host_mm(jax.device_put(x, pinned), wc), device))
        x = jnp.concatenate(parts, axis=-1) if len(parts) == 2 else parts[0]
      return x

    x_dev = jax.device_put(x0, device)
    t0 = time.perf_counter()
    got = one_program(x_dev, dev_host, cpu_host).block_until_ready()
    out["one_program_compile_s"] = time.perf_counter() - t0
    out["compiled"] = True
    out["output_memory_kind"] = getattr(got.sharding, "memory_kind", None)
    out["max_abs_diff"] = float(np.abs(np.asarray(got, np.float32) - want).max())
    out["one_program_s"] = _best(
        lambda: one_program(x_dev, dev_host, cpu_host).block_until_ready(), repeats)
    out["speedup"] = out["two_program_s"] / out["one_program_s"]
  except Exception as e:  # not supported on this backend / jax: that is the finding
    out["compiled"] = False
    out["error"] = _error(e)[-2000:]
  return out


# -- Figure 8 ------------------------------------------------------------------


class PrefilledSource:
  """A model's tensors, each generated once (in parallel threads) and kept in RAM.

  Synthetic weights are generated per tensor from (seed, name) on every read, about
  75 MB/s on one core here: OPT-6.7B would take minutes for each of the eight engines
  of Figure 8. numpy's generators release the GIL, so threads generate in parallel;
  the bits are the synthetic model's own.
  """

  def __init__(self, model, workers: int | None = None):
    names = list(model.shapes)
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
      self._arrays = dict(zip(names, pool.map(model.tensor, names)))

  def get(self, name: str, dtype) -> np.ndarray:
    array = self._arrays[name]
    return array if array.dtype == dtype else array.astype(dtype)


def _plain(value):
  """Strategy stats as JSON-able data (a dict today, a dataclass after issue 10)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return dataclasses.asdict(value)
  return value


def run_strategy(model, name, options, device_gib, profile, prompt_len, new_tokens):
  """One Figure 8 row: build the engine, generate (again if that compiled), predict."""
  import hetflow
  from hetflow import simulate

  device_bytes = int(device_gib * GiB)
  row = dict(strategy=name, options=options, device_gib=device_gib, device_bytes=device_bytes)
  start = time.perf_counter()
  engine = None
  try:
    engine = hetflow.Engine(model, name, budget=hetflow.Budget(device=device_bytes),
                            options=options, profile=profile)
    row["build_s"] = time.perf_counter() - start
    row["placement_bytes"] = engine.placement.bytes_per_tier()
    vocab = min(1000, model.config.vocab_size)
    ids = np.random.default_rng(0).integers(3, vocab, (1, prompt_len)).astype(np.int32)
    out = engine.generate(ids, max_new_tokens=new_tokens, stop_tokens=())
    row["generations"] = 1
    if out.stats["recompilations"]:  # the first one compiled: measure warm
      out = engine.generate(ids, max_new_tokens=new_tokens, stop_tokens=())
      row["generations"] = 2
    s = out.stats
    total = s["prefill_s"] + s["decode_s"]
    row.update(ttft_s=s["prefill_s"], decode_tokens_per_s=s["decode_tokens_per_s"],
               throughput=new_tokens / total, recompilations=s["recompilations"],
               strategy_stats=_plain(s["strategy"]),
               ledger_peak_device=s["ledger"]["tiers"]["device"]["peak"])
    stats = jax.devices()[0].memory_stats()
    row["process_peak_bytes_in_use"] = stats.get("peak_bytes_in_use") if stats else None
    pred = simulate.predict(model, engine.placement, profile, 1, prompt_len, new_tokens)
    row.update(predicted_ttft_s=pred.prefill_s,
               predicted_decode_tokens_per_s=pred.decode_tokens_per_s,
               predicted_throughput=pred.throughput, predicted_bound_by=pred.bottleneck)
    row["measured_over_predicted"] = dict(
        ttft=row["ttft_s"] / pred.prefill_s,
        decode_tokens_per_s=row["decode_tokens_per_s"] / pred.decode_tokens_per_s)
  except Exception as e:
    row["error"] = _error(e)
    minimum = getattr(e, "minimum", None)
    if minimum:
      row["minimum_device_gib"] = minimum / GiB
  finally:
    if engine is not None:
      engine.close()
    del engine
    gc.collect()
  row["wall_s"] = time.perf_counter() - start
  return row


def figure8(sizes: Sizes, save, deadline: float | None) -> dict:
  """HeteGen's Figure 8 rows; `save(partial)` after each step."""
  import hetflow
  from hetflow import costmodel
  from hetflow.bench import calibration, probes

  result = dict(model=sizes.model, dtype="float16", batch=1, prompt=sizes.prompt,
                new_tokens=sizes.new_tokens, budgets_gib=list(sizes.budgets_gib))
  t0 = time.perf_counter()
  base = hetflow.synthetic_model(sizes.model, dtype=jnp.float16)
  model = dataclasses.replace(base, source=PrefilledSource(base))
  result["generate_weights_s"] = time.perf_counter() - t0
  save(result)
  t0 = time.perf_counter()
  settings = None
  if not sizes.quick_profile:  # the disk is not used here: a small sweep of it
    settings = probes.MeasureSettings(disk_file_bytes=64 * MiB, disk_block_sizes=(MiB,),
                                        disk_queue_depths=(1, 8), disk_max_requests=64)
  profile = probes.measure("/tmp", quick=sizes.quick_profile, settings=settings,
                             progress=False, name="this-gpu-machine")
  result["profile_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  if not sizes.calibrate:
    result["calibration"] = "skipped (smoke): predictions from the profile's rates alone"
  else:
    try:
      # This model's halves and layer copy measured on this GPU, as the planner does on
      # the machine it plans for.
      profile = calibration.calibrate(model, profile)
      result["calibration"] = calibration.summary(profile, model)
    except Exception as e:
      result["calibration"] = "failed: " + _error(e)
  result["calibrate_s"] = time.perf_counter() - t0
  result["profile"] = profile.to_dict()
  result["rates"] = dict(
      link_pinned_GBps=profile.link_bw(True) / 1e9,
      link_unpinned_GBps=profile.link_bw(False) / 1e9,
      cpu_matvec_GBps={k: v / 1e9 for k, v in profile.cpu_matvec_bw.items()},
      device_matvec_GBps={k: v / 1e9 for k, v in profile.device_matvec_bw.items()},
      decode_alpha=costmodel.phase_alpha(profile, 1, model.dtype),
      prefill_alpha=costmodel.phase_alpha(profile, sizes.prompt, model.dtype))
  save(result)
  prompt, new = sizes.prompt, sizes.new_tokens
  rows, last_wall = [], {}
  result["runs"] = rows
  for gib in sizes.budgets_gib:
    for strategy, options in (
        ("tensor_split", dict(prompt_len=prompt, kv_reserve_tokens=prompt + new)),
        ("layerwise", dict(offload_tier="host", resident_layers="auto",
                           kv_reserve_tokens=prompt + new))):
      estimate = last_wall.get(strategy)
      if deadline and estimate and time.time() + estimate > deadline:
        rows.append(dict(strategy=strategy, options=options, device_gib=gib,
                         skipped=f"deadline: ~{estimate:.0f} s needed, "
                                 f"{deadline - time.time():.0f} s left"))
        continue
      row = run_strategy(model, strategy, options, gib, profile, prompt, new)
      if "error" not in row:
        last_wall[strategy] = row["wall_s"]
      print(json.dumps({k: v for k, v in row.items() if k != "strategy_stats"}, default=str),
            flush=True)
      rows.append(row)
      save(result)
  ratios, predicted = {}, {}
  for gib in sizes.budgets_gib:
    pair = {r["strategy"]: r for r in rows if r["device_gib"] == gib and "throughput" in r}
    if len(pair) == 2:
      ratios[str(gib)] = pair["tensor_split"]["throughput"] / pair["layerwise"]["throughput"]
      predicted[str(gib)] = (pair["tensor_split"]["predicted_throughput"]
                             / pair["layerwise"]["predicted_throughput"])
  result["tensor_split_over_layerwise"] = ratios
  result["predicted_tensor_split_over_layerwise"] = predicted
  if ratios:
    smallest = min(ratios, key=float)
    result["smallest_common_budget_gib"] = float(smallest)
    result["ratio_at_smallest_common_budget"] = ratios[smallest]
    result["meets_hetegen_2_5x"] = ratios[smallest] >= 2.5
  print("tensor_split / layerwise throughput by budget (GiB):", ratios,
        "predicted:", predicted, flush=True)
  return result


# -- main ----------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="gpu_tensor_split.json")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU ok, seconds")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated, from {SECTIONS}")
  parser.add_argument("--budgets_gib", default=None, help="Figure 8 budgets, e.g. 1,2,4,8")
  parser.add_argument("--deadline", type=float, default=None,
                      help="Unix time by which Figure 8 must end (rows that would not fit "
                           "are skipped)")
  args = parser.parse_args()
  sections = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    parser.error(f"unknown sections {unknown}; choose from {SECTIONS}.")
  sizes = SMOKE if args.smoke else FULL
  if args.budgets_gib:
    sizes = dataclasses.replace(
        sizes, budgets_gib=tuple(float(b) for b in args.budgets_gib.split(",")))

  import strategies  # noqa: F401  (registers the built-ins when run without entry points)
  from hetflow.bench import alpha

  result = dict(mode="smoke" if args.smoke else "full", sizes=dataclasses.asdict(sizes),
                devices=[str(d) for d in jax.devices()], backend=jax.default_backend(),
                jax=jax.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), seconds={})

  def save(_=None):
    tmp = args.out + ".partial"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1, default=str)
    os.replace(tmp, args.out)

  def save_figure8(partial):
    result["figure8"] = partial
    save()

  for section in SECTIONS:
    if section not in sections:
      continue
    t0 = time.perf_counter()
    print(f"== {section}", flush=True)
    try:
      if section == "links":
        result[section] = links(sizes)
      elif section == "compute_on":
        # At the HeteGen alpha of the sweep's rates when the sweep ran, else halves.
        alpha = result.get("alpha", {}).get("formula_alpha")
        result[section] = compute_on_split(sizes.chain_dim, sizes.chain_layers,
                                           0.5 if alpha is None else alpha)
        result[section]["alpha_from"] = "half" if alpha is None else "alpha sweep's formula"
      elif section == "alpha":
        result[section] = alpha.alpha_sweep(*sizes.sweep, alphas=sizes.sweep_alphas,
                                         dtype=jnp.float16)
      else:
        result[section] = figure8(sizes, save_figure8, args.deadline)
    except Exception as e:
      result[section] = dict(error=_error(e), traceback=traceback.format_exc()[-4000:])
    result["seconds"][section] = time.perf_counter() - t0
    shown = {k: v for k, v in result[section].items() if k not in ("rows", "runs", "profile")}
    print(section, json.dumps(shown, default=str)[:2000], flush=True)
    save()
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
