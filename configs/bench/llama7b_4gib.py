"""A 7B model (the llama-2-7b shape) on a machine emulated down to 4 GiB: layer-wise int4 and
int8 against llama.cpp Q4_0 and Q8_0 under the same limit (issue 11, table c).

Run (as root; locks all but 4 GiB of RAM while the systems run, page cache included):
  python -m experiments.benchmark --config=configs/bench/llama7b_4gib.py \
      --workdir=/tmp/bench-llama7b-4gib                  # int4 vs Q4_0
  python -m experiments.benchmark --config=configs/bench/llama7b_4gib.py:int8 \
      --workdir=/tmp/bench-llama7b-4gib-int8             # int8 vs Q8_0
  python -m experiments.benchmark --config=configs/bench/llama7b_4gib.py:int8-resident \
      --workdir=/tmp/bench-llama7b-int8-resident         # int8, every block in RAM, no limit
Hardware: the 2-core, 24 GiB CPU machines here; ~11 GB free disk for the int4 (3.9 GB)
and int8 (7.0 GB) stores, generated tensor by tensor from the synthetic shape and
quantized as they are written (the 27 GB float32 model is never built, in RAM or on
disk), and the GGUF files (Q4_0 4.2 GB, Q8_0 7.2 GB), written by
`hetflow.bench.peers.gguf_for` on first use, before any timing.

The same 4 GiB for both sides: hetflow's device budget is what the limit leaves after
its runtime (~0.9 GiB of RSS here: jax, XLA's code, Python), and "auto" keeps as many
blocks resident as that budget holds after the embedding, head, ring and KV cache; the
rest streams from disk with O_DIRECT. llama.cpp maps its file (its default) and gets the
same limit; the page cache it fills counts in it. The limit is held during every row
(`hetflow.memory.MemoryLimit`'s keeper), not only at its start.
Expect: int4 (3.7 GB/token): 18 of 32 blocks resident, 1.6 GB/token from disk (O_DIRECT),
peak RSS ~3.6 GiB. llama.cpp on this CPU repacks the Q4_0 blocks into anonymous memory
(~3.9 GB), which leaves ~0.4 GB of the 4 GiB for its mapped file and code: it re-reads
~1.1 GB per token through page faults (0.07 tok/s in WORKSPACE_NOTES.md's run, against
~3.5 when the limit leaked by ~0.3 GB: the comparison sits on that cliff). int8 (6.6
GB/token): 8 blocks resident, 4.86 GB/token from disk (O_DIRECT), peak RSS ~3.5 GiB, at
its disk limit (0.44 tok/s at load 4, 0.35 at load 11). llama.cpp does not repack Q8_0
on this CPU: it maps its 7.55 GB file and re-reads nearly all of it (~7 GB/token)
through page faults at 1.07 GB/s (0.16 tok/s; 0.43 GB/s and 0.06 tok/s at load 11).
The measured Q8_0 file was written from the int8 store (each kernel's q * scale,
re-quantized to Q8_0) into the path `gguf_for` looks up: both sides decoded the same
tokens. Without it, `gguf_for` writes Q8_0 of the synthetic float values (the same
floats hetflow's int8 rounds; ~25 min, before any timing). `:int8-resident` (no
limit): every int8 block in RAM, and llama.cpp Q8_0 decoding from its cached file.
WORKSPACE_NOTES.md has the runs.
"""

from hetflow.bench.config import bench_config

# hetflow's side of the 4 GiB: what the ledger may place (embedding, head, resident blocks,
# the ring, the KV cache); the runtime's own ~0.9 GiB and some page cache for its code
# take the rest.
DEVICE_BUDGET = "2.9GiB"


def get_config(arg=None):
  """arg: "int4" (default; vs llama.cpp Q4_0), "int8" (vs Q8_0), or "int8-resident" (every
  block in RAM, no memory limit: what the disk costs)."""
  weights = {None: "int4", "": "int4", "int4": "int4", "int8": "int8",
             "int8-resident": "int8"}.get(arg)
  if weights is None:
    raise ValueError(f"configs/bench/llama7b_4gib.py: unknown argument {arg!r}; expected"
                     " int4, int8 or int8-resident (after the file name and a colon).")
  resident = arg == "int8-resident"
  c = bench_config("llama-2-7b", budget=dict(device="" if resident else DEVICE_BUDGET,
                                             host="", disk=""),
                   memory_limit="" if resident else "4GiB", prompt_tokens=8, new_tokens=4,
                   repeats=1, timeline=False, timeout_s=900)
  c.model.weights = weights  # the disk probe reads this format's store: no float32 store
  streamed = dict(offload_tier="disk", resident_layers="auto", kv_reserve_tokens=64,
                  prefetch_depth=2)
  gguf = {"int4": "Q4_0", "int8": "Q8_0"}[weights]
  # The same weights in llama.cpp's format at the same bits, mmap'd (its default).
  c.systems[f"llamacpp_{gguf}"] = dict(kind="llamacpp", gguf_type=gguf)
  if resident:
    # Every block placed in RAM from the int8 store (layer-wise with nothing streamed
    # computes what `resident` does; it loads from the store in seconds where `resident`
    # would generate and quantize the synthetic 7B again).
    # "auto" under no device budget keeps every block.
    c.systems.resident_int8 = dict(kind="hetflow", strategy="layerwise", options=streamed)
    # llama.cpp's Q8_0 without a limit: its file stays in the page cache after the first
    # token, so it decodes from memory like the resident row.
    c.order = "resident_int8,llamacpp_Q8_0"
  else:
    c.systems[f"layerwise_{weights}"] = dict(kind="hetflow", strategy="layerwise",
                                             options=streamed)
    c.order = f"layerwise_{weights},llamacpp_{gguf}"
  c.smoke = {"model": {"name": "llama-tiny"}, "memory_limit": "", "budget": {"device": ""},
             "prompt_tokens": 4, "new_tokens": 3,
             "order": "resident_int8" if resident else f"layerwise_{weights}"}
  return c
