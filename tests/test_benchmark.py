"""The benchmark harness end to end on llama-tiny, and every bench config's smoke version."""

import glob
import importlib.util
import json
import os

import pytest

from hetflow import config as config_lib
from hetflow.bench import config as bench_config
from hetflow.bench import runner

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "bench",
                                        "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _has(module):
  return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    # Stores and HF copies go to a temporary cache (children inherit the variable).
    mp.setenv("HETFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield _run_tiny(tmp_path_factory)


def _run_tiny(tmp_path_factory):
  config = _load(os.path.join(os.path.dirname(__file__), "..", "configs", "bench", "tiny.py"))
  order = "resident,layerwise_disk,layerwise_host"
  if _has("accelerate") and _has("transformers"):
    order += ",accelerate_disk"  # the peer path with a device_map; a few seconds
  config.order = order
  workdir = str(tmp_path_factory.mktemp("bench"))
  return runner.benchmark(config, workdir), workdir, order.split(",")


def test_tiny_benchmark_writes_every_figure(tiny_run):
  results, workdir, names = tiny_run
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["systems"][0]["name"] == names[0]
  assert [r["name"] for r in results["systems"]] == names
  for r in results["systems"]:
    assert r["ok"], r
    for key in ("ttft_s", "decode_tok_s", "disk_bytes_per_token", "peak_rss",
                "fraction_of_limit", "limit_s_per_token", "page_cache"):
      assert key in r, (r["name"], key)
    assert r["decode_tok_s"] > 0 and r["fraction_of_limit"] > 0
    assert r["tokens_match_first"], r["name"]  # every system decodes the same greedy tokens
  rows = {r["name"]: r for r in results["systems"]}
  disk = rows["layerwise_disk"]
  assert disk["disk_bytes_per_token"] == disk["streamed"]["disk"] > 0
  assert disk["peak_ledger"]["device"] < rows["resident"]["peak_ledger"]["device"]
  assert rows["layerwise_host"]["host_to_device_bytes_per_token"] > 0
  assert results["probes"]["disk"]["bytes_per_s"] > 0
  assert results["timeline"]["ok"]
  table = open(os.path.join(workdir, "results.md")).read()
  assert all(f"| {n} |" in table for n in names)
  assert os.path.getsize(os.path.join(workdir, "timeline.png")) > 1000
  assert os.path.getsize(os.path.join(workdir, "decode.png")) > 1000


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_bench_configs_build(path):
  config = _load(path)
  with open(path) as f:
    assert "python -m experiments.benchmark --config=configs/bench/" in f.read()
  for c in (config, config_lib.apply_smoke(config)):
    systems = bench_config.systems_from_config(c)
    assert systems
    config_lib.build_budget(c.budget)
    model = config_lib.build_model(c.model)
    for s in systems:
      if s.kind == "hetflow":
        from hetflow.strategy import get_strategy
        strategy = get_strategy(s.strategy)(s.options or None)
        strategy.plan(model, config_lib.build_budget(s.budget or c.budget))  # fits the budget


def test_memory_limit_is_held_for_the_whole_run(tmp_path, monkeypatch):
  """The harness enters a MemoryLimit around every system and leaves it afterwards.

  The real limit locks all but N GiB of the machine; here a stand-in locks 32 MiB.
  """
  import hetflow.memory

  events = []
  real = hetflow.memory.MemoryLimit

  class SmallLimit(real):
    def __init__(self, limit_bytes, **kw):
      super().__init__(lock_bytes="32MiB", drop_caches=True)

    def __enter__(self):
      events.append("enter")
      return super().__enter__()

    def __exit__(self, *exc):
      events.append("exit")
      return super().__exit__(*exc)

  monkeypatch.setattr(hetflow.memory, "MemoryLimit", SmallLimit)
  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path / "cache"))
  config = _load(os.path.join(os.path.dirname(__file__), "..", "configs", "bench", "tiny.py"))
  config.order = "layerwise_disk"
  config.memory_limit = "3GiB"
  config.timeline = False
  results = runner.benchmark(config, str(tmp_path / "bench"))
  assert events == ["enter", "exit"]
  assert results["memory_limit"]["locked"] == 32 << 20
  assert results["systems"][0]["ok"]


