"""The HardwareProfile schema, and named profiles of paper hardware.

A profile holds the rates a planner or simulator needs to predict a strategy's
time: disk read bandwidth by request size and queue depth, the host->device
link, memory bandwidth, and matrix-vector and matmul rates on the CPU and the
accelerator. ``hetflow.bench.probes.measure`` fills one in on the machine at
hand (and ``hetflow.bench.calibration`` adds a model's own decode costs);
``PROFILES`` holds the testbeds of HeteGen and PowerInfer-2 (figures from the
papers where they give them, see docs/papers.md, and stated assumptions where
they do not).

Units: bytes, bytes/s and FLOP/s throughout. Matrix-vector rates are *bytes of
weights consumed per second*, because decode at batch 1 is bound by how fast
the weights stream through, not by arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from hetflow.memory.budget import format_bytes


def cpuinfo_field(name: str) -> str | None:
  """The value of the first `name` line of /proc/cpuinfo ("model name", "flags"); None where
  there is none (not Linux, or an architecture that names it otherwise)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(name):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None

KiB = 2**10
MiB = 2**20
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class HardwareProfile:
  """Measured (or assumed) rates of one machine.

  Dict-valued fields are plain dicts for easy JSON; treat them as read-only.

  Attributes:
    name: what the profile describes, e.g. ``"a10-pcie"`` or a host name.
    cores: CPU cores available to the process.
    disk_read_bw: cold read bandwidth of the disk tier in bytes/s, as
      ``{queue_depth: {request_bytes: bytes_per_s}}``: ``queue_depth`` is the
      number of requests kept in flight (1 = one at a time), request sizes are
      powers of two from 4 KiB. Use :meth:`disk_bw` to interpolate.
    host_to_device_bw: ``jax.device_put`` bandwidth from host memory to the
      device in bytes/s, keyed by the source memory kind (``"pinned_host"``,
      ``"unpinned_host"``). On a CPU-only machine this is a memcpy into fresh
      pages, not a link.
    memory_bw: host memory bandwidth as bytes copied per second by a large
      memcpy (each byte is read once and written once, so the bus moves 2x).
    cpu_matvec_bw: bytes of stored weights per second of a matrix-vector
      product on the CPU, keyed by weight format name (``"float32"``,
      ``"bfloat16"``, ``"int8"``, ``"int8-g32"``, ``"int4"``, ``"int4-asym"``:
      hetflow/models/formats.py; the plain formats are dtype names), with the
      faster of the formulations tried for the plain dtypes and the kernel
      `hetflow.models.formats.matmul` dispatches to for the others. A format
      not listed falls back as `hetflow.costmodel.matvec_bw` says.
    cpu_flops: matmul FLOP/s on the CPU keyed by dtype name.
    device_matvec_bw: as ``cpu_matvec_bw``, on the jax default device (equal
      to the CPU figures on a CPU-only machine).
    device_flops: as ``cpu_flops``, on the jax default device.
    matvec_impl: for each dtype measured, which formulation was faster on the
      CPU: ``"dot"`` (``jnp.dot``) or ``"multiply_sum"`` (``(W * x).sum``);
      ``"formats.matmul"`` for weight formats (whatever kernel it dispatches to).
      XLA's CPU bf16 ``dot`` is far off the memory roof; the elementwise form
      is not.
    device_memory: bytes of accelerator memory, or None (CPU-only / unified).
    host_memory: bytes of host RAM, or None if unknown.
    disk_direct: whether disk figures were taken with O_DIRECT (None: not
      measured here).
    network: the interconnect between hosts (or processes) of a cluster of
      such machines: ``{"bandwidth": bytes/s one way per link, "latency_s":
      seconds per message}``, optionally ``"processes"`` (how many took part in
      the measurement); empty where unknown. `NETWORKS` has presets;
      `hetflow.bench.probes.probe_allreduce` measures local processes.
    models: measured decode costs of specific models' shapes on this machine,
      keyed by ``model_key`` (measured by ``hetflow.bench.calibration``); empty for
      profiles of other machines.
    notes: provenance: how it was measured, or the assumptions behind it.
  """

  name: str
  cores: int
  disk_read_bw: Mapping[int, Mapping[int, float]]
  host_to_device_bw: Mapping[str, float]
  memory_bw: float
  cpu_matvec_bw: Mapping[str, float]
  cpu_flops: Mapping[str, float]
  device_matvec_bw: Mapping[str, float]
  device_flops: Mapping[str, float]
  matvec_impl: Mapping[str, str] = dataclasses.field(default_factory=dict)
  device_memory: int | None = None
  host_memory: int | None = None
  disk_direct: bool | None = None
  network: Mapping[str, float] = dataclasses.field(default_factory=dict)
  models: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
  notes: str = ""

  def __post_init__(self):
    # JSON turns int keys into strings; normalise here so that a profile
    # read back equals the one written.
    table = {
      int(qd): {int(b): float(bw) for b, bw in row.items()} for qd, row in self.disk_read_bw.items()
    }
    if not table or any(not row for row in table.values()):
      raise ValueError(f"{self.name}: disk_read_bw needs at least one depth with one size")
    object.__setattr__(self, "disk_read_bw", table)
    for f in (
      "host_to_device_bw",
      "cpu_matvec_bw",
      "cpu_flops",
      "device_matvec_bw",
      "device_flops",
    ):
      object.__setattr__(self, f, {str(k): float(v) for k, v in getattr(self, f).items()})
    object.__setattr__(self, "network", {str(k): float(v) for k, v in self.network.items()})
    if self.network and not {"bandwidth", "latency_s"} <= set(self.network):
      raise ValueError(f"{self.name}: network needs 'bandwidth' and 'latency_s', got"
                       f" {sorted(self.network)}")
    object.__setattr__(self, "matvec_impl", {str(k): str(v) for k, v in self.matvec_impl.items()})
    object.__setattr__(self, "models", {str(k): {str(n): float(x) for n, x in m.items()}
                                        for k, m in self.models.items()})

  # -- queries --------------------------------------------------------------

  def disk_bw(self, block_bytes: int, queue_depth: int = 1) -> float:
    """Cold disk read bandwidth for requests of ``block_bytes`` with ``queue_depth`` in flight.

    Interpolates linearly in log(size)-log(bandwidth) between measured
    sizes, and in log(depth) between measured depths. Above the largest
    size the bandwidth is held flat (the disk is saturated); below the
    smallest it falls in proportion to the size (a fixed number of requests
    per second: small reads are latency-bound). Depths outside the measured
    range use the nearest one.

    Args:
      block_bytes: request size in bytes (> 0).
      queue_depth: requests in flight (>= 1).

    Returns:
      bytes/s.
    """
    if block_bytes <= 0:
      raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    if queue_depth < 1:
      raise ValueError(f"queue_depth must be >= 1, got {queue_depth}")
    depths = sorted(self.disk_read_bw)
    if queue_depth <= depths[0]:
      return _bw_at(self.disk_read_bw[depths[0]], block_bytes)
    if queue_depth >= depths[-1]:
      return _bw_at(self.disk_read_bw[depths[-1]], block_bytes)
    hi = next(d for d in depths if d >= queue_depth)
    lo = max(d for d in depths if d <= queue_depth)
    y0 = _bw_at(self.disk_read_bw[lo], block_bytes)
    if hi == lo:
      return y0
    y1 = _bw_at(self.disk_read_bw[hi], block_bytes)
    return _log_interp(queue_depth, lo, hi, y0, y1)

  def link_bw(self, pinned: bool = True) -> float:
    """Host -> device bandwidth from pinned (or unpinned) memory, bytes/s.

    Falls back to the other kind when only one was measured.
    """
    order = ("pinned_host", "unpinned_host") if pinned else ("unpinned_host", "pinned_host")
    for kind in order:
      if kind in self.host_to_device_bw:
        return self.host_to_device_bw[kind]
    raise KeyError(f"{self.name} has no host_to_device_bw")

  # -- (de)serialisation ----------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict (dict keys become strings)."""
    d = dataclasses.asdict(self)
    d["disk_read_bw"] = {
      str(qd): {str(b): bw for b, bw in sorted(row.items())}
      for qd, row in sorted(self.disk_read_bw.items())
    }
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> HardwareProfile:
    """Inverse of :meth:`to_dict`; unknown keys are an error (a typo is not silently dropped)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown HardwareProfile fields {unknown}")
    return cls(**dict(d))

  def to_json(self, path: str | os.PathLike | None = None) -> str:
    """Returns the profile as JSON text, and writes it to ``path`` if given."""
    text = json.dumps(self.to_dict(), indent=2) + "\n"
    if path is not None:
      tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
      with open(tmp, "w") as f:
        f.write(text)
      os.replace(tmp, path)
    return text

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> HardwareProfile:
    """Reads a profile written by :meth:`to_json`."""
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def table(self) -> str:
    """A human-readable summary, one rate per line."""
    gb = lambda x: f"{x / 1e9:8.2f} GB/s"  # noqa: E731
    lines = [f"hardware profile: {self.name} ({self.cores} cores)"]
    depths = sorted(self.disk_read_bw)
    sizes = sorted({b for row in self.disk_read_bw.values() for b in row})
    direct = {True: "O_DIRECT", False: "buffered", None: "n/a"}[self.disk_direct]
    lines.append(f"disk read ({direct}), GB/s by request size and queue depth:")
    lines.append("        size" + "".join(f"{'qd=' + str(d):>10s}" for d in depths))
    for b in sizes:
      cells = "".join(
        f"  {self.disk_read_bw[d][b] / 1e9:8.3f}" if b in self.disk_read_bw[d] else "         -"
        for d in depths
      )
      lines.append(f"  {format_bytes(b):>10s}{cells}")
    for kind, bw in self.host_to_device_bw.items():
      lines.append(f"host->device from {kind:14s} {gb(bw)}")
    lines.append(f"memory copy                    {gb(self.memory_bw)}")
    for dt, bw in self.cpu_matvec_bw.items():
      impl = self.matvec_impl.get(dt, "")
      lines.append(f"cpu matvec {dt:9s}           {gb(bw)}  {impl}")
    for dt, fl in self.cpu_flops.items():
      lines.append(f"cpu matmul {dt:9s}           {fl / 1e9:8.1f} GFLOP/s")
    for dt, bw in self.device_matvec_bw.items():
      lines.append(f"device matvec {dt:9s}        {gb(bw)}")
    for dt, fl in self.device_flops.items():
      lines.append(f"device matmul {dt:9s}        {fl / 1e9:8.1f} GFLOP/s")
    if self.network:
      lines.append(f"network {gb(self.network['bandwidth'])}, latency"
                   f" {self.network['latency_s'] * 1e6:.0f} us per message")
    if self.notes:
      lines.append(f"notes: {self.notes}")
    return "\n".join(lines)


def device_is_cpu(profile: HardwareProfile | None) -> bool:
  """Whether the profile's "device" is the CPU itself (CPU-only or unified memory).

  Such machines have no accelerator memory size (`device_memory` is None):
  "device" and "cpu" compute contend for the same cores, and placing a
  page-aligned host buffer on the "device" aliases it instead of copying.
  None stands for the machine this process runs on, whose JAX backend says.
  """
  if profile is None:
    import jax  # only this question needs the backend; profiles are plain data

    return jax.default_backend() == "cpu"
  return profile.device_memory is None


def model_key(model) -> str:
  """What a model's decode costs depend on: per-layer shapes, vocabulary and dtype (not weights).

  The key under which `HardwareProfile.models` keeps a model's calibration.
  """
  c = model.config
  key = (f"{c.arch} d{c.hidden_size} f{c.intermediate_size} h{c.num_heads}/{c.num_kv_heads}"
         f"x{c.head_dim} v{c.vocab_size} {c.hidden_act} {np.dtype(model.dtype).name}")
  if c.num_experts:
    key += f" e{c.experts_per_token}/{c.num_experts}"
  weights = getattr(model, "weights", "float32")
  if weights != "float32":  # an int4 model's halves cost what its kernels cost, not float32's
    key += f" w={weights}"
  return key


def measured_costs(profile: HardwareProfile, model) -> Mapping[str, float] | None:
  """The calibration of `model`'s shapes kept in `profile`, or None (named profiles have none)."""
  return profile.models.get(model_key(model))


