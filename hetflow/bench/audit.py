"""Count-based audit of neuron_cluster against dense: agreement, recall, bytes.

Timings on a shared machine are noise; these counts are not. For each of a
fixed set of prompts (the benchmark's prompt first, `process.prompt_ids`
seeds 0..n-1) the dense reference (`resident`) and neuron_cluster generate
greedily one prompt at a time (batch 1, as the benchmark decodes); the audit
reports token agreement (share of equal positions, and the first position
that differs per prompt) and neuron_cluster's counters with `audit=True`:
per-layer recall/precision on decode inputs, missed neurons, ideal / useful /
false-positive / read bytes per token and the cache's hits.
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np

from hetflow.bench.process import prompt_ids
from hetflow.engine import Engine


def reference_tokens(model, prompts: int, prompt_tokens: int, new_tokens: int) -> np.ndarray:
  """Dense greedy tokens [prompts, new_tokens], one prompt at a time."""
  with Engine(model, "resident") as engine:
    out = [engine.generate(prompt_ids(model.config.vocab_size, prompt_tokens, seed=s),
                           max_new_tokens=new_tokens, stop_tokens=()).tokens[0]
           for s in range(prompts)]
  gc.collect()
  return np.stack(out)


def audit(model, options: dict[str, Any], reference: np.ndarray, prompt_tokens: int,
          budget: Any = None) -> dict[str, Any]:
  """neuron_cluster with `options` (+ audit) on the reference's prompts, compared with it."""
  prompts, new_tokens = reference.shape
  tokens = []
  with Engine(model, "neuron_cluster", budget=budget, options=dict(options, audit=True)) as e:
    for s in range(prompts):
      out = e.generate(prompt_ids(model.config.vocab_size, prompt_tokens, seed=s),
                       max_new_tokens=new_tokens, stop_tokens=())
      tokens.append(out.tokens[0])
    stats = out.stats["strategy"].details  # counters are cumulative over the prompts
  gc.collect()
  tokens = np.stack(tokens)
  same = tokens == reference
  first = [int(np.argmin(r)) if not r.all() else new_tokens for r in same]
  return {"agreement": float(same.mean()), "first_difference": first, "stats": stats}


def summary(result: dict[str, Any]) -> str:
  """A few lines of the audit's figures (MB = 1e6 bytes per decode token)."""
  s = result["stats"]
  mb = lambda k: f"{s[k] / 1e6:.2f}"
  lines = [
      f"agreement with dense {result['agreement']:.3f}; first differing position per prompt"
      f" {result['first_difference']}",
      f"read {mb('disk_bytes_per_token')} MB/token, ideal {mb('ideal_bytes_per_token')}"
      f" (x{s['read_amplification']:.2f}), useful {mb('useful_bytes_per_token')}, false"
      f" positives {mb('false_positive_bytes_per_token')}, cluster swaps"
      f" {mb('cluster_swap_bytes_per_token')}; requests/token {s['requests_per_token']:.0f}",
      f"predicted density {s['predicted_density']:.3f}, true {s.get('true_density', 0):.3f};"
      f" recall {s.get('recall', 0):.4f}, precision {s.get('precision', 0):.3f}, missed"
      f" {s.get('missed_neurons_per_token', 0):.0f} neurons/token",
      f"cache {s['cache_slots']} slots: {s['cache']}",
      f"layer recall {np.round(s.get('layer_recall', []), 3).tolist()}",
      f"layer precision {np.round(s.get('layer_precision', []), 3).tolist()}",
  ]
  return "\n".join(lines)