@pytest.mark.parametrize("warmup_prompt", ["other", "same"])
def test_warmup_decodes_another_prompt_before_each_measured_run(warmup_prompt, monkeypatch):
  """A cache that the warm-up (or the last repeat) filled with the measured prompt's working
  set measures a replayed request: by default another prompt runs before every measured one."""
  import numpy as np

  import hetflow
  from hetflow.bench.config import SystemSpec
  from hetflow.bench.process import prompt_ids
  from hetflow.engine import Engine

  seen = []
  generate = Engine.generate

  def record(self, ids, **kw):
    seen.append(np.asarray(ids).copy())
    return generate(self, ids, **kw)

  monkeypatch.setattr(Engine, "generate", record)
  model = hetflow.synthetic_model("llama-tiny")
  prompt = prompt_ids(model.config.vocab_size, 6)
  spec = dict(new_tokens=2, repeats=2, warmup=True, warmup_prompt=warmup_prompt,
              drop_caches=False)
  runner._run_hetflow(SystemSpec(name="resident", kind="hetflow", strategy="resident"),
                      model, spec, prompt)
  measured = [np.array_equal(ids, prompt) for ids in seen]
  if warmup_prompt == "other":
    assert measured == [False, True, False, True]
    assert seen[0].shape == prompt.shape  # the same shapes compile
  else:
    assert measured == [True, True, True]


def _sparse_row(**over):
  row = {"ok": True, "name": "nc", "kind": "hetflow", "decode_s_per_token": 0.2,
         "touched_bytes": 4e9, "streamed": {"disk": 3e9, "host": 0},
         "disk_bytes_per_token": 77e6,
         "sparse": {"requests_per_token": 3300.0, "computed_bytes_per_token": 600e6,
                    "fixed_bytes_per_token": 1e9}}
  row.update(over)
  return row


def test_a_sparse_rows_limit_is_its_reads_at_their_size_or_its_records_computed():
  """A sparse row is charged for what it read, at the disk's rate for its request size,
  or for the records it computed, whichever is slower; not for every byte placed on disk."""
  row = _sparse_row()
  size = runner.sparse_request_bytes(row)
  assert size == 24576  # 77 MB / 3300 requests = 23.3 KB, rounded up to pages
  probed = {"disk": {"bytes_per_s": 2e9}, "memory": {"bytes_per_s": 25e9},
            "host_to_device": {"bytes_per_s": 2e9},
            "small_reads": {str(size): {"bytes_per_s": 1e9, "depth": 64}}}
  out = runner.limits(row, probed)
  assert out["limit_kind"] == "sparse" and out["request_bytes"] == size
  assert out["limit_s_per_token"] == pytest.approx(77e6 / 1e9)
  assert out["fraction_of_limit"] == pytest.approx(0.077 / 0.2)
  # Compute-bound: the records computed and the attention and head it multiplied.
  fewer = dict(row["sparse"], requests_per_token=330.0)
  computing = runner.limits(_sparse_row(decode_s_per_token=0.1, disk_bytes_per_token=7.7e6,
                                        sparse=fewer), probed)
  assert computing["limit_s_per_token"] == pytest.approx(1.6e9 / 25e9)
  # Nothing read (every record it needed was cached): its compute alone, no probe needed.
  cached = runner.limits(_sparse_row(disk_bytes_per_token=0.0,
                                     sparse=dict(row["sparse"], requests_per_token=0.0)), {
                                         "memory": {"bytes_per_s": 25e9}})
  assert cached["limit_s_per_token"] == pytest.approx(1.6e9 / 25e9)
  assert cached["request_bytes"] is None and cached["sparse_disk_s_per_token"] == 0
  assert cached["sparse_serial_s_per_token"] == pytest.approx(1.6e9 / 25e9)  # all compute
  # Without the probe at its size (or without sparse counts): the dense formula.
  del probed["small_reads"]
  assert "limit_kind" not in runner.limits(row, probed)
  dense = dict(row, sparse=None)
  assert runner.sparse_request_bytes(dense) is None


