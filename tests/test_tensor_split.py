"""tensor_split: exact against resident at any alpha, on one and several CPU devices;
plans that respect the budget; the HeteGen alpha."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import hetflow
from hetflow import costmodel, hardware, simulate
from hetflow.memory import BudgetExceeded
from hetflow.models import formats
from hetflow.strategy import get_strategy

MODELS = ("llama-tiny", "opt-tiny", "mixtral-tiny")
IDS = np.array([[1, 5, 9, 33, 7, 2, 100], [4, 8, 15, 16, 23, 42, 3]], np.int32)
NEW = 5
SPLIT_ALL = dict(keep_resident=False)


@pytest.fixture(scope="module")
def references():
  out = {}
  for name in MODELS:
    model = hetflow.synthetic_model(name)
    engine = hetflow.Engine(model, "resident")
    out[name] = (model, engine.generate(IDS, max_new_tokens=NEW, stop_tokens=()).tokens,
                 engine.forward(IDS))
  return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_matches_resident(references, name, alpha):
  model, tokens, logits = references[name]
  budget = hetflow.Budget(device="4MiB")
  engine = hetflow.Engine(model, "tensor_split", budget=budget,
                          options=dict(alpha=alpha, **SPLIT_ALL))
  out = engine.generate(IDS, max_new_tokens=NEW, stop_tokens=())
  np.testing.assert_array_equal(out.tokens, tokens)
  np.testing.assert_allclose(engine.forward(IDS), logits, atol=1e-5, rtol=0)
  assert engine.ledger.peak("device") <= budget.device
  stats = out.stats["strategy"].decode
  assert stats["split_matmuls"] > 0
  # Weights cross the link only for alpha > 0, CPU results only for alpha < 1.
  assert (stats.get("h2d_bytes", 0) > 0) == (alpha > 0)
  assert (stats.get("activation_bytes_h2d", 0) > 0) == (alpha < 1)


@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int8-g32", "int4", "int4-asym"])
@pytest.mark.parametrize("name", MODELS)
def test_formats_match_resident_of_the_same_format(name, weights):
  """Each share stays in the model's format (the CPU share through the format's kernel):
  resident's greedy tokens for the same weights, logits as close as the float32 split."""
  model = hetflow.synthetic_model(name, weights=weights)
  with hetflow.Engine(model, "resident") as ref:
    tokens = ref.generate(IDS, max_new_tokens=NEW, stop_tokens=()).tokens
    logits = ref.forward(IDS)
  budget = hetflow.Budget(device="4MiB")
  strategy = get_strategy("tensor_split")(dict(alpha=0.3, **SPLIT_ALL))
  placement = strategy.plan(model, budget)
  layers_bytes = sum(gp.nbytes for g, gp in placement.groups.items() if g.startswith("layers/"))
  stored = sum(model.group_nbytes(g) for g in model.group_names() if g.startswith("layers/"))
  assert layers_bytes <= stored  # host shares counted in stored bytes, not float32's
  with hetflow.Engine(model, "tensor_split", budget=budget,
                      options=dict(alpha=0.3, **SPLIT_ALL)) as engine:
    out = engine.generate(IDS, max_new_tokens=NEW, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(IDS), logits, atol=1e-5, rtol=0)
    split = next(h for h in engine.strategy._halves.values() if h.experts is None
                 and any(k.resident is None for k in h.kernels.values()))
    kernel = next(k for k in split.kernels.values() if k.resident is None)
    # The host share of a kernel is still in the model's format, not widened.
    assert formats.format_of(kernel.chunks[-1]).startswith(weights.split("-")[0][:4])
    stats = out.stats["strategy"].decode
  assert stats["split_matmuls"] > 0 and stats["h2d_bytes"] > 0


