"""The layers and seams of docs/architecture.md, checked: imports only go down
(function-local imports included, so no cycle can hide), the README's recipe
for a new strategy works as written, and the engine gives back every byte."""

import ast
import os
import re

import numpy as np
import pytest

import hetflow
from hetflow import hardware, planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lowest first; a module may import from its own layer and the ones before it.
# docs/architecture.md draws the same picture.
LAYERS = [
    ("memory, hardware profiles, traces, processes",
     ["hetflow.memory", "hetflow.hardware", "hetflow.trace", "hetflow.distributed"]),
    ("models", ["hetflow.models"]),
    ("checkpoints", ["hetflow.checkpoints", "hetflow.config"]),
    ("strategy protocol and registry", ["hetflow.strategy"]),
    ("engine", ["hetflow.engine", "hetflow.generation"]),
    ("cost formulas and simulator", ["hetflow.costmodel", "hetflow.simulate"]),
    ("sparsity building blocks", ["hetflow.sparsity"]),
    ("strategies", ["strategies"]),
    ("planner", ["hetflow.planner"]),
    ("measurement drivers", ["hetflow.bench", "hetflow.testing"]),
    ("package and launchers", ["hetflow", "experiments"]),
]


def _modules() -> dict[str, str]:
  out = {}
  for top in ("hetflow", "strategies", "experiments"):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(folder, f)
          name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[name.removesuffix(".__init__")] = path
  return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """Project modules imported anywhere in the file (inside functions too)."""
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      # `from pkg import mod` imports pkg.mod; `from mod import name` imports mod.
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    for t in targets:
      while t and t not in modules:
        t = t.rpartition(".")[0]
      if t and t != name:
        found.add(t)
  return found


def _layer(name: str) -> int:
  best = None
  for rank, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if name == p or name.startswith(p + "."):
        if best is None or len(p) > best[1]:
          best = (rank, len(p))
  assert best is not None, f"{name} is in no layer of LAYERS"
  return best[0]


def test_imports_only_go_down_and_nothing_is_imported_by_name():
  modules = _modules()
  wrong = []
  for name, path in modules.items():
    text = open(path).read()
    assert "import_module" not in text and "__import__" not in text, (
        f"{name} imports by name; strategies are found through entry points")
    for dep in _imports(name, path, modules):
      if _layer(dep) > _layer(name):
        wrong.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {dep}"
                     f" ({LAYERS[_layer(dep)][0]})")
  assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
  modules = _modules()
  graph = {n: _imports(n, p, modules) for n, p in modules.items()}
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for dep in sorted(graph[node]):
      if state.get(dep) == 1:
        raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
      if dep not in state:
        visit(dep, path + [dep])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_the_code_cites_only_documents_of_the_repository():
  cited = re.compile(r"(?:shared/|\b(?:DESIGN|MEASURING|PAPERS|PEERS|STYLE)\.md)")
  texts = [os.path.join(ROOT, name) for name in ("README.md", "WORKSPACE_NOTES.md")]
  for folder in ("docs", "configs", "experiments", "scripts"):
    for base, _, files in os.walk(os.path.join(ROOT, folder)):
      texts += [os.path.join(base, f) for f in files if f.endswith((".md", ".py", ".sh"))]
  for path in list(_modules().values()) + texts:
    for i, line in enumerate(open(path), 1):
      assert not cited.search(line), f"{path}:{i} cites a document outside the repository"


def _readme_recipe() -> list[str]:
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text[text.index("## Writing a strategy"):]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_recipe_works_as_written(tmp_path, monkeypatch):
  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path))
  strategy_file, usage = _readme_recipe()
  # "A new strategy is one file": the README's, with its cost model, under 120 lines.
  assert len(strategy_file.strip().splitlines()) < 120
  namespace: dict = {}
  exec(compile(strategy_file, "README.md (strategy)", "exec"), namespace)
  exec(compile(usage, "README.md (usage)", "exec"), namespace)  # asserts resident's tokens
  model, budget = namespace["model"], namespace["budget"]
  cls = hetflow.get_strategy("stream_from_host")
  assert "stream_from_host" in hetflow.available_strategies()
  ranked = planner.plan(model, budget, "a10-pcie")
  mine = [r for r in ranked if r.strategy == "stream_from_host"]
  assert mine and mine[0].feasible, [str(r) for r in ranked]
  assert mine[0].prediction.bottleneck in ("link", "device")
  # It ran through the engine's protocol: every layer half fetched per pass.
  with hetflow.Engine(model, cls(), budget=budget) as engine:
    engine.generate([[1, 2, 3]], max_new_tokens=3)
    assert engine.strategy.stats().decode.get("fetches") > 0
    assert engine.strategy.stats().decode.passes == 2


def test_a_strategy_without_a_cost_model_is_listed_with_the_reason():
  @hetflow.register_strategy("test-unpredictable")
  class Unpredictable(hetflow.get_strategy("resident")):
    cost_model = None

  model = hetflow.synthetic_model("llama-tiny")
  ranked = hetflow.planner.plan(model, hetflow.Budget(), hardware.PROFILES["a10-pcie"])
  row = [r for r in ranked if r.strategy == "test-unpredictable"]
  assert len(row) == 1 and not row[0].feasible
  assert row[0].reason == "cannot be predicted: no cost model"
  assert ranked[0].feasible


def test_a_fresh_process_plans_neuron_cluster():
  """The issue's repro: cost models used to be loaded as a side effect of another plan."""
  import subprocess
  import sys

  code = ("import hetflow\n"
          "rows = hetflow.plan(hetflow.synthetic_model('llama-tiny-sparse'), hetflow.Budget(),"
          " 'oneplus12-ufs4', strategies=['neuron_cluster'])\n"
          "assert rows and rows[0].feasible, [str(r) for r in rows]\n"
          "print(len(rows))\n")
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert int(run.stdout.split()[-1]) >= 1


@pytest.mark.parametrize("name,options", [
    ("resident", {}),
    ("layerwise", dict(offload_tier="host", resident_layers=1)),
    ("layerwise", dict(offload_tier="disk")),
    ("tensor_split", dict(alpha=0.5)),
    ("neuron_cluster", dict(calibration_tokens=64)),
])
def test_every_strategy_gives_back_its_bytes_on_close(name, options, tmp_path, monkeypatch):
  monkeypatch.setenv("HETFLOW_CACHE", str(tmp_path))
  model_name = "llama-tiny-sparse" if name == "neuron_cluster" else "llama-tiny"
  model = hetflow.synthetic_model(model_name)
  engine = hetflow.Engine(model, name, options=options)
  engine.generate(np.array([[1, 2, 3]]), max_new_tokens=2)
  assert engine.ledger.used("device") > 0
  engine.close()
  for tier in ("device", "host", "disk"):
    assert engine.ledger.used(tier) == 0, (tier, engine.ledger.live())
