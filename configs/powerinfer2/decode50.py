"""PowerInfer-2 (arXiv 2406.06282): decode with 50% of FFN weights in flash vs llama.cpp, PREDICTED; plus a scaled-down MEASURED run.

Run:
  python -m experiments.reproduce --config=configs/powerinfer2/decode50.py \
      --workdir=/tmp/powerinfer2-decode50
  python -m experiments.reproduce --config=configs/powerinfer2/decode50.py:noreal  # predictions only
Hardware: the phone figures are PREDICTED by hetflow.simulate on the
"oneplus12-ufs4" profile (UFS 4.0 from the PowerInfer-2 paper; CPU/DRAM assumed, see
hetflow/hardware.py), batch 1, prompt 64, 64 new tokens. The scaled-down run
is MEASURED on this machine: opt-125m-sparse (sparsity 0.9, zipf:1.1, float32)
through Engine(strategy="neuron_cluster") at a budget that leaves about half of
its neurons out of the cache (~20-60 s, < 1.5 GiB RSS, a ~0.3 GB bundle store
in a temporary directory), printed next to the cost model's counts and this
machine's profile's prediction (measured once, cached in $HETFLOW_CACHE).
Assumed: fp16 weights (PowerInfer-2 used int4: its absolute speeds are ~3x
ours); memory = model minus 50% of its FFN (8.85 GB for both 7B models); llama.cpp
stands in as layerwise streaming from disk with as many layers resident as
fit (llama.cpp's mmap would thrash the page cache and re-read more, so the
predicted ratio is a lower bound); published sparsities (TurboSparse-Mistral
90%, Bamboo 87.5%), Zipf(1.1) hotness, trained predictor at precision 0.8.
Expect (2026-11-21): neuron_cluster ~1.3-1.6 tok/s (int4 ~1.7-2.2) vs
layerwise 0.34 tok/s: a 3.8-4.6x ratio where the paper reports 24.6x on average
(int4, the NPU, a more skewed activation law and a thrashing mmap baseline
account for the rest). Scaled-down: predicted neurons and disk bytes per token
within ~10% of the measured ones, requests within ~20%, decode tok/s within
~10-30% (timing noisy on a shared machine).
"""

import ml_collections

from hetflow.bench.reproduce import SHAPE_ONLY_NEURON_CLUSTER, reproduce_config
from hetflow.config import model_section
from strategies.neuron_cluster.cost import memory_for_ffn_in_flash

MODELS = ("turbosparse-mistral-7b", "bamboo-7b")
SPEEDUP = 24.6  # PowerInfer-2 paper: average over llama.cpp, 50% of FFN in flash


def get_config(arg=None):
  levels = {m: memory_for_ffn_in_flash(m, 0.5) for m in MODELS}
  nc = "neuron_cluster (PowerInfer-2)"
  lw = "layerwise disk (llama.cpp)"
  series = [
      dict(label=nc, strategy="neuron_cluster", options=dict(SHAPE_ONLY_NEURON_CLUSTER),
           paper={m: [(gb, None)] for m, gb in levels.items()}),
      dict(label=lw, strategy="layerwise",
           options=dict(offload_tier="disk", resident_layers="auto", kv_reserve_tokens=1024),
           paper={m: [(gb, None)] for m, gb in levels.items()}),
      # The paper's precision for neuron_cluster (no int4 llama.cpp stand-in here).
      dict(label="neuron_cluster int4", strategy="neuron_cluster", shape_plan="always",
           options=dict(SHAPE_ONLY_NEURON_CLUSTER, weight_bits=4),
           paper={m: [(memory_for_ffn_in_flash(m, 0.5, weight_bits=4), None)]
                  for m in MODELS}),
  ]
  c = reproduce_config(
      "PowerInfer-2: decode tok/s with 50% of FFN in flash, vs llama.cpp, OnePlus 12",
      "oneplus12-ufs4", list(MODELS), series, plot="powerinfer2_decode50.png",
      assumptions=[
          "fp16 weights (paper: int4); memory = model minus 50% of FFN",
          "llama.cpp = layerwise from disk, resident layers as fit (no page-cache thrash)",
          "published sparsity, Zipf(1.1) hotness, trained predictor precision 0.8",
      ],
      ratios=[dict(model=m, gb=gb, numerator=nc, denominator=lw, paper=SPEEDUP,
                   label="speed-up over llama.cpp") for m, gb in levels.items()])
  c.measure = ml_collections.ConfigDict(dict(
      model=model_section("opt-125m-sparse"),
      budget=dict(device="420MB"),
      options=dict(kv_reserve_tokens=114, staging_bytes="16MiB", calibration_tokens=512),
      prompt_tokens=16, new_tokens=24, profile=""))
  c.measure.model.kwargs = dict(sparsity=0.9, hotness="zipf:1.1")
  if arg == "noreal":
    c.measure = None
  c.smoke = {"models": ["bamboo-7b"], "measure": {
      "model": {"name": "llama-tiny-sparse"}, "budget": {"device": "4MB"},
      "options": {"kv_reserve_tokens": 85, "staging_bytes": "256KiB",
                  "calibration_tokens": 128},
      "prompt_tokens": 4, "new_tokens": 6, "profile": "oneplus12-ufs4"}}
  return c
