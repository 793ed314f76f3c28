"""The two bookends of scripts/gpu_check.sh: what the machine is, and the one report.

  python scripts/gpu_check_report.py env --mode=full --out=$OUT/env.json
  python scripts/gpu_check_report.py assemble --mode=full --dir=$OUT --steps=... --budget=...

`env` records the machine (devices, memory kinds, versions, nvidia-smi) and exits 2 in full
mode when jax has no GPU backend, so a misconfigured run stops in seconds instead of
measuring the CPU at full size. `assemble` merges the step outputs in --dir (env.json,
gpu_tests.xml and gpu_tests.jsonl from pytest, gpu_tensor_split.json) into gpu_check.json:

  environment  the env record
  steps        per step: exit code, seconds, budgeted seconds
  exactness    pytest's counts and failures; `tokens` (one record per strategy x model:
               tokens_equal, max_abs_logit_diff, ledger peak, budget) and `memory` (one
               per strategy: the ledger against memory_stats(), or why there is none)
  links, alpha, compute_on, figure8   from scripts/gpu_tensor_split.py
  expected     the sections this run was asked for (gpu_check.sh --sections, --skip-tests)
  missing      expected sections absent or failed (Figure 8 also when no budget has both
               strategies' rows); empty when the run is complete
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

SECTIONS = ("links", "alpha", "compute_on", "figure8")


def _run(cmd):
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError) as e:
    return f"unavailable: {e!r}"


def environment(mode: str) -> dict:
  """What this run ran on."""
  import jax

  devices = jax.devices()
  dev = devices[0]
  try:
    kinds = [m.kind for m in dev.addressable_memories()]
  except Exception as e:  # a backend without the memories API
    kinds = [f"unavailable: {e!r}"]
  stats = dev.memory_stats()
  with open("/proc/meminfo") as f:
    ram = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return dict(
      mode=mode, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), python=sys.version.split()[0],
      jax=jax.__version__, jaxlib=_jaxlib_version(),
      backend=jax.default_backend(), devices=[str(d) for d in devices],
      device_kind=dev.device_kind, memory_kinds=kinds,
      bytes_limit=(stats or {}).get("bytes_limit"),
      cpu_devices=[str(d) for d in jax.devices("cpu")], cores=os.cpu_count(), host_ram=ram,
      cpu=_run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-"]).strip()
      or platform.processor(),
      nvidia_smi=_run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                       "pcie.link.gen.current,pcie.link.width.current,clocks.max.sm",
                       "--format=csv,noheader"]),
      env={k: os.environ.get(k) for k in ("JAX_PLATFORMS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                           "XLA_FLAGS", "PYTHONPATH")},
      commit=_run(["git", "-C", root, "rev-parse", "HEAD"]))


def _jaxlib_version():
  try:
    import jaxlib

    return jaxlib.__version__
  except Exception:
    return None


def pytest_summary(path: str) -> dict:
  """Counts and failures from pytest's junit xml."""
  if not os.path.exists(path):
    return dict(error=f"{os.path.basename(path)} missing: pytest did not finish")
  root = ET.parse(path).getroot()
  suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
  out = dict(tests=0, failures=0, errors=0, skipped=0)
  for s in suites:
    for key in out:
      out[key] += int(s.get(key, 0))
  out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
  out["failed"] = []
  for case in root.iter("testcase"):
    for tag in ("failure", "error"):
      node = case.find(tag)
      if node is not None:
        out["failed"].append(dict(test=case.get("name"), kind=tag,
                                  message=(node.get("message") or "")[:1000]))
  return out


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def assemble(directory: str, mode: str, steps: dict, budget: dict,
             expect: tuple[str, ...] = ("exactness",) + SECTIONS) -> dict:
  report = dict(mode=mode, environment=_load(os.path.join(directory, "env.json")))
  report["steps"] = {name: dict(steps.get(name, {}), budget_s=budget.get(name))
                     for name in sorted(set(steps) | set(budget))}
  records = []
  path = os.path.join(directory, "gpu_tests.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  report["exactness"] = dict(
      pytest=pytest_summary(os.path.join(directory, "gpu_tests.xml")),
      tokens=[r for r in records if r.get("check") == "tokens"],
      memory=[r for r in records if r.get("check") == "memory"])
  split = _load(os.path.join(directory, "gpu_tensor_split.json")) or {}
  for section in SECTIONS:
    report[section] = split.get(section)
  report["section_seconds"] = split.get("seconds", {})
  missing = []
  p = report["exactness"]["pytest"]
  if "exactness" in expect and ("error" in p or p["failures"] or p["errors"]
                                or not report["exactness"]["tokens"]):
    missing.append("exactness")
  missing += [s for s in SECTIONS if s in expect and (not report[s] or "error" in report[s])]
  # Figure 8 without one budget at which both strategies ran has no result to report.
  if ("figure8" in expect and "figure8" not in missing
      and not report["figure8"].get("tensor_split_over_layerwise")):
    missing.append("figure8")
  report["expected"] = list(expect)
  report["missing"] = missing
  return report


