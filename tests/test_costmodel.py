"""The cost model's weight formats and its several-hosts model: each test checks a
prediction against the closed form it must reduce to, or a limit it must show."""

import dataclasses
import json

import pytest

import hetflow
from hetflow import costmodel, hardware, planner, simulate
from hetflow.strategy import get_strategy

A10 = hardware.PROFILES["a10-pcie"]
GB = 1e9

# A CPU-only machine like this one: the device is the CPU, a ~1.5 GB/s disk.
CPU = hardware.HardwareProfile(
    name="cpu-test", cores=2,
    disk_read_bw={1: {1 << 20: 1.5e9}, 8: {1 << 20: 1.6e9}},
    host_to_device_bw={"pinned_host": 5e9}, memory_bw=10e9,
    cpu_matvec_bw={"float32": 12e9}, cpu_flops={"float32": 150e9},
    device_matvec_bw={"float32": 12e9}, device_flops={"float32": 150e9},
    device_memory=None, host_memory=24 << 30)


def _kernel_bytes(model):
  return sum(m.nbytes for g in model.group_names() if g.startswith("layers/")
             for m in costmodel.group_matrices(model, g))


def _resident(model, profile, **kw):
  plan = get_strategy("resident")().plan(model, hetflow.Budget())
  return simulate.predict(model, plan, profile, prompt_len=16, new_tokens=16, **kw)


# -- weight formats -------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["int8", "int8-g32", "int4", "int4-asym", "bfloat16"])
def test_matrices_count_stored_bytes_of_each_format(weights):
  model = hetflow.synthetic_model("llama-tiny", weights=weights)
  for g in ("layers/0/attn", "layers/0/mlp"):
    mats = costmodel.group_matrices(model, g)
    assert [m.name for m in mats] == (["q", "k", "v", "o"] if g.endswith("attn")
                                      else ["gate", "up", "down"])
    assert {m.format for m in mats} == {model.weights}
    # kernels plus norms are the group's stored bytes: nothing counted twice or missed
    assert sum(m.nbytes for m in mats) + costmodel.small_nbytes(model, g) == model.group_nbytes(g)
  # llama-1b's rows are wide enough that a per-channel scale is negligible, as bits_per_weight has it
  wide = hetflow.synthetic_model("llama-1b", weights=weights)
  ratio = _kernel_bytes(wide) / _kernel_bytes(hetflow.synthetic_model("llama-1b"))
  bits = hetflow.models.formats.WeightFormat.parse(weights).bits_per_weight
  assert ratio == pytest.approx(bits / 32, rel=0.02)


def test_rate_is_the_formats_own_then_its_kind_then_a_conservative_default():
  table = {"float32": 16e9, "int4": 2e9}
  assert costmodel.rate_for(table, "int4") == (2e9, "measured")
  # another group size of int4: the same weights per second, more or fewer bytes
  rate, why = costmodel.rate_for(table, "int4-g64")
  assert why == "measured int4" and rate == pytest.approx(2e9 / 4.5 * 4.25)
  rate, why = costmodel.rate_for(table, "int8-g32")
  assert why.startswith("default")
  # never faster per weight than float32 where nothing was measured
  assert rate / 8.5 < 16e9 / 32
  assert costmodel.rate_for(table, "float32") == (16e9, "measured")
  with pytest.raises(hetflow.models.formats.FormatError):
    costmodel.rate_for(table, "int5")


def test_resident_decode_follows_the_profiles_format_rate():
  model = hetflow.synthetic_model("llama-1b", weights="int4")
  slow = dataclasses.replace(CPU, cpu_matvec_bw=dict(CPU.cpu_matvec_bw, int4=1e9),
                             device_matvec_bw=dict(CPU.device_matvec_bw, int4=1e9))
  fast = dataclasses.replace(slow, device_matvec_bw=dict(CPU.device_matvec_bw, int4=2e9))
  t_slow = _resident(model, slow).decode_s_per_token
  t_fast = _resident(model, fast).decode_s_per_token
  # the untied head takes the format too
  kernels = _kernel_bytes(model) + model.group_nbytes("head") - 4 * model.config.hidden_size
  # only the kernels' term moves, by exactly their bytes at the two rates
  assert t_slow - t_fast == pytest.approx(kernels / 1e9 - kernels / 2e9, rel=0.01)
  assert t_slow > kernels / 1e9


