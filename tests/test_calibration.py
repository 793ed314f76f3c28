"""Per-model calibration: what it measures, where it is kept, and how the
simulator and planner use it."""

import dataclasses
import json

import pytest

import hetflow
from hetflow import hardware, planner, simulate
from hetflow.bench import calibration, machine
from hetflow.strategy import get_strategy

# A CPU-only machine: the device is the CPU (device_memory None).
CPU_ONLY = dataclasses.replace(hardware.PROFILES["oneplus12-ufs4"], name="cpu-only")
NO_OVERHEAD = simulate.SimSettings(call_overhead_s=0.0, pass_overhead_s=0.0)


def _with(profile, model, **seconds):
  entry = dict(attn_s=1e-3, mlp_s=2e-3, head_s=5e-3, layer_copy_s=10e-3, split_kernel_s=1e-4,
               context=64.0)
  entry.update(seconds)
  return dataclasses.replace(profile, models={hardware.model_key(model): entry})


def test_calibrate_measures_every_figure_and_survives_json(tmp_path):
  model = hetflow.synthetic_model("llama-tiny")
  calibrated = calibration.calibrate(model, CPU_ONLY, total_bytes=1 << 20, repeats=1,
                                     progress=False)
  m = hardware.measured_costs(calibrated, model)
  for key in ("attn_s", "mlp_s", "head_s", "layer_copy_s"):
    assert 0 < m[key] < 1.0, key
  assert m["split_kernel_s"] >= 0 and m["context"] == 64
  assert hardware.measured_costs(CPU_ONLY, model) is None  # the input is not modified
  path = tmp_path / "profile.json"
  calibrated.to_json(path)
  assert hardware.HardwareProfile.from_json(path) == calibrated
  # A model of other shapes is not covered by it.
  assert hardware.measured_costs(calibrated, hetflow.synthetic_model("opt-tiny")) is None


def test_calibrating_a_quantized_model_measures_its_halves_and_its_format_rate():
  model = hetflow.synthetic_model("llama-tiny", weights="int4")
  calibrated = calibration.calibrate(model, CPU_ONLY, total_bytes=1 << 20, repeats=1,
                                     progress=False)
  m = hardware.measured_costs(calibrated, model)
  for key in ("attn_s", "mlp_s", "head_s"):
    assert 0 < m[key] < 1.0, key
  # float32's calibration is another entry; the format's rate joins the profile's table
  assert hardware.measured_costs(calibrated, hetflow.synthetic_model("llama-tiny")) is None
  assert calibrated.cpu_matvec_bw["int4"] > 0
  assert calibrated.device_matvec_bw["int4"] == calibrated.cpu_matvec_bw["int4"]
  assert calibrated.matvec_impl["int4"] == "formats.matmul"
  assert "int4" not in CPU_ONLY.cpu_matvec_bw  # the input is not modified


def test_resident_decode_is_the_calibrated_halves():
  model = hetflow.synthetic_model("llama-tiny")
  plan = get_strategy("resident")().plan(model, hetflow.Budget())
  profile = _with(CPU_ONLY, model)
  # Decode attends over prompt + new/2 = 64 positions, the calibrated context.
  pred = simulate.predict(model, plan, profile, 1, 60, 8, NO_OVERHEAD)
  layers = model.config.num_layers
  assert pred.decode_s_per_token == pytest.approx(layers * (1e-3 + 2e-3) + 5e-3, rel=1e-6)
  # Prefill is compute-bound and keeps the roofline.
  plain = simulate.predict(model, plan, CPU_ONLY, 1, 60, 8, NO_OVERHEAD)
  assert pred.prefill_s == pytest.approx(plain.prefill_s)


def test_layerwise_host_copies_add_to_compute_where_the_device_is_the_cpu():
  model = hetflow.synthetic_model("llama-tiny")
  layerwise = get_strategy("layerwise")(dict(offload_tier="host", resident_layers=0))
  plan = layerwise.plan(model, hetflow.Budget())
  profile = _with(CPU_ONLY, model)
  pred = simulate.predict(model, plan, profile, 1, 60, 8, NO_OVERHEAD)
  layers = model.config.num_layers
  # A memcpy by the same cores: copy + compute per layer, not the larger of the two.
  assert pred.decode_s_per_token == pytest.approx(layers * (10e-3 + 3e-3) + 5e-3, rel=1e-6)


@pytest.mark.parametrize("keep_resident", [False, True])  # all split / all resident
def test_tensor_split_charges_the_calibrated_overhead_per_kernel(keep_resident):
  model = hetflow.synthetic_model("llama-tiny")
  plan = get_strategy("tensor_split")(dict(alpha=0.5, keep_resident=keep_resident)).plan(
      model, hetflow.Budget(), CPU_ONLY)
  kernels = sum(len(g.details.matrices) for n, g in plan.groups.items()
                if n.startswith("layers/"))
  cheap = simulate.predict(model, plan, _with(CPU_ONLY, model, split_kernel_s=0.0), 1, 8, 8,
                           NO_OVERHEAD)
  costly = simulate.predict(model, plan, _with(CPU_ONLY, model, split_kernel_s=1e-3), 1, 8, 8,
                            NO_OVERHEAD)
  assert costly.decode_s_per_token - cheap.decode_s_per_token == pytest.approx(kernels * 1e-3,
                                                                             rel=1e-6)


def test_planner_calibrates_this_machine_once(tmp_path, monkeypatch):
  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path))
  CPU_ONLY.to_json(tmp_path / "hardware_profile.json")  # "this machine", already profiled
  model = hetflow.synthetic_model("llama-tiny")
  first = machine.machine_profile(None, model)
  assert hardware.measured_costs(first, model) is not None
  on_disk = json.loads((tmp_path / "hardware_profile.json").read_text())
  assert hardware.model_key(model) in on_disk["models"]

  def refuse(*args, **kwargs):
    raise AssertionError("calibrated twice")

  monkeypatch.setattr(calibration, "calibrate", refuse)
  assert machine.machine_profile(None, model) == first
  # A named profile is another machine: never calibrated here.
  assert hardware.measured_costs(machine.machine_profile("a10-pcie", model), model) is None


def test_plans_the_simulator_cannot_predict_are_not_applicable():
  # opt-tiny is a ReLU model, so neuron_cluster plans it, but no activation
  # frequencies are known for it: reported, not raised.
  ranked = planner.plan(hetflow.synthetic_model("opt-tiny"), hetflow.Budget(),
                        hardware.PROFILES["a10-pcie"])
  nc = [r for r in ranked if r.strategy == "neuron_cluster"]
  assert nc and all(not r.feasible for r in nc)
  assert any("not applicable: no activation law" in r.reason for r in nc)
  assert ranked[0].feasible
