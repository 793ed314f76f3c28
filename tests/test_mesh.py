"""A model split over a mesh (docs/distributed.md): the shards, the refusals, and the
invariant: on 4 CPU devices in one process and on 2 processes, every strategy that
runs on a mesh gives resident-on-one-device's greedy tokens for the same weights
(float32 or a quantized format; logits within float tolerance: the all-reduce sums
in another order).

The multi-device runs happen in fresh processes (tests/mesh_worker.py): the
device count is fixed when jax starts, and the rest of the suite keeps one.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import hetflow
from hetflow import config as config_lib
from hetflow import distributed
from hetflow.engine import Engine
from hetflow.models import sharding
from hetflow.sparsity.predictor import LowRankPredictor
from hetflow.sparsity.stats import ActivationStats
from strategies import moe_offload
from strategies.neuron_cluster import mesh as nc_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[1, 5, 9, 33, 7, 100], [4, 8, 15]]  # two lengths: left padding included
NEW_TOKENS = 6


def synthetic(name: str) -> hetflow.Model:
  """"model[@weights]" as a synthetic model; "-sparse" models as tests/test_neuron_cluster.py's
  (a Mixtral one: sparse experts, hetflow/checkpoints/moe_sparse.py).

  tests/mesh_worker.py builds its models with this too.
  """
  name, _, weights = name.partition("@")
  sparse = dict(sparsity=0.9, hotness="zipf:1.1", seed=0) if name.endswith("-sparse") else {}
  if name.startswith("mixtral") and sparse:  # sparse experts, calibrated as test_moe_sparse's
    sparse["calibration_tokens"] = 4096
  return hetflow.synthetic_model(name, weights=weights or "float32", **sparse)


# -- the shards, in this process ----------------------------------------------------------


@pytest.mark.parametrize("name,n", [("llama-tiny", 2), ("llama-tiny", 4), ("opt-tiny", 4),
                                    ("mixtral-tiny", 2)])
def test_shards_side_by_side_are_the_full_tensors(name, n):
  model = hetflow.synthetic_model(name)
  shards = [sharding.shard_model(model, r, n) for r in range(n)]
  g, k = model.config.num_kv_heads, model.config.head_dim
  for param in model.logical_shapes:
    full = model.tensor(param)
    parts = [s.tensor(param) for s in shards]
    axis = sharding.split_axis(model.config, param)
    leaf = param.rsplit("/", 1)[-1]
    if axis is None:
      for p in parts:
        np.testing.assert_array_equal(p, full, err_msg=param)
    elif leaf in ("k", "v", "k_bias", "v_bias") and g < n:
      # Fewer kv heads than shards: shard r holds kv head r // (n / g), whole.
      for r, p in enumerate(parts):
        head = r // (n // g)
        np.testing.assert_array_equal(
            p, np.take(full, range(head * k, (head + 1) * k), axis=axis), err_msg=param)
    else:
      np.testing.assert_array_equal(np.concatenate(parts, axis=axis), full, err_msg=param)
  # Every shard is a model of its own: its shapes are what it holds.
  assert shards[0].config.num_heads == model.config.num_heads // n
  assert shards[0].config.intermediate_size == model.config.intermediate_size // n


@pytest.mark.parametrize("name,weights,n", [("llama-tiny", "int8", 4), ("llama-tiny", "int4", 2),
                                            ("llama-tiny", "bfloat16", 4),
                                            ("llama-tiny", "int8-g32", 2),
                                            ("mixtral-tiny", "int8", 2)])
def test_quantized_shards_hold_slices_of_the_full_stored_kernels(name, weights, n):
  """A shard's stored leaves are the full model's stored kernel sliced (never a kernel
  quantized from a slice: a per-channel scale over half a row would differ)."""
  model = hetflow.synthetic_model(name, weights=weights)
  shards = [sharding.shard_model(model, r, n) for r in range(n)]
  fmt = model.format
  g = model.config.num_kv_heads
  checked = set()
  for leaf, spec in model.shapes.items():
    full = model.tensor(leaf)
    parts = [s.tensor(leaf) for s in shards]
    axis = sharding.stored_split_axis(model.config, fmt, leaf, len(spec.shape))
    kernel = leaf.rsplit("/", 1)[0].rsplit("/", 1)[-1]
    if axis is None:
      for p in parts:
        np.testing.assert_array_equal(p, full, err_msg=leaf)
    elif kernel in ("k", "v") and g < n:
      for r, p in enumerate(parts):
        head, k = r // (n // g), model.config.head_dim
        np.testing.assert_array_equal(
            p, np.take(full, range(head * k, (head + 1) * k), axis=axis), err_msg=leaf)
    else:
      np.testing.assert_array_equal(np.concatenate(parts, axis=axis), full, err_msg=leaf)
    checked.add((kernel, leaf.rsplit("/", 1)[-1], axis is None))
  # Both kinds of split were seen on quantized leaves.
  assert ("o", "q", False) in checked and ("up", "q", False) in checked
  if fmt.kind == "int8" and not fmt.group:
    assert ("down", "scale", True) in checked  # per-channel scales of a row split: whole


def test_shards_that_cannot_be_made_are_refused_by_name():
  with pytest.raises(sharding.ShardingError, match="num_heads=4 is not a multiple of 3"):
    sharding.shard_model(hetflow.synthetic_model("opt-tiny"), 0, 3)
  # llama-tiny's `o` has 64 inputs: 16 per shard of 4 cannot hold a group of 32.
  with pytest.raises(sharding.ShardingError,
                     match="llama-tiny in weights='int4' cannot be split into 4 shards: `o`"
                     ".*16 per shard.*groups of 32"):
    sharding.shard_model(hetflow.synthetic_model("llama-tiny", weights="int4"), 0, 4)
  with pytest.raises(sharding.ShardingError, match="mixtral-tiny.*2 shards: `down`.*48 per"):
    sharding.shard_model(hetflow.synthetic_model("mixtral-tiny", weights="int8-g32"), 0, 2)


def test_neuron_cluster_lanes_get_their_neurons_slices():
  """A shard's predictor and statistics are the full ones' columns of its neurons."""
  rng = np.random.default_rng(0)
  d, r, f = 8, 3, 12
  layers = [{"mean": rng.normal(size=d), "inv_std": rng.uniform(1, 2, d),
             "fc1": rng.normal(size=(d, r)), "b1": rng.normal(size=r),
             "fc2": rng.normal(size=(r, f)), "b2": rng.normal(size=f)},
            {"u": rng.normal(size=(d, r)), "v": rng.normal(size=(r, f))},
            {"exact": rng.normal(size=(d, f))}]
  full = LowRankPredictor([{k: v.astype(np.float32) for k, v in p.items()} for p in layers],
                          [0.1, -0.2, 0.0])
  part = nc_mesh._slice_predictor(full, 4, 8)
  for p in (full, part):
    p.place(None)
  x = rng.normal(size=(1, 2, d)).astype(np.float32)
  for layer in range(3):
    np.testing.assert_array_equal(np.asarray(part.predict(layer, x)),
                                  np.asarray(full.predict(layer, x))[..., 4:8])
  stats = ActivationStats(counts=rng.integers(0, 9, (3, f)), tokens=9,
                          coactivation=rng.integers(0, 9, (3, f, f)))
  sliced = nc_mesh._slice_stats(stats, 4, 8)
  np.testing.assert_array_equal(sliced.counts, stats.counts[:, 4:8])
  np.testing.assert_array_equal(sliced.coactivation, stats.coactivation[:, 4:8, 4:8])


def test_mesh_arguments_are_checked():
  assert sharding.as_mesh(None) is None and sharding.as_mesh(1) is None
  assert sharding.as_mesh({"model": 1}) is None
  with pytest.raises(sharding.ShardingError, match="xla_force_host_platform_device_count"):
    sharding.as_mesh(2)  # this process has one device
  with pytest.raises(sharding.ShardingError, match="mesh axes \\['data'\\]"):
    sharding.as_mesh({"data": 2})
  with pytest.raises(sharding.ShardingError, match="expected None, an int"):
    sharding.as_mesh("2")
  with pytest.raises(sharding.ShardingError):
    Engine(hetflow.synthetic_model("llama-tiny"), "resident", mesh=2)


def test_config_mesh_section():
  assert config_lib.build_mesh(config_lib.mesh_section(1)) is None
  assert config_lib.build_mesh(config_lib.mesh_section(2)) == 2
  with pytest.raises(config_lib.ConfigError, match="mesh.model=0"):
    config_lib.build_mesh({"model": 0})
  with pytest.raises(config_lib.ConfigError, match="mesh.data is not a mesh field"):
    config_lib.build_mesh({"model": 2, "data": 2})


def test_process_group_from_flags_or_environment():
  env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "2",
         distributed.ENV_PROCESS_ID: "1"}
  assert distributed.process_group(environ={}) is None
  assert distributed.process_group(environ=env) == distributed.ProcessGroup(
      "10.0.0.1:1234", 2, 1)
  # Flags win over the environment.
  assert distributed.process_group(process_id=0, environ=env).process_id == 0
  with pytest.raises(distributed.DistributedError, match="'process_id'.*not given"):
    distributed.process_group("h:1", 2, environ={})
  with pytest.raises(distributed.DistributedError, match="process_id=2"):
    distributed.process_group("h:1", 2, 2, environ={})
  with pytest.raises(distributed.DistributedError, match="coordinator='nohost'"):
    distributed.process_group("nohost", 2, 0, environ={})
  bad = dict(env, **{distributed.ENV_NUM_PROCESSES: "two"})
  with pytest.raises(distributed.DistributedError, match="HETFLOW_NUM_PROCESSES='two'"):
    distributed.process_group(environ=bad)


# -- several devices and several processes (fresh processes) ------------------------------


def _reference(name):
  """Resident on one device: the tokens and logits every mesh run must give.

  Args:
    name: "model" or "model@weights" (a weight format).
  """
  with Engine(synthetic(name), "resident") as engine:
    tokens = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=()).tokens
    return tokens.tolist(), engine.forward(PROMPTS[:1])[0, -1]


def _results(command, tmp_path, specs):
  setup = json.dumps({"prompts": PROMPTS, "new_tokens": NEW_TOKENS,
                      "store_root": str(tmp_path)})
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(command + [setup] + specs, capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = []
  for line in proc.stdout.splitlines():
    if "RESULT " in line:
      prefix, _, body = line.partition("RESULT ")
      out.append((prefix.strip(), json.loads(body)))
  return out


def _check(results, refs):
  for where, r in results:
    if r["spec"].startswith("refuse-split:"):
      assert r["refused"] and "cannot be split into" in r["refused"], r
      continue
    if "refused" in r:
      _, strategy, *kv = r["spec"].split(":")
      expected = "kv_cache_tier='host' on a mesh" if kv else f"{strategy!r} does not run on a mesh"
      assert r["refused"] and expected in r["refused"], r
      continue
    tokens, logits = refs[r["spec"].split(":")[0]]  # the model and its weights
    if r["spec"].endswith(":one"):  # the first prompt alone
      tokens = tokens[:1]
    assert r["tokens"] == tokens, (where, r["spec"])
    np.testing.assert_allclose(r["logits"], logits, atol=1e-5, rtol=0,
                               err_msg=f"{where} {r['spec']}")


def _shard_layer_bytes(name, n):
  shard = sharding.shard_model(synthetic(name), 0, n)
  return sum(shard.group_nbytes(g) for g in shard.group_names() if g.startswith("layers/"))


def test_four_devices_in_one_process_give_resident_tokens(tmp_path):
  specs = ["llama-tiny:2:resident", "llama-tiny:4:resident", "llama-tiny:4:layerwise",
           "llama-tiny:2:layerwise:host", "llama-tiny@int8:4:resident",
           "llama-tiny@int4:2:layerwise", "llama-tiny@bfloat16:4:layerwise",
           "llama-tiny:4:tensor_split", "llama-tiny@int4:2:tensor_split",
           "llama-tiny-sparse:4:neuron_cluster", "llama-tiny-sparse:2:neuron_cluster:ahead",
           "mixtral-tiny:4:moe_offload", "refuse:test-unsharded", "refuse:layerwise:kv_host"]
  results = _results([sys.executable, "tests/mesh_worker.py", "4"], tmp_path, specs)
  assert [r["spec"] for _, r in results] == specs
  _check(results, {n: _reference(n) for n in ("llama-tiny", "llama-tiny@int8",
                                              "llama-tiny@int4", "llama-tiny@bfloat16",
                                              "llama-tiny-sparse", "mixtral-tiny")})
  by_spec = {r["spec"]: r for _, r in results}
  streamed = by_spec["llama-tiny:4:layerwise"]
  assert streamed["local_shards"] == [0, 1, 2, 3]
  # Four stores of one shard each, every one smaller than half the 2-shard layers.
  assert len(streamed["store_bytes"]) == 4
  per_token = streamed["decode_disk_bytes"] / streamed["decode_tokens"]
  assert per_token == 4 * _shard_layer_bytes("llama-tiny", 4)
  # tensor_split: every shard's kernels split (2 matmuls of each of the 7 kernels per
  # layer and shard: none resident), on 4 lanes.
  split = by_spec["llama-tiny:4:tensor_split"]
  layers = hetflow.synthetic_model("llama-tiny").config.num_layers
  assert split["split_matmuls"] == 4 * 7 * layers * split["decode_tokens"]
  _check_neuron_stores(by_spec["llama-tiny-sparse:4:neuron_cluster"], [0, 1, 2, 3], 4)
  assert by_spec["llama-tiny-sparse:2:neuron_cluster:ahead"]["ahead_read"] > 0  # lanes guessed
  _check_expert_stores(by_spec["mixtral-tiny:4:moe_offload"], [0, 1, 2, 3], 4)


def _check_expert_stores(r, ranks, n):
  """Each local shard has its own expert store, every expert's F/N slice, and reads it."""
  assert r["local_shards"] == ranks
  assert [os.path.basename(p) for p in r["store_bytes_paths"]] == [
      f"shard-{k}-of-{n}" for k in ranks]
  shard = sharding.shard_model(synthetic("mixtral-tiny"), 0, n)
  c = shard.config
  for nbytes in r["store_bytes"]:  # every expert of every layer, as one shard's records
    assert nbytes >= c.num_layers * c.num_experts * moe_offload.record_nbytes(shard)
  assert r["decode_disk_bytes"] > 0


