"""A 7B model (the llama-2-7b shape) on a machine emulated down to 4 GiB: layer-wise int4 (and
int8) from disk vs llama.cpp Q4_0 on the same blocks (issue 11, table c).

Run (as root; locks all but 4 GiB of RAM for the whole run, page cache included):
  python -m experiments.benchmark --config=configs/bench/llama7b_4gib.py \
      --workdir=/tmp/bench-llama7b-4gib
Hardware: the 2-core, 24 GiB CPU machines here, nothing else running (the lock takes
~20 GiB); ~11 GB free disk for the int4 (3.8 GB) and int8 (7 GB) stores, generated
tensor by tensor from the synthetic shape and quantized as they are written (the
27 GB float32 model is never built, in RAM or on disk).
The Q4_0 GGUF for llama.cpp (4.2 GB) is written by `hetflow.bench.peers.gguf_for` on
first use, before any timing (from the synthetic values: ~25 min here; `save_gguf` of a
model already in int4 writes its blocks as they are, ~2 min).
Expect: it runs inside 4 GiB (peak RSS ~1.5-2.5 GiB: embedding 0.5 GB float32, a
ring of 3 blocks, the jax runtime); int4 reads 3.6 GB per token, int8 6.5 GB, so at
~2 GB/s of disk ~0.5 and ~0.3 tok/s at the disk limit, less where the XLA kernel
is slower than the disk (the fraction of the limit says which). llama.cpp's 4.2 GB file
does not fit in 4 GiB with its runtime: its mmap re-reads most of it per token through
the page cache.
"""

from hetflow.bench.config import bench_config


def get_config(arg=None):
  del arg
  c = bench_config("llama-2-7b", budget=dict(device="2GiB", host="", disk=""),
                   memory_limit="4GiB", prompt_tokens=8, new_tokens=4, repeats=1,
                   timeline=False, timeout_s=900)
  c.model.weights = "int4"  # the disk probe reads this store: no float32 store is written
  c.order = "layerwise_int4,llamacpp_Q4_0"  # add ,layerwise_int8 for the 7 GB int8 store
  streamed = dict(offload_tier="disk", resident_layers=0, kv_reserve_tokens=64,
                  prefetch_depth=2)
  for weights in ("int4", "int8"):
    c.systems[f"layerwise_{weights}"] = dict(kind="hetflow", strategy="layerwise",
                                             weights=weights, options=streamed)
  # The same int4 blocks as llama.cpp's Q4_0, mmap'd under the same limit (its default).
  c.systems.llamacpp_Q4_0 = dict(kind="llamacpp", gguf_type="Q4_0")
  c.smoke = {"model": {"name": "llama-tiny"}, "memory_limit": "", "budget": {"device": ""},
             "prompt_tokens": 4, "new_tokens": 3, "order": "layerwise_int4"}
  return c