def test_a_sparse_rows_counts_are_its_measured_runs():
  """The runner's sparse counts come from the measured run alone (not averaged with the
  warm-up on another prompt), and the fixed region counts every weight a token multiplies
  outside the FFN's records."""
  import hetflow
  from hetflow.bench.config import SystemSpec
  from hetflow.bench.process import prompt_ids, touched_bytes
  from hetflow.engine import Engine

  model = hetflow.synthetic_model("llama-tiny-sparse", sparsity=0.9, hotness="zipf:1.1", seed=0)
  prompt = prompt_ids(model.config.vocab_size, 6)
  n = 4
  # No cache: nothing carries over from one request to the next, so a fresh engine that
  # runs only the measured prompt counts what the measured run must.
  options = dict(cache_bytes=0, staging_bytes="128KiB")
  with Engine(model, "neuron_cluster", options=options) as engine:
    alone = engine.generate(prompt, max_new_tokens=n, stop_tokens=()).stats["strategy"].decode
  spec = dict(new_tokens=n, repeats=1, warmup=True, drop_caches=False, drop_method="none")
  result = runner._run_hetflow(SystemSpec(name="nc", kind="hetflow", strategy="neuron_cluster",
                                          options=options), model, spec, prompt)
  sparse = result["sparse"]
  assert sparse["requests_per_token"] == pytest.approx(alone.disk_requests / (n - 1))
  assert sparse["computed_bytes_per_token"] == pytest.approx(alone["computed_bytes"] / (n - 1))
  records = sum(a.size * a.dtype.itemsize for name, a in model.shapes.items()
                if name.split("/")[-1] in ("gate", "up", "down"))
  assert sparse["fixed_bytes_per_token"] == touched_bytes(model) - records
  # The generating thread's CPU per decode token: measured, and no more than its wall time.
  assert 0 < result["host_cpu_s_per_token"] <= result["decode_s_per_token"]


def test_small_reads_probe_reads_cold_at_the_given_size(tmp_path):
  from hetflow.bench import probes

  paths = []
  for i in range(2):
    path = tmp_path / f"layer{i}.bin"
    path.write_bytes(os.urandom(1 << 20))
    paths.append(str(path))
  got = probes.probe_small_reads(paths, 6000, depths=(1, 4), bytes_per_depth=1 << 20,
                                 per_call=8)
  assert got["request_bytes"] == 8192 and set(got["settings"]) == {1, 4}
  assert got["bytes_per_s"] == max(got["settings"].values()) > 0
  assert got["depth"] in (1, 4) and got["direct"] in (True, False)
  assert probes.probe_small_reads(paths, 2 << 20) is None  # no file holds such a request


def test_report_lists_the_small_read_probes(tmp_path):
  from hetflow.bench import report

  row = dict(_sparse_row(), ttft_s=1.0, decode_tok_s=5.0, new_tokens=8, peak_rss=1 << 30,
             disk_probe_after=2e9, tokens=[[1, 2]], tokens_match_first=True,
             page_cache="no")
  probed = {"disk": {"bytes_per_s": 2e9, "bytes_per_s_all": [2e9], "cache_drop": "fadvise",
                     "direct": True},
            "memory": {"bytes_per_s": 25e9}, "host_to_device": {"bytes_per_s": 2e9},
            "small_reads": {"24576": {"bytes_per_s": 1.31e9, "depth": 64}}}
  row.update(runner.limits(row, probed))
  results = {"machine": {"cpus": 2, "date": "today", "loadavg": [1.0], "loadavg_after": [1.0]},
             "probes": probed, "config": {"model": {"name": "m", "dtype": "float32"},
                                          "prompt_tokens": 4, "new_tokens": 8},
             "systems": [row]}
  table = report.markdown(results)
  assert "24.00 KiB 1.31 GB/s (depth 64)" in table
  # 1.6 GB multiplied at 25 GB/s (the disk: 77 MB at 1.31 GB/s, 0.059 s), over 0.2 s
  assert "| nc | 1.00 | 5.000 | 0.32 |" in table
  # The sparse rows' terms; the serial floor is 1 GB at 25 GB/s + max(0.059 s of disk,
  # 0.024 s of records) = 0.099 s.
  # Its host thread's CPU per token, where the row measured it ("-" where it did not).
  assert ("| nc | 24.00 KiB | 0.059 | 0.064 (0.040 fixed) | 0.099 | 0.200 | 3.12 | 2.02 | - |"
          in table)
  row["host_cpu_s_per_token"] = 0.0876
  assert "| 3.12 | 2.02 | 0.088 |" in report.markdown(results)