def test_quantized_layerwise_from_disk_reads_its_stored_bytes():
  budget = hetflow.Budget(device="1GiB")
  preds, disk = {}, {}
  for weights in ("float32", "int8", "int4"):
    model = hetflow.synthetic_model("llama-1b", weights=weights)
    plan = get_strategy("layerwise")(dict(offload_tier="disk", resident_layers=0,
                                          kv_reserve_tokens=64)).plan(
        model, budget, A10)
    preds[weights] = simulate.predict(model, plan, A10, prompt_len=16, new_tokens=16)
    disk[weights] = sum(g.nbytes for g in plan.groups.values() if g.tier == "disk")
    assert preds[weights].bottleneck == "disk"
  # disk-bound: time per token goes with the bytes streamed
  for weights in ("int8", "int4"):
    assert (preds[weights].decode_s_per_token / preds["float32"].decode_s_per_token
            == pytest.approx(disk[weights] / disk["float32"], rel=0.1))
  assert disk["int4"] < 0.16 * disk["float32"]


def test_calibration_of_one_format_is_not_used_for_another():
  f32 = hetflow.synthetic_model("llama-tiny")
  int8 = hetflow.synthetic_model("llama-tiny", weights="int8")
  assert hardware.model_key(f32) != hardware.model_key(int8)
  entry = {"attn_s": 1.0, "mlp_s": 1.0, "head_s": 1.0, "layer_copy_s": 1.0, "context": 64.0}
  calibrated = dataclasses.replace(CPU, models={hardware.model_key(f32): entry})
  assert hardware.measured_costs(calibrated, int8) is None
  assert _resident(int8, calibrated).decode_s_per_token < 0.1  # the 1 s calibration is f32's


# -- several hosts ----------------------------------------------------------------------


def test_shard_holds_one_nth_of_every_layer():
  model = hetflow.synthetic_model("llama-2-70b")
  c = model.config
  whole = model.group_nbytes("embed") + model.group_nbytes("head")

  def layers(m):
    return m.nbytes - m.group_nbytes("embed") - m.group_nbytes("head")

  layer = model.group_nbytes("layers/0/attn") + model.group_nbytes("layers/0/mlp")
  previous = layers(model)
  for hosts in (2, 4, 8, 16):
    shard = costmodel.shard_model(model, hosts)
    # the embedding and the head are whole on every host, as the engine's mesh keeps them
    assert shard.group_nbytes("embed") + shard.group_nbytes("head") == whole
    shard_layer = shard.group_nbytes("layers/0/attn") + shard.group_nbytes("layers/0/mlp")
    norms = 2 * c.hidden_size * 4  # replicated on every host
    kv = 2 * c.hidden_size * c.num_kv_heads * c.head_dim * 4  # k and v: 8 heads, so at most /8
    expected = (layer - norms - kv) / hosts + kv / min(hosts, c.num_kv_heads)
    assert shard_layer - norms == expected
    if hosts <= c.num_kv_heads:
      assert layers(shard) == pytest.approx(previous / 2, rel=0.001)  # layer bytes per host halve
    else:  # past 8 hosts k and v stop shrinking: a little more than half
      assert previous / 2 < layers(shard) < 1.03 * previous / 2
    previous = layers(shard)
  # 8 key/value heads over 16 hosts: each host keeps the one its 4 query heads use
  assert costmodel.shard_model(model, 16).config.num_kv_heads == 1
  with pytest.raises(ValueError, match="num_heads=64 is not a multiple of 3"):
    costmodel.shard_model(model, 3)


