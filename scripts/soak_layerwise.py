"""Soak: many decoded tokens with layerwise from disk; does the process's memory stay flat?

  python scripts/soak_layerwise.py --tokens=10000 --every=500 --out=/tmp/soak.json
  python scripts/soak_layerwise.py --unbounded-timeline   # the leak issue 12 reported, for contrast

Generates up to `every` tokens per call (stop tokens off; fewer when the
model's positions are fewer) until `tokens` are decoded,
with one engine (llama-tiny, every layer streamed from a disk store with
O_DIRECT, trace=False), and samples the resident set size (VmRSS) and the
timeline's length every `every` tokens. Expect: RSS flat within 2 MiB after the
first samples (warm-up: compilations, the ring filling); with
--unbounded-timeline the timeline keeps 3 events per streamed layer per token
and RSS grows with the tokens.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=10_000)
  parser.add_argument("--every", type=int, default=500)
  parser.add_argument("--model", default="llama-tiny")
  parser.add_argument("--unbounded-timeline", action="store_true")
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  import numpy as np

  import hetflow
  from hetflow import engine as engine_lib

  if args.unbounded_timeline:
    engine_lib.UNTRACED_EVENTS = None
  model = hetflow.synthetic_model(args.model)
  prompt = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, 8))
  samples = []
  with tempfile.TemporaryDirectory(prefix="hetflow-soak-") as tmp:
    options = dict(offload_tier="disk", store_dir=os.path.join(tmp, "store"), prefetch_depth=1)
    with hetflow.Engine(model, "layerwise", options=options) as engine:
      # Calls stay within the model's positions (past them, rotary models warn).
      per_call = min(args.every, model.config.max_position_embeddings - prompt.shape[1] - 1)
      decoded, start = 0, time.perf_counter()
      while decoded < args.tokens:
        out = engine.generate(prompt, max_new_tokens=per_call + 1, stop_tokens=())
        before, decoded = decoded, decoded + out.stats["new_tokens"] - 1
        if decoded // args.every > before // args.every:
          samples.append({"tokens": decoded, "rss": rss_bytes(),
                          "timeline_events": len(engine.timeline.events),
                          "s": round(time.perf_counter() - start, 2)})
          print(json.dumps(samples[-1]), flush=True)
  after_warmup = [s["rss"] for s in samples[2:]]
  result = {"model": args.model, "tokens": decoded, "every": args.every,
            "unbounded_timeline": args.unbounded_timeline, "samples": samples,
            "rss_spread_after_warmup": max(after_warmup) - min(after_warmup) if after_warmup
            else None}
  print(f"RSS spread after the first two samples: {result['rss_spread_after_warmup'] / 2**20:.2f}"
        " MiB" if after_warmup else "too few samples")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
