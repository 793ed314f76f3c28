"""Tests for hetflow.hardware: profiles, interpolation, JSON, a tiny measurement."""

import dataclasses
import json
import math

import pytest

from hetflow.bench import probes
from hetflow.bench.probes import MeasureSettings
from hetflow.hardware import PROFILES, HardwareProfile, get_profile

KiB, MiB = 2**10, 2**20


def _profile(**kw):
  base = dict(
    name="t",
    cores=2,
    disk_read_bw={
      1: {4 * KiB: 50e6, 64 * KiB: 600e6, 1 * MiB: 2e9},
      4: {4 * KiB: 100e6, 1 * MiB: 2.2e9},
    },
    host_to_device_bw={"pinned_host": 10e9, "unpinned_host": 5e9},
    memory_bw=12e9,
    cpu_matvec_bw={"float32": 20e9, "bfloat16": 9e9},
    cpu_flops={"float32": 2e11},
    device_matvec_bw={"float32": 20e9},
    device_flops={"float32": 2e11},
    matvec_impl={"bfloat16": "multiply_sum"},
  )
  base.update(kw)
  return HardwareProfile(**base)


def test_disk_bw_interpolates_in_log_space():
  p = _profile()
  assert p.disk_bw(4 * KiB) == pytest.approx(50e6)
  assert p.disk_bw(64 * KiB, queue_depth=1) == pytest.approx(600e6)
  # 16 KiB is halfway between 4 and 64 KiB in log(size): geometric mean.
  assert p.disk_bw(16 * KiB) == pytest.approx(math.sqrt(50e6 * 600e6))
  # Above the largest size: saturated. Below the smallest: constant IOPS.
  assert p.disk_bw(64 * MiB) == pytest.approx(2e9)
  assert p.disk_bw(2 * KiB) == pytest.approx(25e6)
  # Depth 2 is halfway between 1 and 4 in log(depth).
  assert p.disk_bw(4 * KiB, 2) == pytest.approx(math.sqrt(50e6 * 100e6))
  assert p.disk_bw(4 * KiB, 4) == pytest.approx(100e6)
  assert p.disk_bw(4 * KiB, 32) == pytest.approx(100e6)
  # Monotone in size.
  sizes = [2**k for k in range(10, 25)]
  bws = [p.disk_bw(s) for s in sizes]
  assert bws == sorted(bws)
  with pytest.raises(ValueError):
    p.disk_bw(0)
  with pytest.raises(ValueError):
    p.disk_bw(4096, 0)


def test_link_bw():
  p = _profile()
  assert p.link_bw() == 10e9 and p.link_bw(pinned=False) == 5e9
  assert _profile(host_to_device_bw={"unpinned_host": 3e9}).link_bw() == 3e9


def test_json_round_trip(tmp_path):
  p = _profile()
  path = tmp_path / "p.json"
  text = p.to_json(path)
  assert json.loads(text)["disk_read_bw"]["1"]["4096"] == 50e6
  q = HardwareProfile.from_json(path)
  assert q == p
  assert q.disk_bw(16 * KiB) == p.disk_bw(16 * KiB)
  assert get_profile(str(path)) == p
  bad = json.loads(text)
  bad["disk_bandwith"] = {}
  with pytest.raises(ValueError, match="disk_bandwith"):
    HardwareProfile.from_dict(bad)
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.memory_bw = 1.0


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_named_profiles(name, tmp_path):
  p = get_profile(name)
  assert p.name == name
  assert p.disk_bw(4 * KiB) > 0 and p.link_bw() > 0
  assert HardwareProfile.from_json(p.to_json(tmp_path / "x.json") and tmp_path / "x.json") == p
  assert p.table()


def test_paper_figures():
  a10 = PROFILES["a10-pcie"]
  # HeteGen's gain is capped near 1 + Vcpu/Vlink ~ 2.9x with these figures.
  assert 20e9 <= a10.link_bw() <= 30e9
  assert 40e9 <= a10.cpu_matvec_bw["float16"] <= 50e9
  ufs4 = PROFILES["oneplus12-ufs4"]
  assert ufs4.disk_bw(4 * KiB) == pytest.approx(450e6)
  assert ufs4.disk_bw(512 * KiB) == pytest.approx(4e9)
  assert PROFILES["ace2-ufs31"].disk_bw(512 * KiB) < ufs4.disk_bw(512 * KiB)
  with pytest.raises(KeyError, match="a10-pcie"):
    get_profile("h100-nvlink")


_TINY = MeasureSettings(
  disk_file_bytes=1 * MiB,
  disk_block_sizes=(4 * KiB, 64 * KiB, 1 * MiB),
  disk_queue_depths=(1, 2),
  disk_max_requests=16,
  memcpy_bytes=4 * MiB,
  matvec_dim=256,
  matvec_total_bytes=1 * MiB,
  matmul_dim=128,
  transfer_bytes=1 * MiB,
  repeats=1,
)


def test_measure_tiny(tmp_path):
  p = probes.measure(tmp_path, progress=False, settings=_TINY, name="tiny")
  assert p.name == "tiny" and p.cores >= 1
  assert set(p.disk_read_bw) == {1, 2}
  assert set(p.disk_read_bw[1]) == {4 * KiB, 64 * KiB, 1 * MiB}
  assert all(bw > 0 for row in p.disk_read_bw.values() for bw in row.values())
  assert p.disk_direct is True
  assert p.memory_bw > 0
  # float32's best formulation, and every weight format through the kernel the models use
  assert set(p.cpu_matvec_bw) == {"float32", *probes.FORMATS}
  assert all(bw > 0 for bw in p.cpu_matvec_bw.values())
  assert p.matvec_impl["float32"] in {"dot", "multiply_sum"}
  assert {p.matvec_impl[f] for f in probes.FORMATS} == {"formats.matmul"}
  assert p.cpu_flops["float32"] > 0
  assert "pinned_host" in p.host_to_device_bw
  assert list(tmp_path.iterdir()) == []  # the disk test file is removed
  assert HardwareProfile.from_dict(json.loads(p.to_json())) == p
  assert "disk read (O_DIRECT)" in p.table()


@pytest.mark.slow
def test_measure_quick(tmp_path):
  p = probes.measure(tmp_path, quick=True, progress=False)
  assert p.disk_bw(1 * MiB) > p.disk_bw(4 * KiB)


@pytest.mark.slow
def test_probe_allreduce_between_two_local_processes():
  found = probes.probe_allreduce(hidden_sizes=(2048, 65536), repeats=20)
  assert found["processes"] == 2 and set(found["by_size"]) == {2048, 65536}
  # each psum costs more than the same call without the collective
  assert all(psum > plain for psum, plain in found["by_size"].values())
  assert found["latency_s"] > 0 and found["bandwidth"] > 0
  profile = dataclasses.replace(_profile(), network={k: found[k] for k in
                                                    ("bandwidth", "latency_s", "processes")})
  assert HardwareProfile.from_dict(json.loads(profile.to_json())) == profile
