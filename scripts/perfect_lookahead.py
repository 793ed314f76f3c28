"""What bounds neuron_cluster's decode: a perfect look-ahead, and a free disk. Measured.

  python scripts/perfect_lookahead.py --config=configs/bench/llama1b_sparse.py \
      --system=nc_prefill --rounds=2 --modes=none,replay,ram --out=/tmp/perfect_lookahead.json

The look-ahead (`lookahead=True`) starts layer i+1's reads while layer i computes, from a
guess; on llama-1b-sparse no guess is precise (`experiments.guess_audit`). This script
asks what a perfect one would give, and what no disk at all would give. Each mode is a
process that decodes the benchmark's requests from the same start:
- `none`: the system as it is;
- `replay`: a first process (`record`) saves, for every decode step and layer, the set
  the system's predictor selected; `replay` reads the recorded set of layer i+1 while
  layer i computes (layer 0's while the previous token's last layer computes), as
  `lookahead` would read a perfect guess. Decoding is deterministic, so the replayed sets
  are exactly the sets each step selects: the same records read, only earlier;
- `ram`: the system's store copied into memory (a tmpfs, `--ram_dir`), so that a read
  is a copy from RAM (a tmpfs refuses O_DIRECT: the reader falls back to buffered reads).
  The same schedule and bytes; what is left of the token is the host's work and the
  device's.
The script checks that every process decoded the same tokens, and reports the records
read ahead and late. The modes alternate `--rounds` times, one process each, to expose
the machine's drift.

Not systems: the guess comes from a run of the same requests, and the RAM store is held
outside every budget. They bound what any look-ahead or faster disk can gain on this
machine, so as to tell whether better guessing or reading is worth building. The token's
waits and the decode thread's CPU are reported per mode.
Hardware: the machine the benchmark runs on, nothing else running (timed; ~1-3 min a
process on llama-1b-sparse); the predictor and store of the benchmark's config; for
`ram`, a tmpfs with room for the store (3.1 GB on llama-1b-sparse).
Expect on llama-1b-sparse, nc_prefill, this 2-core machine, alternating in one run
(eighteenth session): `none` 151-200 ms a token, the reads' waits 37-51; `replay` 132-169,
waits ~10; `ram` 145-157, waits ~9 (the copies run on the decode thread: its CPU 54-59
ms a token, against 45-65).
Over 2x the limit (~0.064 s) either way: the decode is bound by the host's work and the
device's, in series, not by the disk (WORKSPACE_NOTES.md, fourteenth and eighteenth
sessions).
"""

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NEW_TOKENS = 33  # the first comes from the prefill: 32 decode steps a request


def load_config(path, smoke):
  from hetflow.config import apply_smoke, load_config_file

  config = load_config_file(path)
  return apply_smoke(config) if smoke else config


def install_replay(cls, mode, sets):
  """Patches NeuronCluster so that `record` saves each step's selected set per layer
  (in `sets`) and `replay` reads the recorded set of the next layer (at the last layer:
  layer 0's of the next step) as its look-ahead."""
  predict, look_ahead, begin = cls._predict, cls._look_ahead, cls.begin
  calls = {}

  def _predict(self, layer, x, h, before_wait=None):
    active, guess = predict(self, layer, x, h, before_wait)
    step = calls.get(layer, 0)
    calls[layer] = step + 1
    if mode == "record":
      sets.setdefault(layer, []).append(active.copy())
    elif mode == "replay":
      nxt, nxt_step = (layer + 1, step) if layer + 1 < self.config.num_layers else (0, step + 1)
      recorded = sets.get(nxt, [])
      guess = recorded[nxt_step] if nxt_step < len(recorded) else None
    return active, guess

  def _look_ahead(self, layer, guess):
    # The last layer's guess is layer 0's of the next step; its area (0) was last used by
    # the layer before the last, whose computations fed the last layer's input.
    return look_ahead(self, layer % self.config.num_layers, guess)

  def _begin(self, phase, num_tokens):
    kept = self._ahead.pop(0, None) if num_tokens == 1 else None
    begin(self, phase, num_tokens)
    if kept is not None:  # a decode step keeps layer 0's reads started by the step before
      self._ahead[0] = kept

  cls._predict = _predict
  if mode == "replay":
    cls._look_ahead, cls.begin = _look_ahead, _begin


