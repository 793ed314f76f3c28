"""Measuring a model's own decode costs on this machine, for the simulator.

A `HardwareProfile` holds rates of generic kernels (a 4096^2 matvec, a 256 MiB
copy). A model's own kernels run at other rates: XLA CPU streams a
[2048, 5632] matvec 15-30% slower than a [5632, 2048] one, a half is its
matrices plus norms, RoPE and activations, and `device_put` of a layer's
leaves costs what the allocator makes of those sizes. Predicting from the
generic rates alone was 27-68% off here (WORKSPACE_NOTES.md, "Planner").

So, like FFTW's wisdom or an autotuner's cache, the profile of *this* machine
keeps, per model shape, what these cost when measured once:

  attn_s      one decode attention half (batch 1, one token, `context` positions)
  mlp_s       one decode FFN half
  head_s      the LM head on one token
  layer_copy_s  host -> device of one layer (both halves), in steady state
  gather_bw   bytes of FFN neuron records per second through neuron_cluster's
                sparse step (gather the predicted neurons' rows, multiply)
  split_kernel_s  where the device is the CPU: tensor_split's fixed cost per
                kernel (its staged halves' dispatches, activation copies, joins):
                eight of the model's layers decoded by tensor_split minus by
                resident, per split kernel

measured with random weights of the model's shapes, cycling through enough
distinct layers (>= `total_bytes`) that no cache serves them, as decode
touches each weight once per token. The simulator (`costmodel.decode_scale`)
turns them into a correction factor per half kind over its roofline, so the
cost models keep their structure (splits, overlap, sparsity) and only the
rates become the measured ones. Named paper profiles carry none and predict
from the roofline alone.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hetflow import costmodel, hardware
from hetflow.bench.probes import best_time, format_matvec_rate
from hetflow.engine import Engine
from hetflow.hardware import HardwareProfile, measured_costs, model_key
from hetflow.memory import tiers
from hetflow.memory.budget import format_bytes

GiB = 2**30


def _layer_nbytes(model) -> int:
  return model.group_nbytes("layers/0/attn") + model.group_nbytes("layers/0/mlp")


def _available() -> int | None:
  try:
    with open("/proc/meminfo") as f:
      return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
  except (OSError, StopIteration):
    return None


def _max_layers(model) -> int:
  """Distinct layers that fit in half the memory available now (each is also copied once)."""
  available = _available()
  if available is None:
    return 2
  return int((available // 2 - 2 * model.group_nbytes("head")) // (2 * _layer_nbytes(model)))


def fits_in_memory(model) -> bool:
  """Whether calibrating `model` fits: at least two of its layers, copies and head."""
  return _max_layers(model) >= 2


def _random_group(model, group: str, key) -> dict[str, Any]:
  """Random device arrays of one group's stored shapes, as the model's functions take them
  (a quantized kernel a dict of its leaves); values do not change dense timings."""
  from hetflow.models.model import unflatten

  prefix = group + "/"
  out = {}
  for i, (name, s) in enumerate(sorted(model.shapes.items())):
    if name.startswith(prefix):
      k = jax.random.fold_in(key, i)
      if jnp.issubdtype(s.dtype, jnp.integer):
        info = jnp.iinfo(s.dtype)
        value = jax.random.randint(k, s.shape, info.min, info.max, s.dtype)
      else:
        value = (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)
      out[name[len(prefix):]] = value
  return unflatten(out)


def _few_layers(model, layers: int = 8):
  """`model`'s layer shapes, `layers` of them, with a 256-token vocabulary (so that
  the head, which both strategies run alike, does not drown the difference)."""
  from hetflow.checkpoints.synthetic import SyntheticSource
  from hetflow.models.model import Model

  config = dataclasses.replace(model.config, num_layers=layers, vocab_size=256,
                               bos_token_id=1, eos_token_id=2, pad_token_id=None,
                               name=f"{model.config.name}-calibration")
  return Model(config=config, source=SyntheticSource(config, 0), dtype=model.dtype)


def _decode_step_s(model, strategy: str, options=None, repeats: int = 3) -> float:
  ids = np.arange(3, 11, dtype=np.int32)[None]
  with Engine(model, strategy, options=options) as engine:
    engine.generate(ids, max_new_tokens=16, stop_tokens=())  # compile
    return min(1.0 / engine.generate(ids, max_new_tokens=16, stop_tokens=())
               .stats["decode_tokens_per_s"] for _ in range(repeats))


def split_kernel_overhead(model, alpha: float = 0.5, repeats: int = 3) -> float:
  """Seconds tensor_split adds per kernel on this machine, beyond the multiplies.

  Measured at the model's own widths, on eight layers with a small vocabulary.
  Here it came to 0.14-0.26 ms per kernel, while the full-size llama-1b and
  opt-1.3b runs imply 0.25-0.4 ms: treat it as a lower bound. Only meaningful
  where the device is the CPU: with an accelerator the difference would
  include the link transfers, which the simulator models itself.
  """
  few = _few_layers(model)
  kernels = sum(len(costmodel.group_matrices(few, g)) for g in few.group_names()
                if g.startswith("layers/"))
  split = _decode_step_s(few, "tensor_split", dict(alpha=alpha, keep_resident=False), repeats)
  resident = _decode_step_s(few, "resident", None, repeats)
  return max(split - resident, 0.0) / kernels


def gather_rate(model, rows: int = 1024, pool_bytes: int = GiB, calls: int = 16,
                repeats: int = 3) -> float:
  """Bytes of FFN neuron records per second through neuron_cluster's sparse step
  (`bundles.planar_step` over blocks of `rows` planar records, cycling a pool
  larger than the caches)."""
  from hetflow.sparsity import bundles  # bundles imports the models, which are heavier

  c = model.config
  m = len(bundles.neuron_matrices(c))
  itemsize = jnp.dtype(model.dtype).itemsize
  record = m * c.hidden_size * itemsize
  blocks = max(calls, pool_bytes // (rows * record))
  pool = jax.random.normal(jax.random.key(1), (blocks, rows, m * c.hidden_size), model.dtype)
  a = [pool[i, :, :(m - 1) * c.hidden_size] for i in range(blocks)]  # setup copies
  b = [pool[i, :, (m - 1) * c.hidden_size:] for i in range(blocks)]
  del pool
  h = jnp.ones((1, 1, c.hidden_size), model.dtype)
  valid = jnp.ones((rows,), bool)
  step = jax.jit(functools.partial(bundles.planar_step, c))
  step(a[0], b[0], h, None, valid)[0].block_until_ready()

  def sweep():
    for i in range(blocks):
      y, _ = step(a[i], b[i], h, None, valid)
    y.block_until_ready()

  return blocks * rows * record / best_time(sweep, repeats)


def _time_halves(model, count: int, context: int, repeats: int) -> dict[str, float]:
  """Seconds of one decode attention half, FFN half and head, cycling `count` layers."""
  c, fn = model.config, model.functions
  device = tiers.device_sharding()
  key = jax.random.key(0)
  layers = [{h: jax.device_put(_random_group(model, f"layers/0/{h}", jax.random.fold_in(key, i)),
                               device) for h in ("attn", "mlp")} for i in range(count)]
  head = jax.device_put(_random_group(model, "head", key), device)
  tokens = (jax.device_put(_random_group(model, "embed", key)["tokens"], device)
            if c.tie_word_embeddings else None)
  x = 0.1 * jax.random.normal(key, (1, 1, c.hidden_size), model.dtype)
  caches = [fn.new_cache(1, context + 1, device) for _ in range(count)]
  positions = jnp.full((1, 1), context, jnp.int32)
  mask = jnp.ones((1, context + 1), bool)

  def attention_sweep():
    y = x
    for i, layer in enumerate(layers):
      y, caches[i] = fn.attention(layer["attn"], y, caches[i], context, positions, mask)
    y.block_until_ready()

  def mlp_sweep():
    y = x
    for layer in layers:
      y = fn.ffn(layer["mlp"], y)
    y.block_until_ready()

  def head_call():
    fn.head(head, tokens, x).block_until_ready()

  results = {}
  for name, run, calls in (("attn_s", attention_sweep, count), ("mlp_s", mlp_sweep, count),
                           ("head_s", head_call, 1)):
    run()  # compile, and fault the pages in
    results[name] = best_time(run, repeats) / calls
  return results


def _time_layer_copy(model, copies: int, repeats: int) -> float:
  """Seconds of one layer's host -> device copy, as layer-wise streams it: both
  halves in one device_put from host memory, the last two copies alive (its
  ring at prefetch depth 1), the older one dropped when a new one arrives."""
  device, host = tiers.device_sharding(), tiers.host_sharding()
  key = jax.random.key(0)
  hosted = [{h: jax.device_put(_random_group(model, f"layers/0/{h}", jax.random.fold_in(key, i)),
                               host) for h in ("attn", "mlp")} for i in range(copies)]
  jax.block_until_ready(hosted)

  def copy_sweep():
    ring = collections.deque(maxlen=2)
    for tree in hosted:
      ring.append(jax.device_put(tree, device))
      jax.block_until_ready(ring[-1])

  copy_sweep()
  return best_time(copy_sweep, repeats) / copies


def calibrate(model, profile: HardwareProfile, context: int = 64, total_bytes: int = 4 * GiB,
              repeats: int = 3, progress: bool = True) -> HardwareProfile:
  """Measures `model`'s decode halves, head and layer copy; returns the profile with them.

  Args:
    model: a hetflow Model; only its shapes are used (weights are random).
    profile: this machine's HardwareProfile (the result is a copy with
      `models[model_key(model)]` set).
    context: KV positions the attention half attends over.
    total_bytes: distinct layer bytes cycled through per timing (>= the
      caches); capped at the model's layers.
    repeats: best of this many sweeps.
    progress: print what is measured.

  Returns:
    A new HardwareProfile.
  """
  c = model.config
  layer_bytes = _layer_nbytes(model)
  count = max(1, min(c.num_layers, math.ceil(total_bytes / layer_bytes), _max_layers(model)))
  if progress:
    print(f"calibrating {model_key(model)} on this machine: {count} layers of random weights"
          f" ({format_bytes(count * layer_bytes)}), once ...", flush=True)
  results = _time_halves(model, count, context, repeats)
  results["layer_copy_s"] = _time_layer_copy(model, max(3, min(count, 8)), repeats)
  results["context"] = float(context)
  results["layers_cycled"] = float(count)
  quantized = model.weights != "float32"
  if not quantized:  # neuron_cluster and tensor_split take float32 weights only
    results["gather_bw"] = gather_rate(model, repeats=repeats)
  if jax.default_backend() == "cpu" and not quantized:
    # At the split this machine's profile gives (one tiny and one wide
    # multiply per kernel cost more than two halves).
    alpha = costmodel.phase_alpha(profile, 1, model.dtype)
    results["split_kernel_s"] = split_kernel_overhead(model, alpha, max(repeats, 5))
  if progress:
    print("  " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in results.items()
                           if k.endswith("_s"))
          + (f", gather {results['gather_bw'] / 1e9:.2f} GB/s" if "gather_bw" in results else ""),
          flush=True)
  models = dict(profile.models)
  models[model_key(model)] = results
  profile = dataclasses.replace(profile, models=models)
  if quantized and model.weights not in profile.cpu_matvec_bw:
    widest = max((m for g in ("layers/0/attn", "layers/0/mlp")
                  for m in costmodel.group_matrices(model, g)), key=lambda m: m.num_params)
    profile = with_format_rate(profile, model.weights, widest.shape[-2:],
                               min(total_bytes, GiB), repeats, progress)
  return profile


def with_format_rate(profile: HardwareProfile, fmt: str, shape: tuple[int, int] = (4096, 4096),
                     total_bytes: int = GiB, repeats: int = 3,
                     progress: bool = True) -> HardwareProfile:
  """`profile` with weight format `fmt`'s matrix-vector rate measured on this machine's CPU
  (`probes.format_matvec_rate`: through the kernel `formats.matmul` uses now), as the
  device's too where the device is the CPU. A profile measured before formats existed
  gains the figure the cost model would otherwise take a conservative default for."""
  device = jax.devices("cpu")[0]
  rate = format_matvec_rate(device, fmt, shape, total_bytes, repeats)
  if progress:
    print(f"  {fmt} matrix-vector: {rate / 1e9:.2f} GB/s of stored weights", flush=True)
  cpu = dict(profile.cpu_matvec_bw, **{fmt: rate})
  impl = dict(profile.matvec_impl, **{fmt: "formats.matmul"})
  dev = dict(profile.device_matvec_bw, **{fmt: rate}) if hardware.device_is_cpu(profile) \
      else profile.device_matvec_bw
  return dataclasses.replace(profile, cpu_matvec_bw=cpu, device_matvec_bw=dev, matvec_impl=impl)


def summary(profile, model) -> str:
  """One line: the calibration used for `model`, or that there is none."""
  m = measured_costs(profile, model)
  if not m:
    return f"{model_key(model)}: not calibrated (roofline from the profile's generic rates)"
  return (f"{model_key(model)}: calibrated decode attn {m['attn_s'] * 1e3:.2f} ms, ffn"
          f" {m['mlp_s'] * 1e3:.2f} ms, head {m['head_s'] * 1e3:.2f} ms, layer copy"
          f" {m['layer_copy_s'] * 1e3:.2f} ms")