def _check_neuron_stores(r, ranks, n):
  """Each local shard has its own store of its F/N neurons, and reads from it."""
  f = synthetic("llama-tiny-sparse").config.intermediate_size
  assert r["local_shards"] == ranks
  assert r["store_neurons"] == [f // n] * len(ranks)
  assert [os.path.basename(p) for p in r["store_bytes_paths"]] == [
      f"shard-{k}-of-{n}" for k in ranks]
  assert r["decode_disk_bytes"] > 0


@pytest.mark.slow  # ~40 s of CPU more; the llama runs cover the default suite
def test_four_devices_opt_and_mixtral_give_resident_tokens(tmp_path):
  specs = ["opt-tiny:4:resident", "opt-tiny:4:layerwise", "mixtral-tiny:2:resident",
           "mixtral-tiny:2:layerwise", "opt-tiny@int4:2:layerwise", "mixtral-tiny@int8:2:resident",
           "opt-tiny:4:tensor_split", "mixtral-tiny@int8:2:tensor_split",
           "opt-tiny-sparse:2:neuron_cluster", "mixtral-tiny:2:moe_offload:one"]
  results = _results([sys.executable, "tests/mesh_worker.py", "4"], tmp_path, specs)
  assert [r["spec"] for _, r in results] == specs
  _check(results, {n: _reference(n) for n in ("opt-tiny", "mixtral-tiny", "opt-tiny@int4",
                                              "mixtral-tiny@int8", "opt-tiny-sparse")})


def test_two_processes_give_resident_tokens_and_read_half_each(tmp_path):
  specs = ["llama-tiny:2:resident", "llama-tiny:2:layerwise", "llama-tiny@int4:2:layerwise",
           "llama-tiny:2:tensor_split", "llama-tiny-sparse:2:neuron_cluster",
           "mixtral-tiny:2:moe_offload:one"]
  command = [sys.executable, "-m", "hetflow.launch", "--processes=2", "--",
             sys.executable, "tests/mesh_worker.py", "1"]
  results = _results(command, tmp_path, specs)
  assert sorted(where for where, _ in results) == ["[p0]"] * 6 + ["[p1]"] * 6
  _check(results, {n: _reference(n) for n in ("llama-tiny", "llama-tiny@int4",
                                              "llama-tiny-sparse", "mixtral-tiny")})
  for where, r in results:
    model, _, strategy = r["spec"].split(":")[:3]
    if strategy == "neuron_cluster":
      _check_neuron_stores(r, [int(where[2])], 2)
    if strategy == "moe_offload":
      _check_expert_stores(r, [int(where[2])], 2)
      assert r["expert_lookups"] > 0  # decode took the routed-experts path
    if strategy != "layerwise":
      continue
    assert r["local_shards"] == [int(where[2])]  # one shard per process, its own
    per_token = r["decode_disk_bytes"] / r["decode_tokens"]
    # Each process reads its shard: half the layers' bytes, plus its copy of the norms.
    assert per_token == _shard_layer_bytes(model, 2)
    assert per_token < 0.51 * _shard_layer_bytes(model, 1)
    assert len(r["store_bytes"]) == 1


SPARSE_MOE = "mixtral-tiny-8e-sparse"


def _check_expert_neuron_stores(r, ranks, n, weights="float32"):
  """Each local shard has its own store of the F/N neurons of every expert, in the model's
  format, and decode ran routed experts and read from it."""
  c = synthetic(SPARSE_MOE).config
  assert r["local_shards"] == ranks
  assert r["store_neurons"] == [c.intermediate_size // n] * len(ranks)
  assert r["store_weights"] == [weights] * len(ranks)
  assert [os.path.basename(p) for p in r["store_bytes_paths"]] == [
      f"shard-{k}-of-{n}" for k in ranks]
  assert r["decode_disk_bytes"] > 0 and r["experts_run"] > 0


def test_moe_sparse_on_four_devices_gives_resident_tokens(tmp_path):
  """Sparse experts on a mesh: each shard's lane owns F/N neurons of every expert (float32
  on 4 shards, int8 and bfloat16 on 2); a format whose groups `down`'s split would straddle
  (int4: 48 neurons per shard, groups of 32) is refused by name."""
  specs = [f"{SPARSE_MOE}:4:moe_sparse", f"{SPARSE_MOE}@int8:2:moe_sparse",
           f"{SPARSE_MOE}@bfloat16:4:moe_sparse", f"refuse-split:{SPARSE_MOE}@int4:2:moe_sparse"]
  results = _results([sys.executable, "tests/mesh_worker.py", "4"], tmp_path, specs)
  assert [r["spec"] for _, r in results] == specs
  _check(results, {n: _reference(n) for n in (SPARSE_MOE, f"{SPARSE_MOE}@int8",
                                              f"{SPARSE_MOE}@bfloat16")})
  by_spec = {r["spec"]: r for _, r in results}
  _check_expert_neuron_stores(by_spec[specs[0]], [0, 1, 2, 3], 4)
  _check_expert_neuron_stores(by_spec[specs[1]], [0, 1], 2, "int8")
  _check_expert_neuron_stores(by_spec[specs[2]], [0, 1, 2, 3], 4, "bfloat16")


def test_moe_sparse_on_two_processes_gives_resident_tokens(tmp_path):
  specs = [f"{SPARSE_MOE}:2:moe_sparse", f"{SPARSE_MOE}@int8:2:moe_sparse"]
  command = [sys.executable, "-m", "hetflow.launch", "--processes=2", "--",
             sys.executable, "tests/mesh_worker.py", "1"]
  results = _results(command, tmp_path, specs)
  assert sorted(where for where, _ in results) == ["[p0]"] * 2 + ["[p1]"] * 2
  _check(results, {n: _reference(n) for n in (SPARSE_MOE, f"{SPARSE_MOE}@int8")})
  for where, r in results:
    weights = "int8" if "@int8" in r["spec"] else "float32"
    _check_expert_neuron_stores(r, [int(where[2])], 2, weights)


def test_layer_summary_of_a_benchmark_timeline():
  from hetflow.bench.mesh import layer_summary

  def compute(layer, start, end):
    return {"kind": "compute", "layer": layer, "start": start, "end": end, "nbytes": 0}

  events = []
  for p in range(4):  # prefill, the compiling decode pass, then two measured passes
    base = 10.0 * p
    events += [compute(0, base, base + 1.0), compute(1, base + 1.0, base + 3.0)]
  events += [{"kind": "wait", "layer": 1, "start": 31.0, "end": 32.5, "nbytes": 0},
             {"kind": "read", "layer": 1, "start": 30.0, "end": 32.0, "nbytes": 4 * 10**9}]
  s = layer_summary({"timeline": events})
  assert s["passes"] == 2 and s["pass_s"] == [3.0, 3.0]
  assert s["layer_ms"] == pytest.approx(1500.0)  # (1 + 2 + 1 + 2) / 4 s
  assert s["wait_ms"] == pytest.approx(1500.0 / 4)  # one wait of 1.5 s in four layers
  assert s["compute_ms"] == pytest.approx(1500.0 - 375.0)
  assert s["read_GBps"] == pytest.approx(2.0)
