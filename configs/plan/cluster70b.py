"""A 70B model (llama-2-70b's shape) on 1-16 hosts of this machine, over 10 and 100 Gb/s.

Run:
  python -m experiments.plan --config=configs/plan/cluster70b.py
  python -m experiments.plan --config=configs/plan/cluster70b.py \
      --config.profile=/path/to/hardware_profile.json --config.cluster.hosts=16,32,64
Hardware: each host is this machine (its HardwareProfile, measured once and cached in
$HETFLOW_CACHE/hardware_profile.json; a full `python -m experiments.profile_hardware`
profile gives steadier figures than the quick one), joined by the network presets of
hetflow.hardware.NETWORKS; --config.cluster.networks=profile uses the profile's own.
Budget per host: 20 GiB of the 24 GiB memory (device = host memory here), 200 GiB of disk.
Expect (docs/planner.md, "Several hosts"): float32 does not fit one host (its 257 GiB store
exceeds the disk); layer-wise from disk, bound by the disk, up to 8 hosts; at 16 hosts the
shard (18.2 GiB: the embedding and head are whole on every host) is resident and
compute-bound; the all-reduces cost 5-7% on this slow CPU, so the network does not stop the
scaling by 16 hosts. Quantized weights are refused on a mesh for now (hetflow/models/sharding.py).
"""

from hetflow.planner import plan_config


def get_config(arg=None):
  del arg
  return plan_config("llama-2-70b", device="20GiB", host="0", disk="200GiB",
                     cluster=dict(hosts="1,2,4,8,16", networks="10gbe,100gbe", per_machine=1),
                     smoke={"model": {"name": "llama-tiny"}, "budget": {"device": "1MiB",
                                                                        "disk": ""},
                            "profile": "a10-pcie", "cluster": {"hosts": "1,2"},
                            "prompt_tokens": 8, "new_tokens": 4})
