"""llama-1b resident in float32, bfloat16, int8, int8-g32 and int4 vs llama.cpp F32/F16/Q8_0/Q4_0 (issue 11, table b).

Run:
  python -m experiments.benchmark --config=configs/bench/llama1b_formats_resident.py \
      --workdir=/tmp/bench-llama1b-formats-resident
Hardware: the 2-core, 24 GiB CPU machines here; ~5 GiB RAM per system (one at a
time, each in a fresh process); ~9 GB disk for the four GGUF files llama.cpp reads
(written from the same weights with hetflow.save_gguf before any timing); the
`peers` extra (llama-cpp-python), else its rows are listed as skipped.
Expect: every row near its memory-bandwidth roof, so tokens/s rise as bytes fall
where the kernel keeps up: hetflow bf16 and int8 >= 0.9x float32 with 0.5x / 0.3x
of its bytes (int8 and int4 ~2.3-2.5x float32 with the native kernels, 0.4x int4 on
pure XLA: HETFLOW_NATIVE=0); llama.cpp F32 ~1.7-2x hetflow float32 and Q8_0 ~2x F32 on
a quiet machine (WORKSPACE_NOTES.md, "Fourth session"). On an AVX2 machine without AVX-512
(nineteenth session): bf16 1.7x, int8-g32 1.7x, int4 2.1x float32's tokens/s, int8 2.8x
since its rows prefetch from DRAM (twentieth session); llama.cpp's same-bytes rows 1.5-2.8x
hetflow's (docs/formats.md).
"""

from hetflow.bench.config import bench_config


def get_config(arg=None):
  del arg
  c = bench_config("llama-1b", new_tokens=8, repeats=1, timeline=False)
  # int8-g32 is Q8_0's format and int4 Q4_0's: the same bytes per weight as the peer's row.
  c.order = ("resident_float32,resident_bfloat16,resident_int8,resident_int8_g32,resident_int4,"
             "llamacpp_F32,llamacpp_F16,llamacpp_Q8_0,llamacpp_Q4_0")
  for weights in ("float32", "bfloat16", "int8", "int8-g32", "int4"):
    c.systems[f"resident_{weights.replace('-', '_')}"] = dict(kind="hetflow", strategy="resident",
                                                             weights=weights)
  for t in ("F32", "F16", "Q8_0", "Q4_0"):
    c.systems[f"llamacpp_{t}"] = dict(kind="llamacpp", gguf_type=t)
  c.smoke = {"model": {"name": "llama-tiny"}, "new_tokens": 4, "repeats": 1,
             "order": "resident_float32,resident_int8"}
  return c
