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
