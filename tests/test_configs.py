"""Every config under configs/ loads and smoke-runs (STYLE.md: every shipped config is tested)."""

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
  from hetflow import benchmark, reproduce
  from hetflow.bench import plan_run
  from hetflow.generation import generate
  from hetflow.sparsity.train import train_from_config

  quiet = io.StringIO()
  return {
      "generate": lambda config, workdir: generate(config, out=quiet),
      "plan": lambda config, workdir: plan_run.run(config, workdir, out=quiet),
      "benchmark": benchmark.benchmark,
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


def test_default_config_generates():
  from hetflow.generation import generate

  out = io.StringIO()
  result = generate(apply_smoke(load("configs/default.py")), out=out)
  assert result.tokens.shape == (1, 4)
  assert "tok/s" in out.getvalue()
