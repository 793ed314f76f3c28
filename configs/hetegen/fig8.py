"""HeteGen (MLSys 2024) Fig. 8: OPT throughput vs GPU memory, predicted by the simulator.

Run:
  python -m experiments.reproduce --config=configs/hetegen/fig8.py
  python -m experiments.reproduce --config=configs/hetegen/fig8.py --workdir=/tmp/fig8
Hardware: any machine; nothing runs on an accelerator here. Every hetflow
figure is PREDICTED from shapes (jax.eval_shape, no weights) with the
"a10-pcie" HardwareProfile (one A10 24 GB, PCIe ~24 GB/s effective, 16-core
Xeon; hetflow/hardware.py says which rates are from the paper and which are
assumed), batch 1, prompt 512, 64 new tokens, fp16, throughput = 64 / (prefill
+ 63 decode steps).
Expect: tensor_split within about 0.7-1.3x of HeteGen's figures at small GPU
memory (the regime the formula describes), layerwise (host tier, our FlexGen
stand-in) near FlexGen's ~1.6 tok/s for OPT-6.7B at ~1 GB, and tensor_split
2.5-3x layerwise at the smallest budgets. The GPU budget counts weights,
staging buffers and (for layerwise) its ring, not the KV cache: the paper does
not say how it counted it.
"""

from hetflow.bench.reproduce import reproduce_config

# HeteGen (MLSys 2024), Figure 8: GPU GB -> tok/s, read off the figure.
HETEGEN = {
    "opt-6.7b": [(0.8, 4.2), (1.8, 4.7), (3.9, 5.6), (4.9, 5.9), (8.0, 9.3), (10.0, 10.7),
                 (11.6, 13.7), (13.0, 18.5)],
    "opt-13b": [(1.0, 2.5), (3.0, 2.8), (7.0, 3.5), (9.0, 4.1), (13.0, 4.6), (17.0, 6.8),
                (19.0, 7.2)],
    "opt-30b": [(1.5, 1.19), (6.2, 1.36), (11.0, 1.56), (15.7, 1.76), (20.4, 2.01)],
}
FLEXGEN = {
    "opt-6.7b": [(1.0, 1.6), (1.9, 1.8), (5.9, 2.6), (6.9, 3.1), (7.9, 3.6), (11.8, 8.6),
                 (12.8, 9.5)],
    "opt-13b": [(1.1, 0.9), (3.0, 1.0), (10.8, 1.4), (12.8, 1.6), (15.0, 1.9)],
    "opt-30b": [(1.5, 0.39), (6.1, 0.43)],
}


def get_config(arg=None):
  """arg: a comma-separated subset of models, e.g. "opt-6.7b" (default: all three)."""
  models = arg.split(",") if arg else list(HETEGEN)
  series = [
      dict(label="tensor_split (HeteGen)", strategy="tensor_split",
           options=dict(prompt_len=512, kv_reserve_tokens=0), paper=HETEGEN),
      dict(label="layerwise host (FlexGen)", strategy="layerwise",
           options=dict(offload_tier="host", resident_layers="auto", kv_reserve_tokens=0),
           fallback_options=dict(prefetch_depth=0), paper=FLEXGEN),
  ]
  return reproduce_config(
      "HeteGen Fig. 8: OPT fp16 throughput (tok/s) vs GPU memory, A10 + PCIe", "a10-pcie",
      models, series, prompt_len=512, memory_label="GPU GB",
      metric="throughput",  # new_tokens / (prefill + (new_tokens - 1) * decode)
      cross_levels=True,  # predict every series at the memory levels of both papers' series
      plot="hetegen_fig8.png", smoke={"models": ["opt-6.7b"]})