def test_allreduce_is_latency_bound_for_small_vectors_and_grows_with_hosts():
  net = hardware.NETWORKS["10gbe"]
  hidden = 8192 * 4
  times = [costmodel.allreduce_time(hidden, n, net) for n in (1, 2, 4, 8, 16)]
  assert times[0] == 0.0
  assert all(a < b for a, b in zip(times, times[1:]))
  # a 32 KiB vector: recursive doubling, log2(N) messages each dominated by latency
  assert times[-1] == pytest.approx(4 * (net["latency_s"] + hidden / net["bandwidth"]))
  assert 4 * net["latency_s"] > 0.5 * times[-1]
  # a large vector: the ring, bandwidth-bound near 2 (N-1)/N bytes
  big = 1 << 30
  assert costmodel.allreduce_time(big, 16, net) == pytest.approx(
      2 * 15 / 16 * big / net["bandwidth"], rel=0.01)
  faster = hardware.NETWORKS["100gbe"]
  assert costmodel.allreduce_time(big, 16, faster) < costmodel.allreduce_time(big, 16, net) / 5


def _cluster_rows(model, profile, budget, hosts=(1, 2, 4, 8, 16), networks=("10gbe",)):
  return planner.cluster_table(model, budget, profile, hosts, networks, prompt_len=16,
                               new_tokens=16, strategies=["resident", "layerwise"])


def test_network_dominates_at_16_hosts_on_10gbe_with_a_fast_device():
  model = hetflow.synthetic_model("llama-2-70b")
  rows = _cluster_rows(model, A10, dict(device="22GiB", host="64GiB", disk="300GiB"),
                       hosts=(1, 2, 4, 8, 16, 32, 64), networks=("10gbe", "100gbe"))
  by = {(r.network, r.hosts): r for r in rows}
  one = by[("10gbe", 1)].best.prediction
  assert one.network_s_per_token == 0.0
  sixteen = by[("10gbe", 16)]
  p = sixteen.best.prediction
  assert sixteen.limit == "network"
  assert p.network_s_per_token > 0.5 * p.decode_s_per_token
  # 160 all-reduces: two per layer
  one_allreduce = costmodel.allreduce_time(8192 * 4, 16, hardware.NETWORKS["10gbe"])
  assert p.network_s_per_token == pytest.approx(160 * one_allreduce)
  # the network share grows with the hosts on both networks
  for net in ("10gbe", "100gbe"):
    shares = [by[(net, n)].best.prediction.network_s_per_token
              / by[(net, n)].best.prediction.decode_s_per_token for n in (2, 4, 8, 16)]
    assert shares == sorted(shares)
  # resident from 16 hosts on, each doubling halves the compute but adds a message to
  # every all-reduce: on 10 GbE, 16 -> 32 hosts no longer pays
  tok = [by[("10gbe", n)].tokens_per_s for n in (16, 32, 64)]
  assert tok[1] < 1.2 * tok[0] and tok[2] < 1.2 * tok[1]
  assert "10gbe: stops scaling at 16 -> 32 hosts" in planner.format_cluster_table(rows, {})


def test_this_kind_of_machine_scales_while_disk_bound_and_one_host_lacks_the_disk():
  model = hetflow.synthetic_model("llama-2-70b")
  rows = _cluster_rows(model, CPU, dict(device="20GiB", host="0", disk="200GiB"))
  assert rows[0].best is None  # 257 GiB > 200 GiB of disk
  assert "layerwise(resident_layers=auto): disk tier over budget" in rows[0].limit
  fits = [r for r in rows if r.best]
  assert [r.hosts for r in fits] == [2, 4, 8, 16]
  tok = [r.tokens_per_s for r in fits]
  assert tok == sorted(tok) and tok[-1] > 8 * tok[0]
  assert [r.limit for r in fits[:3]] == ["disk"] * 3
  disk = [r.disk_per_token for r in fits[:3]]
  assert disk[1] < 0.5 * disk[0] and disk[2] < 0.5 * disk[1]  # less to stream, more resident
  assert fits[-1].disk_per_token == 0 and fits[-1].limit == "compute"


