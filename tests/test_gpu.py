"""On a real accelerator (issue 16): every strategy gives resident's greedy tokens at a small
device budget, and the ledger's device bytes agree with what the device's allocator reports.

Marked `gpu`: the default run deselects them (pyproject.toml's addopts). On a GPU machine:

  JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false \\
      python -m pytest -q -m gpu tests/test_gpu.py

(tests/conftest.py makes JAX_PLATFORMS default to "cpu", so name the GPU platform; the CPU
backend must stay listed, tensor_split multiplies its host columns there). Without a GPU
backend they skip, unless HETFLOW_GPU_TESTS_ON_CPU=1 (scripts/gpu_check.sh --smoke): then
the same checks run on the CPU, where `memory_stats()` is None and only the ledger side of
the memory check is recorded. With HETFLOW_GPU_RECORD=path every check appends one JSON line
of what it measured there, which scripts/gpu_check.sh puts in its report;
HETFLOW_GPU_PROBE_LIMIT_S (default 600) bounds each memory probe's seconds.

The memory check. Each strategy runs in a fresh process (the allocator's peak is
per process and never resets), with XLA's autotuner off (it allocates scratch copies of
operands while compiling, which no strategy holds). With `before` the allocator's
bytes_in_use before the engine exists, over one engine's construction and generation:
  - 0.9 x the ledger's device peak <= peak_bytes_in_use - before <= 1.1 x the ledger's
    peak + WORKSPACE, where WORKSPACE (64 MiB) is what XLA allocates for itself while a
    program runs and the ledger does not count: cuBLAS-Lt's workspace (32 MiB on Hopper)
    and a pass's activations (under 8 MiB for these models at 16 tokens);
  - after Engine.close(): bytes_in_use - before <= 10% of the ledger's peak + WORKSPACE
    (the weights are gone).
Between generations (bytes_in_use against the ledger's `used`) is recorded, not asserted:
the ledger may hold reservations (staging, KV room) that no buffer fills at that moment.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import jax
import numpy as np
import pytest

import hetflow
import strategies  # noqa: F401  (registers the built-ins when run without entry points)

ON_ACCELERATOR = jax.default_backend() != "cpu"
ON_CPU_ASKED = os.environ.get("HETFLOW_GPU_TESTS_ON_CPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_ACCELERATOR or ON_CPU_ASKED),
                       reason="no GPU backend (jax.default_backend() is 'cpu'): set "
                              "JAX_PLATFORMS=cuda,cpu, or HETFLOW_GPU_TESTS_ON_CPU=1 to run "
                              "these checks on the CPU"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20
WORKSPACE = 64 * MiB
IDS = np.array([[1, 5, 9, 33, 7, 2, 100, 4, 8, 15, 16, 23, 42, 3, 11, 6]], np.int32)
NEW = 6
SPARSE = dict(sparsity=0.9, hotness="zipf:1.1")

# Every strategy on the three architectures; neuron_cluster serves only models with true
# activation sparsity (Llama with dReLU, OPT), so it runs on their -sparse twins.
CASES = [(name, "resident", None) for name in ("llama-tiny", "opt-tiny", "mixtral-tiny")]
CASES += [(name, "layerwise", dict(offload_tier=tier, kv_reserve_tokens=IDS.shape[1] + NEW))
          for name in ("llama-tiny", "opt-tiny", "mixtral-tiny") for tier in ("host", "disk")]
CASES += [(name, "tensor_split", dict(kv_reserve_tokens=IDS.shape[1] + NEW))
          for name in ("llama-tiny", "opt-tiny", "mixtral-tiny")]
CASES += [(name, "neuron_cluster", None) for name in ("llama-tiny-sparse", "opt-tiny-sparse")]
CASES += [("mixtral-tiny", "moe_offload", dict(kv_reserve_tokens=IDS.shape[1] + NEW))]
CASES += [("mixtral-tiny-8e-sparse", "moe_sparse", dict(kv_reserve_tokens=IDS.shape[1] + NEW))]

# The memory check's models: big enough on a GPU that a layer (28 MiB in float32) is a
# tenth of the ledger's bytes; tiny where it runs on the CPU (smoke).
# moe_offload's is mixtral-tiny on both (moe_sparse's its sparse-expert twin) (a mid-size Mixtral takes minutes to generate), so
# on a GPU its check is dominated by the workspace allowance: a weak check, stated.
MEMORY_MODELS = ({"resident": "opt-125m", "layerwise": "opt-125m", "tensor_split": "opt-125m",
                  "neuron_cluster": "opt-125m-sparse", "moe_offload": "mixtral-tiny",
                  "moe_sparse": "mixtral-tiny-8e-sparse"}
                 if ON_ACCELERATOR else
                 {"resident": "opt-tiny", "layerwise": "opt-tiny", "tensor_split": "opt-tiny",
                  "neuron_cluster": "opt-tiny-sparse", "moe_offload": "mixtral-tiny",
                  "moe_sparse": "mixtral-tiny-8e-sparse"})
MEMORY_OPTIONS = {"resident": None, "tensor_split": dict(kv_reserve_tokens=IDS.shape[1] + NEW),
                  "layerwise": dict(offload_tier="host", kv_reserve_tokens=IDS.shape[1] + NEW),
                  "neuron_cluster": None,
                  "moe_offload": dict(kv_reserve_tokens=IDS.shape[1] + NEW),
                  "moe_sparse": dict(kv_reserve_tokens=IDS.shape[1] + NEW)}


def _model(name, **kwargs):
  return hetflow.synthetic_model(name, **(SPARSE if name.endswith("-sparse") else {}), **kwargs)


def small_budget(model, strategy, options) -> int:
  """The smallest device budget `strategy` plans `model` in, plus this generation's KV cache
  (resident's minimum is the weights alone)."""
  try:
    hetflow.Engine(model, strategy, budget=hetflow.Budget(device=1), options=options)
  except hetflow.BudgetExceeded as err:
    assert err.minimum, f"{strategy} refused one byte without stating its minimum"
    return err.minimum + model.kv_cache_nbytes(IDS.shape[1] + NEW, IDS.shape[0])
  raise AssertionError(f"{strategy} planned {model.config.name} in one device byte")


@pytest.fixture(scope="module")
def record():
  """Appends one JSON line per check to $HETFLOW_GPU_RECORD (when set)."""
  path = os.environ.get("HETFLOW_GPU_RECORD")

  def write(**fields):
    fields.update(backend=jax.default_backend(), device=str(jax.devices()[0]))
    if path:
      with open(path, "a") as f:
        f.write(json.dumps(fields, default=str) + "\n")

  return write


# -- the memory check runs in fresh processes, started first so they overlap the token checks


_MEMORY_PROBE = textwrap.dedent("""
    import gc, json, sys
    import jax, numpy as np
    import hetflow, strategies
    spec = json.loads(sys.argv[1])
    device = jax.devices()[0]

    def in_use():
      s = device.memory_stats()
      return None if s is None else {k: s.get(k) for k in
                                     ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}

    model = hetflow.synthetic_model(spec["model"], **spec["kwargs"])
    if spec["model"].endswith("-sparse"):
      model.tensor("layers/0/mlp/up")  # the sparse source's own calibration, done first
    ids = np.array(spec["ids"], np.int32)
    before = in_use()
    engine = hetflow.Engine(model, spec["strategy"], options=spec["options"],
                            budget=hetflow.Budget(device=spec["budget"]))
    built = in_use()
    out = engine.generate(ids, max_new_tokens=spec["new"], stop_tokens=())
    after = in_use()
    ledger = out.stats["ledger"]["tiers"]["device"]
    engine.close()
    del engine, out
    gc.collect()
    print(json.dumps(dict(before=before, built=built, after=after, closed=in_use(),
                          ledger=ledger, backend=jax.default_backend(), device=str(device))))
    """)


def _memory_spec(strategy):
  name = MEMORY_MODELS[strategy]
  model = _model(name)
  options = MEMORY_OPTIONS[strategy]
  return dict(model=name, kwargs=SPARSE if name.endswith("-sparse") else {},
              strategy=strategy, options=options, budget=small_budget(model, strategy, options),
              ids=IDS.tolist(), new=NEW)


# Seconds a probe may run, from its start: under a caller's own time limit (gpu_check.sh
# sets it), a probe that hangs fails its test and pytest still writes its report.
PROBE_LIMIT_S = float(os.environ.get("HETFLOW_GPU_PROBE_LIMIT_S", "600"))


class _Probe:
  """One probe process; its output goes to files (progress bars could fill a pipe)."""

  def __init__(self, spec, env, autotune, started=None):
    self.started = time.monotonic() if started is None else started
    env = dict(env)
    if ON_ACCELERATOR and not autotune:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen([sys.executable, "-c", _MEMORY_PROBE, json.dumps(spec)],
                                 env=env, cwd=ROOT, stdout=self.out, stderr=self.err, text=True)

  def result(self):
    """(returncode, stdout, stderr) once it ends; returncode None if it ran out of time."""
    try:
      code = self.proc.wait(timeout=max(1.0, self.started + PROBE_LIMIT_S - time.monotonic()))
    except subprocess.TimeoutExpired:
      self.kill()
      code = None
    texts = []
    for f in (self.out, self.err):
      f.seek(0)
      texts.append(f.read())
      f.close()
    return code, *texts

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def memory_probes(cache_dir):
  """strategy -> (spec, a started probe process); all run at once (one allocator each)."""
  env = dict(os.environ, HETFLOW_CACHE=cache_dir, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  probes = {}
  for strategy in MEMORY_MODELS:
    spec = _memory_spec(strategy)
    probes[strategy] = (spec, env, _Probe(spec, env, autotune=False))
  yield probes
  for _, _, probe in probes.values():
    probe.kill()


def _probe_result(spec, env, probe):
  code, stdout, stderr = probe.result()
  autotune = "off" if ON_ACCELERATOR else "n/a (cpu)"
  if code and "xla_gpu_autotune_level" in stderr:  # an XLA that no longer knows the flag
    autotune = "on (this XLA does not know --xla_gpu_autotune_level)"
    code, stdout, stderr = _Probe(spec, env, autotune=True, started=probe.started).result()
  assert code is not None, f"memory probe of {spec['strategy']} ran past {PROBE_LIMIT_S} s"
  assert code == 0 and stdout.strip(), \
      f"memory probe of {spec['strategy']} failed ({code}):\n{stderr[-4000:]}"
  result = json.loads(stdout.strip().splitlines()[-1])
  result["autotune"] = autotune
  return result


# -- the checks --------------------------------------------------------------------------


_REFERENCES = {}


def _reference(name):
  """(model, resident's greedy tokens, resident's logits), once per model."""
  if name not in _REFERENCES:
    model = _model(name)
    with hetflow.Engine(model, "resident") as engine:
      tokens = engine.generate(IDS, max_new_tokens=NEW, stop_tokens=()).tokens
      _REFERENCES[name] = (model, tokens, engine.forward(IDS))
  return _REFERENCES[name]


@pytest.mark.parametrize("name, strategy, options", CASES,
                         ids=[f"{n}-{s}" + (f"-{o['offload_tier']}" if o and "offload_tier" in o
                                            else "") for n, s, o in CASES])
def test_tokens_equal_resident(cache_dir, record, name, strategy, options):
  model, tokens, logits = _reference(name)
  budget = small_budget(model, strategy, options)
  with hetflow.Engine(model, strategy, budget=hetflow.Budget(device=budget),
                      options=options) as engine:
    out = engine.generate(IDS, max_new_tokens=NEW, stop_tokens=())
    diff = float(np.abs(engine.forward(IDS) - logits).max())
  peak = out.stats["ledger"]["tiers"]["device"]["peak"]
  same = bool(np.array_equal(out.tokens, tokens))
  record(check="tokens", model=name, strategy=strategy, options=options, budget_bytes=budget,
         model_bytes=model.nbytes, ledger_device_peak=peak, tokens_equal=same,
         tokens=out.tokens.tolist(), resident_tokens=tokens.tolist(),
         max_abs_logit_diff=diff)
  np.testing.assert_array_equal(out.tokens, tokens, err_msg=f"{name} {strategy} {options}")
  assert 0 < peak <= budget


@pytest.mark.parametrize("strategy", sorted(MEMORY_MODELS))
def test_ledger_matches_device_allocator(record, memory_probes, strategy):
  assert set(MEMORY_MODELS) == set(hetflow.available_strategies()), "a strategy is unchecked"
  spec, env, probe = memory_probes[strategy]
  r = _probe_result(spec, env, probe)
  ledger = r["ledger"]
  fields = dict(check="memory", strategy=strategy, model=spec["model"], options=spec["options"],
                budget_bytes=spec["budget"], ledger_device_used=ledger["used"],
                ledger_device_peak=ledger["peak"], memory_stats=r["before"] is not None,
                workspace_allowance=WORKSPACE, autotune=r["autotune"], probe_backend=r["backend"])
  assert 0 < ledger["peak"] <= spec["budget"]
  if r["before"] is None:  # the CPU: the allocator reports nothing; the ledger is all there is
    record(**fields, note="device.memory_stats() is None on this backend")
    assert r["backend"] == "cpu", f"{r['device']} has no memory_stats()"
    return
  base = r["before"]["bytes_in_use"]
  used = r["after"]["bytes_in_use"] - base
  peak = r["after"]["peak_bytes_in_use"] - base
  closed = r["closed"]["bytes_in_use"] - base
  record(**fields, bytes_in_use_before=base, device_used=used, device_peak=peak,
         device_used_after_build=r["built"]["bytes_in_use"] - base, device_used_after_close=closed,
         peak_before=r["before"]["peak_bytes_in_use"],
         peak_observed=r["after"]["peak_bytes_in_use"] > r["before"]["peak_bytes_in_use"],
         used_ratio=used / ledger["used"] if ledger["used"] else None,
         peak_excess_bytes=peak - ledger["peak"])
  assert 0.9 * ledger["peak"] <= peak <= 1.1 * ledger["peak"] + WORKSPACE, (peak, ledger)
  assert closed <= 0.1 * ledger["peak"] + WORKSPACE, (closed, ledger)
