"""Everything tensor-split needs a GPU for, in one call (one prepared script per GPU session).

  python scripts/gpu_tensor_split.py --out=$OUT/gpu_tensor_split.json
  python scripts/gpu_tensor_split.py --smoke --out=/tmp/smoke.json   # CPU, tiny, seconds

Measures, on the jax default device (a GPU):
  1. host->device bandwidth from pinned and unpinned host memory, and from a
     CPU-backend array (what tensor_split's host columns are), 256 MiB each;
  2. overlap of a host->device transfer with a device matmul (and with a CPU
     matmul on the CPU backend): time of each alone and both together;
  3. HeteGen's setup: an OPT-6.7B-shaped synthetic model in fp16, batch 1,
     prompt 512, 64 new tokens; tensor_split and layerwise (host tier) at
     several device budgets: time to first token, decode tok/s, throughput,
     with the simulator's prediction (on a profile measured here, with the
     model's halves and layer copy calibrated on this GPU) beside each;
  4. the alpha sweep on one FFN-sized matrix.
Writes one JSON file. Expect (HeteGen on an A10): tensor_split >= 2.5x
layerwise at the smallest budget; on an H100 the link (PCIe 5) and the host
CPU differ, so compare the measured ratio with the predicted one.
"""

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _best(fn, repeats=3):
  fn()
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return min(out)


def bandwidth(nbytes):
  dev = jax.devices()[0]
  dst = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  out = {}
  host = np.ones(nbytes // 2, np.float16)
  for kind in ("pinned_host", "unpinned_host"):
    try:
      src = jax.device_put(host, jax.sharding.SingleDeviceSharding(dev, memory_kind=kind))
      out[kind] = nbytes / _best(lambda src=src: jax.device_put(src, dst).block_until_ready())
    except Exception as e:  # a backend without that memory kind
      out[kind] = repr(e)
  src = jax.device_put(host, jax.devices("cpu")[0])
  out["cpu_backend"] = nbytes / _best(lambda: jax.device_put(src, dst).block_until_ready())
  out["numpy"] = nbytes / _best(lambda: jax.device_put(host, dst).block_until_ready())
  return {k: (v / 1e9 if isinstance(v, float) else v) for k, v in out.items()}  # GB/s


def overlap(nbytes, n=8192):
  dev = jax.devices()[0]
  dst = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  src = jax.device_put(np.ones(nbytes // 2, np.float16), pinned)
  a = jax.device_put(jnp.ones((n, n), jnp.float16), dst)
  mm = jax.jit(lambda a: (a @ a) @ a)
  cpu = jax.devices("cpu")[0]
  wc = jax.device_put(np.ones((4096, 16384), np.float16), cpu)
  xc = jax.device_put(np.ones((1, 4096), np.float16), cpu)
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
              overlap=(t_x + t_mm + t_cpu) / t_both)


def run_strategy(model, name, options, device_bytes, profile, prompt_len, new_tokens):
  import hetflow
  from hetflow import simulate

  row = dict(strategy=name, options=options, device_gb=device_bytes / 1e9)
  try:
    engine = hetflow.Engine(model, name, budget=hetflow.Budget(device=device_bytes),
                            options=options, profile=profile)
    ids = np.random.default_rng(0).integers(3, 1000, (1, prompt_len)).astype(np.int32)
    engine.generate(ids, max_new_tokens=new_tokens, stop_tokens=())  # compile, same shapes
    out = engine.generate(ids, max_new_tokens=new_tokens, stop_tokens=())
    s = out.stats
    total = s["prefill_s"] + s["decode_s"]
    row.update(prefill_s=s["prefill_s"], decode_tokens_per_s=s["decode_tokens_per_s"],
               throughput=new_tokens / total, strategy_stats=s["strategy"],
               ledger_peak_device=s["ledger"]["tiers"]["device"]["peak"])
    stats = jax.devices()[0].memory_stats() or {}
    row["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    pred = simulate.predict(model, engine.placement, profile, 1, prompt_len, new_tokens)
    row.update(predicted_throughput=pred.throughput,
               predicted_decode_tokens_per_s=pred.decode_tokens_per_s,
               predicted_prefill_s=pred.prefill_s, predicted_bound_by=pred.bottleneck)
    engine.close()
    del engine
  except Exception as e:
    row["error"] = "".join(traceback.format_exception_only(e)).strip()
  return row


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="gpu_tensor_split.json")
  parser.add_argument("--smoke", action="store_true", help="tiny model, CPU ok, seconds")
  parser.add_argument("--budgets_gb", default="1,2,4,8")
  args = parser.parse_args()

  import hetflow
  from hetflow.bench import alpha, calibration, probes

  result = dict(devices=[str(d) for d in jax.devices()], jax=jax.__version__,
                date=time.strftime("%Y-%m-%d %H:%M"))
  nbytes = (16 if args.smoke else 256) << 20
  for key, fn in (("bandwidth_GBps", lambda: bandwidth(nbytes)),
                  ("overlap", lambda: overlap(nbytes, 1024 if args.smoke else 8192))):
    try:
      result[key] = fn()
    except Exception as e:
      result[key] = {"error": repr(e)}
    print(key, result[key], flush=True)
  profile = probes.measure("/tmp", quick=True, progress=False, name="this-gpu-machine")
  result["profile"] = profile.to_dict()
  try:
    result["alpha_sweep"] = alpha.alpha_sweep(4096 if not args.smoke else 256,
                                              16384 if not args.smoke else 1024,
                                              dtype=jnp.float16)
  except Exception as e:
    result["alpha_sweep"] = {"error": repr(e)}
  print("alpha sweep", {k: v for k, v in result["alpha_sweep"].items() if k != "rows"},
        flush=True)
  name = "opt-tiny" if args.smoke else "opt-6.7b"
  model = hetflow.synthetic_model(name, dtype=jnp.float16)
  # This model's halves and layer copies measured on this GPU, as the planner does
  # on the machine it plans for (hetflow/bench/calibration.py).
  try:
    profile = calibration.calibrate(model, profile)
    result["profile"] = profile.to_dict()
  except Exception as e:
    result["calibration_error"] = repr(e)
  prompt, new = (16, 8) if args.smoke else (512, 64)
  budgets = [0.002, 0.004] if args.smoke else [float(b) for b in args.budgets_gb.split(",")]
  rows = []
  for gb in budgets:
    for strategy, options in (
        ("tensor_split", dict(prompt_len=prompt, kv_reserve_tokens=prompt + new)),
        ("layerwise", dict(offload_tier="host", resident_layers="auto",
                           kv_reserve_tokens=prompt + new))):
      row = run_strategy(model, strategy, options, int(gb * 1e9), profile, prompt, new)
      print(json.dumps({k: v for k, v in row.items() if k != "strategy_stats"}), flush=True)
      rows.append(row)
  result["runs"] = rows
  ratios = {}
  for gb in budgets:
    pair = {r["strategy"]: r for r in rows if abs(r["device_gb"] - gb) < 1e-9}
    if all("throughput" in pair.get(s, {}) for s in ("tensor_split", "layerwise")):
      ratios[gb] = pair["tensor_split"]["throughput"] / pair["layerwise"]["throughput"]
  result["tensor_split_over_layerwise"] = ratios
  print("tensor_split / layerwise throughput by budget (GB):", ratios)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
