"""neuron_cluster's sparse step against the f32 matvec roof, in one process.

  python -m experiments.sparse_step_rate --model=llama-1b-sparse

Times, on the model's FFN shapes, bytes of neuron records per second through:
the f32 matrix-vector probe the benchmark uses (`probes.probe_memory`); the
planar step (`bundles.planar_step`) over blocks of 16..1024 records, cycling
~1 GiB so that no cache serves them; and the step it replaced (a gather of
whole records from a pool, strided row slices, a padding mask), for the
before/after ratio. Prints one line per figure and the ratios to the probe (probed before and after).
Hardware: any CPU; ~2.5 GiB of memory. Expect the planar step within ~70-100%
of the probe for blocks >= 256 records, the gather step ~10-15% of it.
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hetflow import config as config_lib
from hetflow.bench import probes
from hetflow.memory import aligned_empty
from hetflow.models import layers
from hetflow.sparsity import bundles

_MODEL = flags.DEFINE_string("model", "llama-1b-sparse", "a sparse model name (shapes only)")
_BYTES = flags.DEFINE_integer("pool_bytes", 1 << 30, "bytes of records cycled per sweep")
_OUT = flags.DEFINE_string("out", None, "JSON file for the results")


def _gather_step(config, stride, buf, idx, valid, pos, h):
  """The step before planar records (hetflow.sparsity.bundles at 62b11b3), for reference."""
  d = config.hidden_size
  w = jnp.take(buf, idx, axis=0)
  rows = {m: w[:, i * stride:i * stride + d] for i, m in enumerate(("gate", "up", "down"))}
  act = layers.activation(config.hidden_act)
  u = jax.nn.relu(jnp.einsum("BTD,nD->BTn", h, rows["up"]))
  a = act(jnp.einsum("BTD,nD->BTn", h, rows["gate"])) * u
  a = jnp.where(valid, a, 0)
  fired = jnp.sum(jnp.any(a.reshape(-1, a.shape[-1]) != 0, axis=0))
  return jnp.einsum("BTn,nD->BTD", a, rows["down"]), fired


def _best(fn, repeats=3):
  fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def main(argv):
  del argv
  c = config_lib.build_model(config_lib.model_section(_MODEL.value)).config
  d = c.hidden_size
  record = 3 * d * 4
  out = {"model": _MODEL.value, "record_bytes": record}
  out["matvec_probe"] = probes.probe_memory(_BYTES.value)["bytes_per_s"]
  print(f"f32 matvec probe: {out['matvec_probe'] / 1e9:.2f} GB/s", flush=True)
  h = jnp.ones((1, 1, d), jnp.float32) * 0.01
  step = jax.jit(functools.partial(bundles.planar_step, c))
  n = _BYTES.value // record
  buf = aligned_empty(n * record)
  buf.view(np.float32)[:] = np.random.default_rng(0).standard_normal(n * 3 * d, np.float32)
  a_all = buf[:n * 2 * d * 4].view(np.float32).reshape(n, 2 * d)  # planar, as the strategy's
  b_all = buf[n * 2 * d * 4:].view(np.float32).reshape(n, d)
  for rows in (1024, 256, 64, 16):
    blocks = n // rows
    # device_put of a 64-byte aligned numpy view aliases it: no copy.
    a = [jax.device_put(a_all[i * rows:(i + 1) * rows]) for i in range(blocks)]
    b = [jax.device_put(b_all[i * rows:(i + 1) * rows]) for i in range(blocks)]
    valid = np.ones(rows, bool)

    def sweep(a=a, b=b, valid=valid):
      jax.block_until_ready([step(x, y, h, None, valid) for x, y in zip(a, b)])

    rate = blocks * rows * record / _best(sweep)
    out[f"planar_{rows}"] = rate
    print(f"planar step, blocks of {rows:4d} records: {rate / 1e9:.2f} GB/s"
          f" ({rate / out['matvec_probe']:.2f} of the probe)", flush=True)
  # Hits gathered from a planar pool (the strategy's path for sparse cached blocks).
  pg = jax.jit(functools.partial(bundles.planar_gather_step, c))
  a_pool, b_pool = jax.device_put(a_all), jax.device_put(b_all)
  rng = np.random.default_rng(1)
  for rows in (256, 64):
    idx = [np.sort(rng.choice(n, rows, replace=False)).astype(np.int32)
           for _ in range(n // rows)]
    valid = np.ones(rows, bool)

    def sweep_planar_gather(idx=idx, valid=valid):
      jax.block_until_ready([pg(a_pool, b_pool, i, h, None, valid) for i in idx])

    rate = len(idx) * rows * record / _best(sweep_planar_gather)
    out[f"planar_gather_{rows}"] = rate
    print(f"planar gather step, {rows:4d} scattered records: {rate / 1e9:.2f} GB/s"
          f" ({rate / out['matvec_probe']:.2f} of the probe)", flush=True)
  pool = jax.device_put(buf.view(np.float32).reshape(n, 3 * d))
  gather = jax.jit(functools.partial(_gather_step, c, d))
  rng = np.random.default_rng(0)
  idx = [np.sort(rng.choice(n, 1024, replace=False)).astype(np.int32) for _ in range(n // 1024)]
  valid = np.ones(1024, bool)

  def sweep_gather():
    jax.block_until_ready([gather(pool, i, valid, i, h) for i in idx])

  rate = len(idx) * 1024 * record / _best(sweep_gather)
  out["gather_1024"] = rate
  print(f"gather step (before), 1024 records: {rate / 1e9:.2f} GB/s"
        f" ({rate / out['matvec_probe']:.2f} of the probe)", flush=True)
  out["matvec_probe_after"] = probes.probe_memory(_BYTES.value)["bytes_per_s"]
  print(f"f32 matvec probe again: {out['matvec_probe_after'] / 1e9:.2f} GB/s", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