def run(args):
  """One process: the benchmark's requests, the measured ones' figures as JSON lines."""
  import numpy as np

  from hetflow import config as config_lib
  from hetflow.bench.process import prompt_ids
  from hetflow.engine import Engine
  from strategies.neuron_cluster.strategy import NeuronCluster

  bench = load_config(args.config, args.smoke)
  model = config_lib.build_model(bench.model)
  sets = {}
  if args.mode == "replay":
    with open(args.sets, "rb") as f:
      sets = pickle.load(f)
  install_replay(NeuronCluster, args.mode, sets)
  system = bench.systems[args.system]
  prompt = prompt_ids(model.config.vocab_size, bench.prompt_tokens)
  warm = prompt_ids(model.config.vocab_size, bench.prompt_tokens, seed=1)
  steps = NEW_TOKENS - 1
  results, tokens = [], []
  options = dict(system.options.to_dict())
  if args.mode == "ram":
    options["store_dir"] = args.store_dir
  with Engine(model, system.strategy, budget=config_lib.build_budget(bench.budget),
              options=options) as engine:
    st = engine.strategy
    engine.generate(warm, max_new_tokens=NEW_TOKENS, stop_tokens=())  # compiles, warms
    for _ in range(args.requests):
      engine.generate(warm, max_new_tokens=8, stop_tokens=())  # another request between
      waits = dict(st._timer)
      counts = {k: st.counters.decode.get(k) for k in ("ahead_used", "late_reads", "disk_bytes")}
      out = engine.generate(prompt, max_new_tokens=NEW_TOKENS, stop_tokens=())
      tokens.append(np.asarray(out.tokens).tolist())
      per = {k: (st.counters.decode.get(k) - v) / steps for k, v in counts.items()}
      results.append(dict(
          ms_per_token=out.stats["decode_s"] / steps * 1e3,
          host_cpu_ms=out.stats["decode_host_cpu_s"] / steps * 1e3,
          wait_read_ms=(st._timer["wait_read_s"] - waits.get("wait_read_s", 0)) / steps * 1e3,
          wait_input_ms=(st._timer["wait_input_s"] - waits.get("wait_input_s", 0)) / steps * 1e3,
          records_ahead=per["ahead_used"], records_late=per["late_reads"],
          mb_read=per["disk_bytes"] / 1e6))
  if args.mode == "record":
    with open(args.sets, "wb") as f:
      pickle.dump(sets, f)
  digest = hashlib.md5(json.dumps(tokens).encode()).hexdigest()
  print(json.dumps(dict(mode=args.mode, tokens=digest, requests=results)), flush=True)


MODES = ("none", "replay", "ram")


def ram_store(system, ram_dir, tmp):
  """A directory in RAM (`ram_dir`, a tmpfs) for the `ram` mode's store, under `tmp`: a
  copy of the system's store, or empty (the first `ram` process writes it there) where
  the system has none yet. Exits with what to do if it does not fit."""
  dest = os.path.join(tmp, "store")
  source = system.options.get("store_dir")
  if not source or not os.path.isdir(source) or not os.listdir(source):
    os.mkdir(dest)
    return dest
  from hetflow.memory.store import InsufficientDiskSpaceError, check_free_space

  need = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(source) for f in fs)
  try:
    check_free_space(dest, need)
  except InsufficientDiskSpaceError as e:
    sys.exit(f"--ram_dir={ram_dir}: {e}")
  shutil.copytree(source, dest)
  return dest


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/bench/llama1b_sparse.py")
  parser.add_argument("--system", default="nc_prefill")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--requests", type=int, default=3, help="measured requests a process")
  parser.add_argument("--modes", default="none,replay",
                      help=f"comma-separated, run in turn each round: {', '.join(MODES)}")
  parser.add_argument("--ram_dir", default="/dev/shm",
                      help="the tmpfs the ram mode copies the store into (removed after)")
  parser.add_argument("--out", default="")
  parser.add_argument("--smoke", action="store_true",
                      help="the config's seconds-long variant (tests; its system, e.g. nc_lookahead)")
  parser.add_argument("--mode", choices=("record",) + MODES, help=argparse.SUPPRESS)
  parser.add_argument("--sets", help=argparse.SUPPRESS)
  parser.add_argument("--store_dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.mode:
    return run(args)
  from hetflow.config import ConfigError

  modes = [m for m in args.modes.split(",") if m]
  if not modes or set(modes) - set(MODES):
    sys.exit(f"--modes={args.modes}: expected a comma-separated list of {', '.join(MODES)}")
  try:
    systems = load_config(args.config, args.smoke).systems
  except ConfigError as e:
    sys.exit(str(e))
  if systems.get(args.system, {}).get("strategy") != "neuron_cluster":
    names = [n for n, s in systems.items() if s.get("strategy") == "neuron_cluster"]
    sys.exit(f"--system={args.system}: not a neuron_cluster row of {args.config}; its rows: {names}")
  if "ram" in modes and not os.path.isdir(args.ram_dir):
    sys.exit(f"--ram_dir={args.ram_dir}: no such directory; the ram mode needs a tmpfs"
             " (e.g. /dev/shm) with room for the store")
  with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
    sets = os.path.join(tmp, "sets.pkl")
    store = None
    if "ram" in modes:
      ram = stack.enter_context(tempfile.TemporaryDirectory(dir=args.ram_dir, prefix="hetflow-"))
      store = ram_store(systems[args.system], args.ram_dir, ram)
    rows = []
    for mode in ["record"] * ("replay" in modes) + modes * args.rounds:
      print(f"{mode} ...", file=sys.stderr, flush=True)
      cmd = [sys.executable, __file__, f"--config={args.config}", f"--system={args.system}",
             f"--requests={args.requests}", f"--mode={mode}", f"--sets={sets}"]
      cmd += ["--smoke"] if args.smoke else []
      cmd += [f"--store_dir={store}"] if mode == "ram" else []
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode:
        sys.exit(f"the {mode} process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  if len({r["tokens"] for r in rows}) != 1:
    sys.exit("the processes decoded different tokens: the modes did not do the same work"
             f" ({[(r['mode'], r['tokens']) for r in rows]})")
  keys = list(rows[0]["requests"][0])
  print("| mode | " + " | ".join(keys) + " |")
  print("|---" * (len(keys) + 1) + "|")
  for r in rows:
    if r["mode"] == "record":
      continue
    cells = [" / ".join(f"{q[k]:.1f}" for q in r["requests"]) for k in keys]
    print(f"| {r['mode']} | " + " | ".join(cells) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