def _log_interp(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
  t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
  return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))


def _bw_at(row: Mapping[int, float], block: int) -> float:
  sizes = sorted(row)
  if block <= sizes[0]:
    return row[sizes[0]] * block / sizes[0]  # latency-bound: constant IOPS
  if block >= sizes[-1]:
    return row[sizes[-1]]  # saturated
  hi = next(s for s in sizes if s >= block)
  lo = max(s for s in sizes if s <= block)
  if hi == lo:
    return row[lo]
  return _log_interp(block, lo, hi, row[lo], row[hi])


# -- named profiles of paper hardware ------------------------------------------


def _scaled(row: Mapping[int, float], factor: float) -> dict[int, float]:
  return {b: bw * factor for b, bw in row.items()}


# A typical PCIe NVMe SSD. HeteGen reads no disk, so these are not from the
# paper; they only let disk strategies be simulated on that machine.
_NVME_QD1 = {4 * KiB: 60e6, 64 * KiB: 0.8e9, 1 * MiB: 2.0e9, 4 * MiB: 2.5e9}
_NVME_QD4 = {4 * KiB: 220e6, 64 * KiB: 2.2e9, 1 * MiB: 3.0e9, 4 * MiB: 3.2e9}

# UFS 4.0 as PowerInfer-2 measured it: ~450 MB/s with 4 KB reads up to ~4 GB/s
# with 512 KB reads; 64 KiB is the log-log midpoint of the two, not a paper figure.
_UFS40_QD1 = {4 * KiB: 450e6, 64 * KiB: 1.34e9, 512 * KiB: 4.0e9}
# UFS 3.1 is not measured in the paper; assumed at half of UFS 4.0 across sizes
# (its interface peak is about half: 2.9 vs 5.8 GB/s per lane pair).
_UFS31_QD1 = _scaled(_UFS40_QD1, 0.5)
# "A single command queue, so I/O from several cores loses up to 40%": several
# requests in flight are modelled at the paper's worst case, 0.6x.
_UFS_MULTI = 0.6