def _run_on_four_cpu_devices(alphas):
  script = textwrap.dedent(f"""
      import json, numpy as np, jax, hetflow
      ids = np.array({IDS.tolist()}, np.int32)
      out = {{"devices": len(jax.devices())}}
      for name in {list(MODELS)}:
        model = hetflow.synthetic_model(name)
        ref = hetflow.Engine(model, "resident")
        tokens = ref.generate(ids, max_new_tokens={NEW}, stop_tokens=()).tokens
        logits = ref.forward(ids)
        for alpha in {list(alphas)}:
          e = hetflow.Engine(model, "tensor_split", budget=hetflow.Budget(device="4MiB"),
                             options=dict(alpha=alpha, keep_resident=False))
          o = e.generate(ids, max_new_tokens={NEW}, stop_tokens=())
          out[f"{{name}} {{alpha}}"] = [
              bool((o.tokens == tokens).all()),
              float(np.abs(e.forward(ids) - logits).max()),
              o.stats["strategy"].details["link_is_real"]]
      print(json.dumps(out))
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result.pop("devices") == 4
  for key, (same, err, real) in result.items():
    assert same, key
    assert err <= 1e-5, (key, err)
    assert real, key


def test_several_cpu_devices():
  """The CPU part runs on another CPU device: a real copy each way, same tokens."""
  _run_on_four_cpu_devices([0.3])


@pytest.mark.slow
def test_several_cpu_devices_all_alphas():
  _run_on_four_cpu_devices([0.0, 0.3, 1.0])


def test_plan_respects_budget_and_states_minimum():
  model = hetflow.synthetic_model("llama-tiny")
  strategy = get_strategy("tensor_split")(dict(reserve_bytes=200_000))
  with pytest.raises(BudgetExceeded) as err:
    strategy.plan(model, hetflow.Budget(device="64KiB"), hardware.PROFILES["a10-pcie"])
  minimum = err.value.minimum
  assert minimum and minimum > 64 * 1024
  for device in (minimum, minimum + 200_000, model.nbytes + 10_000_000):
    budget = hetflow.Budget(device=device)
    engine = hetflow.Engine(model, "tensor_split", budget=budget,
                            profile=hardware.PROFILES["a10-pcie"],
                            options=dict(reserve_bytes=200_000))
    engine.generate(IDS[:1], max_new_tokens=3, stop_tokens=())
    assert engine.ledger.peak("device") <= device
    assert engine.placement.bytes_per_tier()["device"] <= device
  # The largest budget keeps everything resident: nothing left to split.
  assert all(g.tier == "device" for g in engine.placement.groups.values())


def test_scheduler_keeps_small_matrices_first():
  """Per device byte, small kernels save the most (their split overhead is fixed)."""
  model = hetflow.synthetic_model("llama-tiny")
  strategy = get_strategy("tensor_split")(dict(alpha=0.3))
  profile = hardware.PROFILES["a10-pcie"]
  with pytest.raises(BudgetExceeded) as err:
    strategy.plan(model, hetflow.Budget(device=1), profile)
  kv_kernel = 64 * 32 * 4  # [D, G * K] in float32
  plan = strategy.plan(model, hetflow.Budget(device=err.value.minimum + 3 * kv_kernel),
                       profile)
  resident = {(g, n) for g, gp in plan.groups.items()
              for n, m in (gp.details.matrices if gp.details else {}).items() if m.resident}
  assert resident and all(n in ("k", "v") for _, n in resident)
  assert "alpha" in str(plan)


def test_alpha_formula_balances_the_two_sides():
  v_cpu, v_link, v_dev = 45e9, 24e9, 510e9
  a = costmodel.hetegen_alpha(v_cpu, v_link, v_dev)
  assert (1 - a) / v_cpu == pytest.approx(a / v_link + a / v_dev)
  assert 0.3 < a < 0.35  # HeteGen's testbed: about a third goes over the link


def test_prefill_alpha_exceeds_decode_alpha():
  """Over a long prompt the CPU is compute-bound; the link is not: alpha grows."""
  model = hetflow.synthetic_model("opt-6.7b", dtype=jnp.float16)
  strategy = get_strategy("tensor_split")()
  alpha = strategy.alphas(model, hardware.PROFILES["a10-pcie"])
  assert alpha["prefill"] > 0.9 > 0.4 > alpha["decode"]


def test_plan_of_a_big_model_is_shapes_only():
  model = hetflow.synthetic_model("opt-30b", dtype=jnp.float16)
  plan = get_strategy("tensor_split")().plan(model, hetflow.Budget(device="6GB"),
                                              hardware.PROFILES["a10-pcie"])
  assert plan.bytes_per_tier()["device"] <= 6e9
  pred = simulate.predict(model, plan, hardware.PROFILES["a10-pcie"])
  assert 0 < pred.decode_s_per_token < 10
