"""Count-based audit of neuron_cluster against dense: agreement, recall, bytes.

Timings on a shared machine are noise; these counts are not. For each of a
fixed set of prompts (the benchmark's prompt first, `process.prompt_ids`
seeds 0..n-1) the dense reference (`resident`) and neuron_cluster generate
greedily one prompt at a time (batch 1, as the benchmark decodes); the audit
reports token agreement (share of equal positions, and the first position
that differs per prompt) and neuron_cluster's counters with `audit=True`:
per-layer recall/precision on decode inputs, missed neurons, ideal / useful /
false-positive / read bytes per token and the cache's hits. `guess_quality` asks
what a look-ahead could do: how precisely the predictor guesses a layer's active
neurons from residuals that exist earlier than the FFN's input.
"""

from __future__ import annotations

import gc
from typing import Any

import numpy as np

from hetflow.bench.process import prompt_ids
from hetflow.engine import Engine
from hetflow.models.walk import normalize, walk
from hetflow.sparsity.stats import check_sparse, firing

# The residuals a guess of layer i's active FFN neurons can start from (`guess_quality`).
GUESS_SOURCES = ("ffn_input", "block_input", "previous_ffn_input")


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


def guess_quality(model, predictor, reference: np.ndarray, prompt_tokens: int,
                  threshold: float | None = None) -> dict[str, Any]:
  """How well `predictor` guesses each layer's active FFN neurons at the decode steps of
  `reference` (`reference_tokens`'s greedy tokens, on the same prompts), from three residuals:

  * "ffn_input": the FFN's own input, what neuron_cluster selects from;
  * "block_input": the block's input, before its attention: half a layer ahead, so reads
    started from it would overlap the attention (Deja Vu's asynchronous look-ahead);
  * "previous_ffn_input": the block before's FFN input: one layer ahead, what
    neuron_cluster's `lookahead` guesses from (none for layer 0: NaN).

  A look-ahead pays only where its guess is precise: every wrong guess is a read the disk
  makes for nothing, in the phase the disk bounds.

  Args:
    predictor: placed (`place`), with `predict(layer, x)` on pre-norm residuals.
    threshold: activation magnitude counted as firing (`check_sparse`).

  Returns:
    {source: {"recall": [L], "precision": [L]}, "true_per_token": [L] active neurons}.
  """
  c = model.config
  if c.num_experts:
    raise ValueError(f"guess_quality audits dense FFN layers; {c.name} routes to experts.")
  fire = firing(c, check_sparse(c, threshold))
  ids = np.concatenate([prompt_ids(c.vocab_size, prompt_tokens, seed=s)
                        for s in range(len(reference))])
  seqs = np.concatenate([ids, reference[:, :-1]], axis=1)  # the last token is never an input
  # By causality, position prompt_tokens + j's residuals are what decode step j sees.
  decode = np.arange(seqs.shape[1]) >= prompt_tokens
  rows = lambda x: x[:, decode].reshape(-1, c.hidden_size)
  hits = {k: np.zeros((c.num_layers, 3)) for k in GUESS_SOURCES}  # right, guessed, active
  block_input, ffn_input = {}, {}

  def on_block(layer, x):
    block_input[layer] = rows(x)

  def on_ffn(layer, x, mlp):
    x = rows(x)
    active = np.asarray(fire(mlp, normalize(c, mlp, x)))
    sources = {"ffn_input": x, "block_input": block_input.pop(layer)}
    if layer:
      sources["previous_ffn_input"] = ffn_input.pop(layer - 1)
    ffn_input[layer] = x
    for name, r in sources.items():
      guess = np.asarray(predictor.predict(layer, r)).reshape(active.shape)
      hits[name][layer] += (guess & active).sum(), guess.sum(), active.sum()

  walk(c, model.group_tensors, seqs, on_ffn, on_block=on_block)
  with np.errstate(invalid="ignore", divide="ignore"):  # layer 0 has no previous FFN input
    out = {k: {"recall": h[:, 0] / h[:, 2], "precision": h[:, 0] / h[:, 1]}
           for k, h in hits.items()}
  out["true_per_token"] = hits["ffn_input"][:, 2] / int(decode.sum()) / len(reference)
  return out


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
