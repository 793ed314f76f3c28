"""The benchmark harness with weight formats per row and llama.cpp as a peer (llama-tiny)."""

import os

import pytest

from hetflow.bench import runner
from hetflow.bench.config import SystemSpec, bench_config


def _config(order: str):
  c = bench_config("llama-tiny", prompt_tokens=8, new_tokens=5, repeats=1, timeout_s=300,
                   timeline=False)
  c.order = order
  c.systems.resident = dict(kind="hetflow", strategy="resident")
  c.systems.resident_int4 = dict(kind="hetflow", strategy="resident", weights="int4")
  c.systems.layerwise_int4 = dict(kind="hetflow", strategy="layerwise", weights="int4",
                                  options=dict(offload_tier="disk", prefetch_depth=1))
  for t in ("F32", "Q8_0", "Q4_0"):
    c.systems[f"llamacpp_{t}"] = dict(kind="llamacpp", gguf_type=t)
  return c


def test_system_spec_checks_peer_fields():
  with pytest.raises(ValueError, match="gguf_type"):
    SystemSpec(name="x", kind="llamacpp")
  with pytest.raises(ValueError, match="gguf_type"):
    SystemSpec(name="x", kind="hetflow", gguf_type="Q8_0")
  with pytest.raises(ValueError, match="weights"):
    SystemSpec(name="x", kind="transformers", weights="int8")


def test_rows_of_other_formats_and_llama_cpp(tmp_path, monkeypatch):
  """Each row's format gets its own store; llama.cpp runs the same weights as GGUF, under the
  run's memory limit (a 32 MiB stand-in here, as in test_benchmark.py)."""
  pytest.importorskip("llama_cpp")
  import hetflow.memory

  entered = []

  class SmallLimit(hetflow.memory.MemoryLimit):
    def __init__(self, limit_bytes, **kw):
      super().__init__(lock_bytes="32MiB", drop_caches=True)

    def __enter__(self):
      entered.append(True)
      return super().__enter__()

  monkeypatch.setattr(hetflow.memory, "MemoryLimit", SmallLimit)
  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path / "cache"))
  config = _config("resident,llamacpp_F32,resident_int4,layerwise_int4,llamacpp_Q8_0,"
                   "llamacpp_Q4_0")
  config.memory_limit = "3GiB"
  results = runner.benchmark(config, str(tmp_path / "bench"))
  assert entered
  rows = {r["name"]: r for r in results["systems"]}
  assert all(r["ok"] for r in rows.values()), [r.get("error") for r in rows.values()]
  # Same float32 weights: llama.cpp F32 decodes resident's greedy tokens.
  assert rows["llamacpp_F32"]["tokens_match_first"]
  # Same int4 weights, two strategies: the same tokens (the invariant), from its own store.
  assert rows["layerwise_int4"]["tokens"] == rows["resident_int4"]["tokens"]
  assert rows["layerwise_int4"]["disk_bytes_per_token"] == rows["layerwise_int4"]["streamed"]["disk"]
  assert rows["layerwise_int4"]["disk_bytes_per_token"] < 0.5 * rows["resident"]["touched_bytes"]
  # Bytes per token follow the format; Q4_0 and int4 hold the same blocks (4.5 bits).
  f32, q4 = rows["llamacpp_F32"]["touched_bytes"], rows["llamacpp_Q4_0"]["touched_bytes"]
  assert rows["resident"]["touched_bytes"] == f32
  assert rows["resident_int4"]["touched_bytes"] < 0.5 * f32
  assert q4 < rows["llamacpp_Q8_0"]["touched_bytes"] < f32
  for name in ("llamacpp_F32", "llamacpp_Q8_0", "llamacpp_Q4_0"):
    r = rows[name]
    assert r["placement"].startswith(f"llama.cpp {name.split('_', 1)[1]} GGUF")
    assert "2 threads" in r["placement"] and r["decode_tok_s"] > 0
    assert 0 <= r["tokens_agree_first"] <= 5 and r["fraction_of_limit"] > 0
  table = open(os.path.join(tmp_path, "bench", "results.md")).read()
  assert all(f"| {n} |" in table for n in rows)
  for r in rows.values():  # each row says how far it agrees with the first row
    n = r["tokens_agree_first"]
    assert ("| yes |" if n == 5 else f"| first {n} of 5 |") in table.split(f"| {r['name']} |")[1]


def test_llama_cpp_rows_are_skipped_without_it(tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "llama_cpp_available", lambda: False)
  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path / "cache"))
  results = runner.benchmark(_config("resident,llamacpp_Q8_0"), str(tmp_path / "bench"))
  resident, peer = results["systems"]
  assert resident["ok"] and not peer["ok"] and peer["skipped"]
  assert "llama_cpp is not importable" in peer["error"]
  table = open(os.path.join(tmp_path, "bench", "results.md")).read()
  assert "| llamacpp_Q8_0 | skipped: llama_cpp is not importable" in table
  assert not os.path.exists(os.path.join(str(tmp_path / "cache"), "gguf"))  # nothing written


def test_a_windowed_model_goes_to_llama_cpp_only_within_its_window(tmp_path, monkeypatch):
  """llama.cpp's llama has no attention window: a windowed model is written without it, which
  is the same model while every query sees the whole context, and refused past that."""
  import dataclasses

  from hetflow.bench import peers
  from hetflow.checkpoints.load import load_model
  from hetflow.checkpoints.named import synthetic_model

  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path / "cache"))
  model = synthetic_model("llama-tiny")
  model = dataclasses.replace(model, config=model.config.replace(sliding_window=16))
  for positions in (None, 17):
    with pytest.raises(ValueError, match="window of 16 tokens"):
      peers.gguf_for(model, "F32", positions=positions)
  assert not os.path.exists(tmp_path / "cache")
  path = peers.gguf_for(model, "F32", positions=16)
  written = load_model(path)
  assert written.config.sliding_window is None
  assert written.config.replace(sliding_window=16, name=model.config.name) == model.config