def test_strategies_without_collectives_are_not_predicted_on_a_cluster():
  model = hetflow.synthetic_model("llama-tiny")
  ranked = planner.plan(model, hetflow.Budget(device="1MiB"), hardware.with_network(A10, "10gbe"),
                        prompt_len=8, new_tokens=4, cluster=costmodel.Cluster(2))
  tensor_split = [r for r in ranked if r.strategy == "tensor_split"]
  assert tensor_split and all(not r.feasible for r in tensor_split)
  assert any("all-reduces" in r.reason for r in tensor_split)
  assert any(r.feasible and r.strategy == "layerwise" for r in ranked)
  with pytest.raises(ValueError, match="has no network"):
    planner.plan(model, None, A10, cluster=costmodel.Cluster(2), strategies=["resident"])


def _layerwise_disk(model, profile, cluster):
  """The mesh benchmark's plan (hetflow/bench/mesh.py): every layer streamed from disk."""
  shard = costmodel.shard_model(model, cluster.hosts)
  prof = hardware.shared(profile, cluster.per_machine)
  plan = get_strategy("layerwise")(dict(offload_tier="disk", resident_layers=0)).plan(
      shard, hetflow.Budget(), prof)
  return plan, simulate.predict(shard, plan, prof, prompt_len=16, new_tokens=8, cluster=cluster)


def test_two_processes_sharing_one_disk_hold_the_single_process_rate():
  """llama-1b layer-wise from disk: 2 processes on one machine (each half of every layer,
  half the disk and cores) against 1 process: same bytes per second through one disk."""
  model = hetflow.synthetic_model("llama-1b")
  local = hardware.with_network(CPU, {"bandwidth": 2.7e9, "latency_s": 125e-6})
  plan1, one = _layerwise_disk(model, local, costmodel.Cluster())
  plan2, two = _layerwise_disk(model, local, costmodel.Cluster(2, per_machine=2))
  streamed = [sum(g.nbytes for g in p.groups.values() if g.tier == "disk") for p in (plan1, plan2)]
  assert streamed[1] == pytest.approx(streamed[0] / 2, rel=0.01)  # bytes per process halve
  assert one.bottleneck == two.bottleneck == "disk"
  ratio = two.decode_tokens_per_s / one.decode_tokens_per_s
  assert 0.85 <= ratio < 1.0  # the all-reduces cost a little; the shared disk sets the pace
  assert two.network_s_per_token == pytest.approx(44 * 125e-6, rel=0.05)
  # on two machines (a disk each) the same shards stream twice as fast
  _, apart = _layerwise_disk(model, local, costmodel.Cluster(2, per_machine=1))
  assert apart.decode_tokens_per_s > 1.8 * one.decode_tokens_per_s


def test_network_in_profiles_round_trips_and_is_checked(tmp_path):
  p = hardware.with_network(CPU, "100gbe")
  assert p.network == hardware.NETWORKS["100gbe"]
  path = tmp_path / "p.json"
  p.to_json(path)
  assert hardware.HardwareProfile.from_json(path) == p
  assert "latency" in p.table()
  with pytest.raises(KeyError, match="no network preset 'wifi'"):
    hardware.with_network(CPU, "wifi")
  bad = json.loads(p.to_json())
  bad["network"] = {"bandwidth": 1e9}
  with pytest.raises(ValueError, match="latency_s"):
    hardware.HardwareProfile.from_dict(bad)
  half = hardware.shared(CPU, 2)
  # two readers of 4 requests each keep 8 in flight on the one disk
  assert half.disk_bw(1 << 20, 4) == pytest.approx(CPU.disk_bw(1 << 20, 8) / 2)
  assert half.disk_bw(1 << 20, 1) == pytest.approx(CPU.disk_bw(1 << 20, 2) / 2)
  assert half.device_matvec_bw["float32"] == CPU.device_matvec_bw["float32"] / 2
  with pytest.raises(ValueError, match="whole machines"):
    costmodel.Cluster(3, per_machine=2)
