"""mixtral-1b-routed at 25% of its bytes in memory, cold disk: moe_offload vs layer-wise.

Run:
  python -m experiments.benchmark --config=configs/bench/moe.py --workdir=/tmp/bench-moe
Hardware: the 2-core, 24 GiB CPU machines here (~2 GB/s O_DIRECT reads); ~10 GB of
free disk for the two stores (layer-wise's and the expert records, written on first
use); ~3 GiB RAM per system. The model's routers are calibrated once (~10-15 minutes
on a busy machine, cached under $HETFLOW_CACHE/moe).
Expect: the model is 4.86 GB (float32), 128 expert records of 34.6 MB and 0.43 GB of
fixed region; 25% of it (1.13 GiB) leaves moe_offload 22 expert slots (a prompt's
staging area is the first 2 x 8 of them), under two per layer, so LRU keeps nothing a
layer reuses; LFU keeps the hottest experts. Layer-wise streams every layer it cannot
keep, ~4.3 GB per token. Measured 2026-11-30 (WORKSPACE_NOTES.md), a busy machine:
layer-wise 0.40 tok/s; expert records without a cache 0.94 (2.3x); + LFU cache 2.11
(5.2x, hit rate 0.35, 0.72 GB per token = the routed experts not in the cache; the
warm-up then replayed the measured prompt: with another prompt, 4.45x at hit rate 0.27);
next_use 1.39; + look-ahead of the first choice 2.01 (right 66% of the time, 1.26x the
bytes). The issue's targets (>= 3x layer-wise; disk bytes per token within 1.2x of
the routed experts not in cache) are read from the table's decode tok/s and the
strategy's decode_disk_bytes_per_token / decode_ideal_bytes_per_token.
"""

from hetflow.bench.config import bench_config

MODEL_BYTES = 4_859_760_640  # mixtral-1b-routed in float32 (Model.nbytes)
INT8_BYTES = 1_317_438_464  # ... in int8 (per channel)
INT8_G32_BYTES = 1_387_614_208  # ... in int8-g32 (GGUF Q8_0's values)
INT4_MINIMUM = 214_781_952  # moe_offload's minimum device budget in int4 (8 slots): 27%


def get_config(arg=None):
  del arg
  c = bench_config("mixtral-1b-routed", budget=dict(device=str(MODEL_BYTES // 4), host="",
                                                    disk=""),
                   prompt_tokens=16, new_tokens=8, repeats=2)
  # reuse 0.6: 0.45 was out of reach at layer 8 before the calibration kept to the
  # principal directions it can estimate (notes of issue 14); 0.6 calibrates with no
  # layer clamped and measures 0.58 (hot share 0.41 for 0.39) on fresh tokens.
  # 2048 calibration tokens: ~4 minutes here, 1.9 GB of RAM.
  c.model.kwargs = dict(reuse=0.6, calibration_tokens=2048, strict=False)
  # The ablation, one mechanism added at a time: layer-wise (whole layers) -> expert
  # records with no cache -> + the expert cache (LFU, the default; next_use beside it) ->
  # + look-ahead reads of the router's first choice.
  c.order = "layerwise,moe_records,moe_lfu,moe_next_use,moe_lookahead1"
  common = dict(kv_reserve_tokens=64)
  c.systems.moe_records = dict(kind="hetflow", strategy="moe_offload",
                               options=dict(common, cache_policy="none"))
  for policy in ("lru", "lfu", "next_use"):
    c.systems[f"moe_{policy}"] = dict(kind="hetflow", strategy="moe_offload",
                                      options=dict(common, cache_policy=policy))
  for guesses in (1, 2):
    c.systems[f"moe_lookahead{guesses}"] = dict(
        kind="hetflow", strategy="moe_offload", options=dict(common, lookahead=guesses))
  # llama.cpp, issue 14's peer: the same float32 bits as a GGUF, mmap. Not in the default
  # order: a fair row needs the same memory limit for every row (memory_limit locks the
  # rest of RAM for the whole run, so only on a quiet machine), e.g.
  #   --config.order=layerwise,moe_lfu,llamacpp_F32 --config.memory_limit=1.8GiB
  # (about moe_lfu's own peak RSS). Measured 2026-11-30, the warm-up on another prompt:
  # moe_lfu 2.07 tok/s, llama.cpp 0.48 (4.35x); at 2.5GiB llama.cpp's page cache keeps the
  # hot experts: 4.70 (WORKSPACE_NOTES.md).
  c.systems.llamacpp_F32 = dict(kind="llamacpp", gguf_type="F32")
  # The same GGUF bits (issue 14, weight formats): moe_offload's int8 and int4 experts (one
  # record each with its scales, the format's native matrix-vector kernels) against llama.cpp's
  # Q8_0 and Q4_0 (int8-g32 and int4 hold their values), in one run under one memory limit:
  #   --config.order=moe_int8_g32,llamacpp_Q8_0,moe_int4,llamacpp_Q4_0 --config.memory_limit=1.3GiB
  # (about the int8 rows' peak RSS). The device budget is 25% of the format's bytes for
  # int8; int4's fixed region (the float32 embedding and head are 0.26 GB of its 0.80) leaves
  # 25% too few slots for a prompt's 8, so it runs at its minimum, 8 slots (27%). Measured
  # 2026-11-30 on a busy machine (docs/moe.md): int8-g32 6.65 tok/s vs Q8_0 6.31; int4 5.79 vs
  # Q4_0 2.77; llama.cpp's mmap passed the limit (its whole file stayed in the page cache).
  for weights, nbytes in (("int8", INT8_BYTES // 4), ("int8-g32", INT8_G32_BYTES // 4),
                         ("int4", INT4_MINIMUM)):
    c.systems[f"moe_{weights.replace('-', '_')}"] = dict(kind="hetflow", strategy="moe_offload", weights=weights,
                                       budget=dict(device=str(nbytes)), options=dict(common))
  # The host tier: every int8 record also in host memory (the host budget is unlimited
  # here), the device budget as moe_int8's; cold experts copied to a slot, or computed
  # where they lie (on this CPU-only machine that only saves the memcpy). Measured
  # 2026-11-30: disk only 5.71 tok/s, host copy 7.11, host compute 14.61 (docs/moe.md).
  for cold in ("copy", "host"):
    c.systems[f"moe_int8_host_{cold}"] = dict(
        kind="hetflow", strategy="moe_offload", weights="int8",
        budget=dict(device=str(INT8_BYTES // 4)),
        options=dict(common, host_experts="auto", cold_compute=cold))
  for gguf_type in ("Q8_0", "Q4_0"):
    c.systems[f"llamacpp_{gguf_type}"] = dict(kind="llamacpp", gguf_type=gguf_type)
  c.systems.layerwise = dict(kind="hetflow", strategy="layerwise",
                             options=dict(common, offload_tier="disk", resident_layers="auto",
                                          prefetch_depth=1))
  c.smoke = {"model": {"name": "mixtral-tiny-8e-routed", "kwargs": {"calibration_tokens": 2048}},
             "budget": {"device": ""}, "prompt_tokens": 4, "new_tokens": 3,
             "order": "moe_lru,layerwise"}
  return c