PROFILES: dict[str, HardwareProfile] = {
  "a10-pcie": HardwareProfile(
    name="a10-pcie",
    # HeteGen testbed: Xeon 2.3 GHz with 16 cores.
    cores=16,
    disk_read_bw={1: _NVME_QD1, 4: _NVME_QD4},
    # PCIe 4.0 x16 peaks near 30 GB/s; FlexGen moved 20-24 GB/s of weights in
    # the paper, so ~24 GB/s effective from pinned memory. Unpinned: assumed
    # half (the driver stages through a pinned bounce buffer).
    host_to_device_bw={"pinned_host": 24e9, "unpinned_host": 12e9},
    # Assumed: 8-channel DDR4 server, memcpy on 16 cores ~60 GB/s.
    memory_bw=60e9,
    # The paper's CPU multiplies ~2x the bytes the link carries (HeteGen
    # ~53-71 GB/s total vs FlexGen's 20-24), i.e. ~45 GB/s; assumed for all
    # dtypes (HeteGen computes in fp16/fp32 on the CPU).
    cpu_matvec_bw={"float16": 45e9, "bfloat16": 45e9, "float32": 45e9},
    # Assumed: 16 cores x 2.3 GHz x 32 f32 FLOP/cycle (2 AVX-512 FMA units)
    # = 1.18 TFLOP/s peak, ~60% reached.
    cpu_flops={"float32": 0.7e12},
    # A10: 600 GB/s GDDR6; matvec assumed to reach 85% of it.
    device_matvec_bw={"float16": 510e9, "bfloat16": 510e9, "float32": 510e9},
    # A10 datasheet, dense: fp16/bf16 tensor 125 TFLOP/s, fp32 31.2 TFLOP/s.
    device_flops={"float16": 125e12, "bfloat16": 125e12, "float32": 31.2e12},
    device_memory=24 * GiB,
    host_memory=None,
    notes="HeteGen (MLSys 2024) testbed; link and CPU figures from the paper, the rest "
    "datasheet or assumed (see hetflow/hardware.py); disk is a generic NVMe, not in the paper",
  ),
  "oneplus12-ufs4": HardwareProfile(
    name="oneplus12-ufs4",
    # Snapdragon 8 Gen 3: 1+5+2 cores.
    cores=8,
    disk_read_bw={1: _UFS40_QD1, 4: _scaled(_UFS40_QD1, _UFS_MULTI)},
    # Unified memory: the "device" is the same DRAM, so the link is a
    # memcpy; set to memory_bw.
    host_to_device_bw={"pinned_host": 30e9, "unpinned_host": 30e9},
    # Assumed: LPDDR5X-4800, 76.8 GB/s peak; a CPU memcpy ~30 GB/s.
    memory_bw=30e9,
    # Assumed: CPU matvec at ~45% of the DRAM peak.
    cpu_matvec_bw={"float16": 35e9, "bfloat16": 35e9, "float32": 35e9},
    # Assumed, rough: ~0.5 TFLOP/s fp16 NEON over all cores, half in fp32.
    cpu_flops={"float16": 0.5e12, "float32": 0.25e12},
    # hetflow's "device" on a phone is the same CPU (the NPU is not modelled).
    device_matvec_bw={"float16": 35e9, "bfloat16": 35e9, "float32": 35e9},
    device_flops={"float16": 0.5e12, "float32": 0.25e12},
    device_memory=None,
    host_memory=24 * GiB,
    notes="PowerInfer-2 phone (24 GB, UFS 4.0); UFS figures from the paper, compute and "
    "memory assumed (see hetflow/hardware.py); device == CPU (unified memory, NPU not modelled)",
  ),
  "ace2-ufs31": HardwareProfile(
    name="ace2-ufs31",
    # Snapdragon 8+ Gen 1: 1+3+4 cores.
    cores=8,
    disk_read_bw={1: _UFS31_QD1, 4: _scaled(_UFS31_QD1, _UFS_MULTI)},
    host_to_device_bw={"pinned_host": 20e9, "unpinned_host": 20e9},
    # Assumed: LPDDR5-6400, 51.2 GB/s peak; a CPU memcpy ~20 GB/s.
    memory_bw=20e9,
    cpu_matvec_bw={"float16": 23e9, "bfloat16": 23e9, "float32": 23e9},
    cpu_flops={"float16": 0.35e12, "float32": 0.18e12},
    device_matvec_bw={"float16": 23e9, "bfloat16": 23e9, "float32": 23e9},
    device_flops={"float16": 0.35e12, "float32": 0.18e12},
    device_memory=None,
    host_memory=16 * GiB,
    notes="PowerInfer-2 phone (16 GB, UFS 3.1); UFS 3.1 assumed at half of UFS 4.0, "
    "compute and memory assumed at ~2/3 of the OnePlus 12 (see hetflow/hardware.py)",
  ),
}


