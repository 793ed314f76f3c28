"""llama-1b-sparse when the hot neurons fit: neuron_cluster at 60% of resident's bytes vs resident.

PowerInfer-2's second claim: llama.cpp's speed with ~40% less memory. Here:
resident (all 4.4 GB of float32 weights in memory) against neuron_cluster with a
device budget of 60% of that (2.64 GB): the fixed region (~1.35 GB), predictor,
staging, and a neuron cache of ~45k records (~37% of the neurons: the hot
clusters and a cold region); the rest is read from disk (cold, O_DIRECT).
Run:
  python -m experiments.benchmark --config=configs/bench/llama1b_sparse_fits.py \
      --workdir=/tmp/bench-llama1b-sparse-fits
after configs/sparse/llama1b.py's predictor (see configs/bench/llama1b_sparse.py).
Hardware: the 2-core, 24 GiB CPU machines here; ~5 GiB RAM for resident.
Expect (issue 13's target): neuron_cluster >= 0.9x resident's decode tokens/s. Measured
with the warm-up on another prompt (WORKSPACE_NOTES.md): 0.72-0.79x in the seventh
session (a new request read ~67 MB per token); since the prefill warms the cache and the
error feedback, and the cached blocks start before the host waits for the predictor
(eighth session), 0.97-1.03x (23-35 MB per token); with the reads queued in the kernel
(ninth session, 8 tokens), 1.11-1.20x; 1.29x at the config's 16 tokens (tenth session).
Resident reads ~3.9 GB of weights per token from memory (~0.2 s); neuron_cluster
computes ~1.1-1.4 GB of records per token and reads the predicted misses of the
uncached neurons from disk.
"""

from hetflow.bench.config import bench_config

WORKDIR = "/tmp/hetflow-llama1b-sparse"  # configs/bench/llama1b_sparse.py's


def get_config(arg=None):
  del arg
  c = bench_config("llama-1b-sparse", budget=dict(device="", host="", disk=""),
                   new_tokens=16, repeats=1, timeline=False, timeout_s=1800)
  c.model.kwargs = dict(sparsity=0.9, hotness="zipf:1.1")
  c.order = "resident,nc_fits,nc_fits_embed"
  c.systems.resident = dict(kind="hetflow", strategy="resident")
  common = dict(predictor="trained", predictor_path=f"{WORKDIR}/predictor",
                stats_path=f"{WORKDIR}/stats.npz", kv_reserve_tokens=372,
                store_dir=f"{WORKDIR}/store-bundled")
  c.systems.nc_fits = dict(kind="hetflow", strategy="neuron_cluster", budget=dict(
      device="2.64GB"), options=dict(common, staging_bytes="64MiB"))
  # The token table on disk and a 24 MiB staging buffer give ~300 MB more to the cache
  # (45k -> 57k slots), three quarters of it static hot clusters: a cache this large is
  # mostly empty recency slots for the first tokens of a new request otherwise.
  c.systems.nc_fits_embed = dict(kind="hetflow", strategy="neuron_cluster", budget=dict(
      device="2.64GB"), options=dict(common, staging_bytes="24MiB", embed_tier="disk",
                                     hot_fraction=0.75, feedback_margin=0.0))
  c.smoke = {"model": {"name": "llama-tiny-sparse"}, "prompt_tokens": 4, "new_tokens": 3,
             "order": "nc_fits",
             "systems": {"nc_fits": {"budget": {"device": ""}, "options": {
                 "predictor": "oracle", "stats_path": None, "store_dir": None}}}}
  return c
