"""scripts/gpu_check.sh --smoke: the GPU check of issue 16 runs end to end on the CPU and its
report holds real measurements in every section, so that the one call a GPU session makes
does not fail on something the CPU could have caught."""

import json
import math
import os
import subprocess

import jax
import pytest

import hetflow
import strategies  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("gpu_check.json", "gpu_check.log", "env.json", "gpu_tests.xml", "gpu_tests.jsonl",
         "gpu_tensor_split.json")


def _positive(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_out")
  env = {k: v for k, v in os.environ.items() if k not in ("HETFLOW_GPU_RECORD", "XLA_FLAGS")}
  run = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=dict(env, OUT=str(out)))
  assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
  assert sorted(os.listdir(out)) == sorted(FILES)
  with open(out / "gpu_check.json") as f:
    return json.load(f)


def test_complete_and_timed(report):
  assert report["mode"] == "smoke"
  assert report["missing"] == []
  assert set(report["expected"]) == {"exactness", "links", "alpha", "compute_on", "figure8"}
  for step in ("environment", "tests", "tensor_split"):
    assert report["steps"][step]["rc"] == 0, step
    assert _positive(report["steps"][step]["seconds"]) and _positive(
        report["steps"][step]["budget_s"]), step
  assert all(_positive(report["section_seconds"][s])
             for s in ("links", "alpha", "compute_on", "figure8"))
  env = report["environment"]
  assert env["backend"] == "cpu" and env["jax"] == jax.__version__ and env["devices"]
  assert env["env"]["JAX_PLATFORMS"] == "cpu"
  assert env["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def test_exactness_records_every_strategy(report):
  ex = report["exactness"]
  p = ex["pytest"]
  assert p["passed"] == p["tests"] > 0 and p["failed"] == [] and p["skipped"] == 0
  # The built-ins (other tests of a session may register more in this process).
  strategies_ = {n for n in hetflow.available_strategies()
                 if hetflow.get_strategy(n).__module__.startswith("strategies.")}
  assert len(strategies_) >= 4
  assert {r["strategy"] for r in ex["tokens"]} == strategies_
  for r in ex["tokens"]:
    assert r["tokens_equal"] and r["tokens"] == r["resident_tokens"], r
    assert len(r["tokens"][0]) > 0
    assert 0 < r["ledger_device_peak"] <= r["budget_bytes"], r
    assert 0 <= r["max_abs_logit_diff"] <= 1e-5, r  # the CPU suites' tolerance
    assert r["backend"] == "cpu"
  # The memory check, one per strategy: on the CPU memory_stats() is None, and says so.
  assert sorted(r["strategy"] for r in ex["memory"]) == sorted(strategies_)
  for r in ex["memory"]:
    assert r["memory_stats"] is False and "None" in r["note"] and r["probe_backend"] == "cpu"
    assert 0 < r["ledger_device_peak"] <= r["budget_bytes"], r
    assert r["workspace_allowance"] == 64 * 2**20


def test_links(report):
  bw = report["links"]["bandwidth_GBps"]
  for source in ("pinned_host", "unpinned_host", "cpu_backend", "numpy"):
    assert _positive(bw[source]), (source, bw[source])
  ov = report["links"]["overlap"]
  for key in ("transfer_s", "device_matmul_s", "cpu_matvecs_s", "all_three_s", "overlap"):
    assert _positive(ov[key]), key


def test_alpha_and_compute_on(report):
  alpha = report["alpha"]
  assert [r["alpha"] for r in alpha["rows"]] == [0.0, 0.5, 1.0]
  assert all(_positive(r["split_s"]) for r in alpha["rows"])
  assert 0 <= alpha["formula_alpha"] <= 1
  assert all(_positive(v) for v in alpha["rates"].values())
  c = report["compute_on"]
  assert c["alpha"] == alpha["formula_alpha"] and 0 < c["cut"] < c["dim"]
  assert _positive(c["two_program_s"])
  if c["compiled"]:
    assert _positive(c["one_program_s"]) and _positive(c["speedup"])
    assert c["max_abs_diff"] <= 1e-2  # the same chain in fp16, joined in another order
  else:
    assert c["error"]


def test_figure8(report):
  f = report["figure8"]
  assert f["model"] == "opt-tiny" and f["prompt"] == 16 and f["new_tokens"] == 8
  assert _positive(f["rates"]["link_pinned_GBps"]) and 0 <= f["rates"]["decode_alpha"] <= 1
  assert f["profile"]["name"] == "this-gpu-machine"
  runs = f["runs"]
  assert sorted((r["strategy"], r["device_gib"]) for r in runs) == sorted(
      (s, b) for s in ("tensor_split", "layerwise") for b in f["budgets_gib"])
  for r in runs:
    for key in ("ttft_s", "decode_tokens_per_s", "throughput", "predicted_ttft_s",
                "predicted_decode_tokens_per_s", "predicted_throughput"):
      assert _positive(r[key]), (r["strategy"], key, r.get(key), r.get("error"))
    assert r["recompilations"] == 0  # measured warm
    assert 0 < r["ledger_peak_device"] <= r["device_bytes"]
    assert r["placement_bytes"]["host"] > 0  # the budget keeps part of the model off device
  assert set(f["tensor_split_over_layerwise"]) == {str(b) for b in f["budgets_gib"]}
  assert all(_positive(v) for v in f["tensor_split_over_layerwise"].values())
  assert f["ratio_at_smallest_common_budget"] == f["tensor_split_over_layerwise"][
      str(min(f["budgets_gib"]))]