def shared(profile: HardwareProfile, processes: int) -> HardwareProfile:
  """What one of `processes` processes sharing this machine gets: 1/processes of its
  memory, link and compute rates (each process its share of the cores and buses), its
  calibrated decode costs `processes` times as long, and 1/processes of what the disk
  gives all of their requests together: `processes` readers with `qd` requests in flight
  each keep processes x qd in flight on the one disk."""
  if processes == 1:
    return profile
  k = float(processes)
  rates = lambda table: {n: v / k for n, v in table.items()}  # noqa: E731
  sizes = sorted({b for row in profile.disk_read_bw.values() for b in row})
  depths = sorted({1, *profile.disk_read_bw, *(max(1, d // processes)
                                               for d in profile.disk_read_bw)})
  disk = {q: {b: profile.disk_bw(b, q * processes) / k for b in sizes} for q in depths}
  models = {key: {n: (v * k if n.endswith("_s") else v / k if n.endswith("_bw") else v)
                  for n, v in m.items()} for key, m in profile.models.items()}
  return dataclasses.replace(
    profile, name=f"{profile.name} (1/{processes})", cores=max(1, profile.cores // processes),
    disk_read_bw=disk,
    host_to_device_bw=rates(profile.host_to_device_bw), memory_bw=profile.memory_bw / k,
    cpu_matvec_bw=rates(profile.cpu_matvec_bw), cpu_flops=rates(profile.cpu_flops),
    device_matvec_bw=rates(profile.device_matvec_bw), device_flops=rates(profile.device_flops),
    host_memory=None if profile.host_memory is None else profile.host_memory // processes,
    models=models)


# -- interconnects between hosts -----------------------------------------------------

# A collective over TCP costs its wire time plus a software cost per message (gloo's
# framing, syscalls, the XLA CPU collective's own dispatch): measured here between two
# local processes by `hetflow.bench.probes.probe_allreduce` (WORKSPACE_NOTES.md, "Cluster
# model"), where the wire costs nothing, so it is the floor of every network below.
_COLLECTIVE_SOFTWARE_S = 120e-6

NETWORKS: dict[str, dict[str, float]] = {
  # 10 GbE: 1.25 GB/s line rate, ~1.1 GB/s through TCP; ~15 us NIC + switch one way.
  "10gbe": {"bandwidth": 1.1e9, "latency_s": _COLLECTIVE_SOFTWARE_S + 15e-6},
  # 100 GbE: 12.5 GB/s line rate, ~10 GB/s through TCP on a few streams; ~5 us one way.
  "100gbe": {"bandwidth": 10e9, "latency_s": _COLLECTIVE_SOFTWARE_S + 5e-6},
}
"""Presets for `HardwareProfile.network` (assumed figures, see the comments), by name."""


def with_network(profile: HardwareProfile, network: str | Mapping[str, float]) -> HardwareProfile:
  """`profile` with its hosts joined by `network` (a name in `NETWORKS` or a dict).

  Raises:
    KeyError: for a name that is not a preset.
  """
  if isinstance(network, str):
    if network not in NETWORKS:
      raise KeyError(f"no network preset {network!r}; expected one of {sorted(NETWORKS)}, or a"
                     " dict with 'bandwidth' (bytes/s) and 'latency_s'.")
    network = NETWORKS[network]
  return dataclasses.replace(profile, network=dict(network))


def get_profile(name_or_path: str | os.PathLike | HardwareProfile) -> HardwareProfile:
  """A named profile from :data:`PROFILES`, or one read from a JSON file.

  Raises:
    KeyError: if it is neither a known name nor an existing file.
  """
  if isinstance(name_or_path, HardwareProfile):
    return name_or_path
  key = os.fspath(name_or_path)
  if key in PROFILES:
    return PROFILES[key]
  if os.path.isfile(key):
    return HardwareProfile.from_json(key)
  raise KeyError(
    f"no hardware profile {key!r}: not one of {sorted(PROFILES)} and not a JSON file "
    "(make one with `python -m experiments.profile_hardware`)"
  )
