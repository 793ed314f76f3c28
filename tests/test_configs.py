"""Every config under configs/ loads and smoke-runs (every shipped config is tested)."""

import glob
import importlib.util
import io
import os

import pytest

from hetflow.config import apply_smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs/**/*.py"),
                                                             recursive=True)
                 if not os.path.basename(p).startswith("_"))


def load(path):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIGS)
def test_config_opens_with_its_command(path):
  text = open(os.path.join(ROOT, path)).read()
  assert "python -m experiments." in text.split('"""')[1], "docstring must give the command"
  assert load(path) is not None


def _launchers():
  """Launcher module name -> the library function it calls (config, workdir)."""
  from hetflow.bench import plan_run, reproduce, runner
  from hetflow.bench.train_predictor import train_from_config
  from hetflow.generation import generate

  quiet = io.StringIO()
  return {
      "generate": lambda config, workdir: generate(config, out=quiet),
      "plan": lambda config, workdir: plan_run.run(config, workdir, out=quiet),
      "benchmark": runner.benchmark,
      "reproduce": reproduce.run,
      "train_predictor": train_from_config,
  }


@pytest.mark.parametrize("path", CONFIGS)
def test_config_smoke_runs(path, tmp_path, monkeypatch):
  """Each config runs through the launcher its docstring names, with its smoke overrides."""
  import re

  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path / "cache"))
  launcher = re.search(r"python -m experiments\.(\w+)", open(os.path.join(ROOT, path)).read())[1]
  launchers = _launchers()
  assert launcher in launchers, f"{path}: no smoke runner for experiments.{launcher}"
  result = launchers[launcher](apply_smoke(load(path)), str(tmp_path / "work"))
  assert result is not None
  assert not _failed_runs(launcher, result), _failed_runs(launcher, result)


def _failed_runs(launcher, result):
  """The runs a launcher recorded as failed instead of raising: a benchmark's systems
  and timeline (`ok: False`), a plan's measured top plans (no measured figure)."""
  if launcher == "benchmark":
    runs = result["systems"] + ([dict(result["timeline"], name="timeline")]
                                if "timeline" in result else [])
    return [f"{r['name']}: {r.get('error')}" for r in runs if not r["ok"]]
  if launcher == "plan":
    return [c["plan"] for c in result["compared"] if c["measured_decode_tok_s"] is None]
  return []


def test_default_config_generates():
  from hetflow.generation import generate

  out = io.StringIO()
  result = generate(apply_smoke(load("configs/default.py")), out=out)
  assert result.tokens.shape == (1, 4)
  assert "tok/s" in out.getvalue()


def test_a_crashed_benchmark_system_fails_the_smoke_check(tmp_path, monkeypatch):
  """A system whose process dies is recorded with ok False, and the smoke check reports it."""
  from hetflow.bench import runner

  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path / "cache"))
  config = apply_smoke(load("configs/bench/tiny.py"))
  config.systems.broken = dict(kind="hetflow", strategy="no_such_strategy")
  config.order = "resident,broken"
  config.timeline = False
  result = runner.benchmark(config, str(tmp_path / "work"))
  assert [r["ok"] for r in result["systems"]] == [True, False]
  failed = _failed_runs("benchmark", result)
  assert len(failed) == 1 and failed[0].startswith("broken: exit 1")

