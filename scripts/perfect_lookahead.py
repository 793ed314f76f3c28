"""How fast would neuron_cluster decode with a perfect look-ahead? An upper bound, measured.

  python scripts/perfect_lookahead.py --config=configs/bench/llama1b_sparse.py \
      --system=nc_prefill --rounds=2 --out=/tmp/perfect_lookahead.json

The look-ahead (`lookahead=True`) starts layer i+1's reads while layer i computes, from a
guess; on llama-1b-sparse no guess is precise (`experiments.guess_audit`). This script
asks what a perfect one would give. A first process (`record`) decodes the benchmark's
requests and saves, for every decode step and layer, the set the system's predictor
selected. Later processes decode the same requests from the same start: `none` as the
system is, `replay` with the recorded set of layer i+1 read while layer i computes (layer
0's while the previous token's last layer computes), as `lookahead` would read a perfect
guess. Decoding is deterministic, so the replayed sets are exactly the sets each step
selects: the same records read, only earlier (the script checks that every process
decoded the same tokens, and reports the records read ahead and late). The two modes
alternate `--rounds` times, one process each, to expose the machine's drift.

Not a system: the guess comes from a run of the same requests. It bounds what any
look-ahead can gain on this machine, so as to tell whether better guessing is worth
building. The token's waits and the decode thread's CPU are reported per mode.
Hardware: the machine the benchmark runs on, nothing else running (timed; ~3 min a
process on llama-1b-sparse); the predictor and store of the benchmark's config.
Expect on llama-1b-sparse, nc_prefill, this 2-core machine: the reads' waits fall from
~40 to ~10 ms a token and the token from ~205 to ~188 ms (8-10%), the same tokens and bytes:
the decode is bound by the host's work and the device's, in series, not by the disk
(WORKSPACE_NOTES.md, fourteenth session).
"""

import argparse
import hashlib
import json
import os
import pickle
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
  with Engine(model, system.strategy, budget=config_lib.build_budget(bench.budget),
              options=dict(system.options.to_dict())) as engine:
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/bench/llama1b_sparse.py")
  parser.add_argument("--system", default="nc_prefill")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--requests", type=int, default=3, help="measured requests a process")
  parser.add_argument("--out", default="")
  parser.add_argument("--smoke", action="store_true",
                      help="the config's seconds-long variant (tests; its system, e.g. nc_lookahead)")
  parser.add_argument("--mode", choices=("record", "none", "replay"), help=argparse.SUPPRESS)
  parser.add_argument("--sets", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.mode:
    return run(args)
  from hetflow.config import ConfigError

  try:
    systems = load_config(args.config, args.smoke).systems
  except ConfigError as e:
    sys.exit(str(e))
  if systems.get(args.system, {}).get("strategy") != "neuron_cluster":
    names = [n for n, s in systems.items() if s.get("strategy") == "neuron_cluster"]
    sys.exit(f"--system={args.system}: not a neuron_cluster row of {args.config}; its rows: {names}")
  with tempfile.TemporaryDirectory() as tmp:
    sets = os.path.join(tmp, "sets.pkl")
    rows = []
    for mode in ["record"] + ["none", "replay"] * args.rounds:
      print(f"{mode} ...", file=sys.stderr, flush=True)
      cmd = [sys.executable, __file__, f"--config={args.config}", f"--system={args.system}",
             f"--requests={args.requests}", f"--mode={mode}", f"--sets={sets}"]
      cmd += ["--smoke"] if args.smoke else []
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode:
        sys.exit(f"the {mode} process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  if len({r["tokens"] for r in rows}) != 1:
    sys.exit("the processes decoded different tokens: the replay is not a perfect guess"
             f" ({[(r['mode'], r['tokens']) for r in rows]})")
  keys = list(rows[0]["requests"][0])
  print("| mode | " + " | ".join(keys) + " |")
  print("|---" * (len(keys) + 1) + "|")
  for r in rows[1:]:
    cells = [" / ".join(f"{q[k]:.1f}" for q in r["requests"]) for k in keys]
    print(f"| {r['mode']} | " + " | ".join(cells) + " |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