def headline(report: dict) -> dict:
  """The figures to read first, short enough for the end of a log."""
  def get(*keys):
    node = report
    for k in keys:
      if not isinstance(node, dict) or k not in node:
        return None
      node = node[k]
    return node

  memory = {r["strategy"]: (round(r["device_peak"] / r["ledger_device_peak"], 3)
                            if r.get("device_peak") is not None else "no memory_stats")
            for r in get("exactness", "memory") or []}
  tokens = get("exactness", "tokens") or []
  return dict(
      tokens_equal=f"{sum(bool(r['tokens_equal']) for r in tokens)}/{len(tokens)}",
      device_peak_over_ledger_peak=memory,
      link_GBps=get("links", "bandwidth_GBps"), overlap=get("links", "overlap", "overlap"),
      formula_alpha=get("alpha", "formula_alpha"), best_alpha=get("alpha", "best_alpha"),
      compute_on=dict(compiled=get("compute_on", "compiled"),
                      speedup=get("compute_on", "speedup"),
                      error=(get("compute_on", "error") or "")[:200] or None),
      figure8_ratio=get("figure8", "tensor_split_over_layerwise"),
      figure8_predicted_ratio=get("figure8", "predicted_tensor_split_over_layerwise"),
      skipped_rows=[(r["strategy"], r["device_gib"]) for r in get("figure8", "runs") or []
                    if "skipped" in r or "error" in r])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("command", choices=("env", "assemble"))
  parser.add_argument("--mode", choices=("full", "smoke"), required=True)
  parser.add_argument("--out", help="env: the JSON file to write")
  parser.add_argument("--dir", help="assemble: the folder of the step outputs")
  parser.add_argument("--steps", default="{}", help='assemble: {"step": {"rc", "seconds"}}')
  parser.add_argument("--budget", default="{}", help='assemble: {"step": seconds budgeted}')
  parser.add_argument("--expect", default=",".join(("exactness",) + SECTIONS),
                      help="assemble: the sections this run was asked for ('none': none)")
  args = parser.parse_args()
  if args.command == "env":
    env = environment(args.mode)
    with open(args.out, "w") as f:
      json.dump(env, f, indent=1)
    print(json.dumps(env, indent=1))
    if args.mode == "full" and env["backend"] not in ("gpu", "cuda", "rocm"):
      print(f"full mode needs a GPU; jax's default backend is {env['backend']!r}"
            f" (JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}).", file=sys.stderr)
      sys.exit(2)
    return
  expect = tuple(s for s in args.expect.split(",") if s and s != "none")
  report = assemble(args.dir, args.mode, json.loads(args.steps), json.loads(args.budget), expect)
  path = os.path.join(args.dir, "gpu_check.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1, default=str)
  print(json.dumps(headline(report), default=str))
  p = report["exactness"]["pytest"]
  print(f"wrote {path}: tests {p.get('passed')} passed, {len(p.get('failed', []))} failed;"
        f" missing sections: {report['missing'] or 'none'}")
  sys.exit(1 if report["missing"] else 0)


if __name__ == "__main__":
  main()
