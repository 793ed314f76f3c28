"""The catalogue of bad inputs and faults (issue 12): each gets a hetflow error of a
known type whose message names the input and says what to do, and leaves nothing
deleted or half-written (files unchanged, the ledger back where it was).

Store faults (deletion, fingerprints, replacement, leftovers, disk budget) are in
tests/test_store_faults.py.
"""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

import hetflow
from hetflow import config as config_lib
from hetflow import generation
from hetflow.checkpoints import CheckpointError, save_hf
from hetflow.engine import Engine, NonFiniteLogitsError, SamplingOptions, sample
from hetflow.memory import Budget, BudgetExceeded, ReadError
from hetflow.memory.budget import parse_bytes
from hetflow.strategy import available_strategies, get_strategy
from hetflow.testing.files import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = [[5, 6, 7, 8, 9, 10]]


@pytest.fixture(scope="module")
def engine():
  with Engine(hetflow.synthetic_model("llama-tiny")) as e:
    yield e


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return save_hf(hetflow.synthetic_model("llama-tiny"), str(tmp_path_factory.mktemp("ckpt") / "m"))


def copy_checkpoint(src, dst):
  os.makedirs(dst)
  for name, data in snapshot(src).items():
    with open(os.path.join(dst, name), "wb") as f:
      f.write(data)
  return dst


# -- byte sizes and budgets ----------------------------------------------------------


@pytest.mark.parametrize("value, words", [
    ("1e400GiB", ["'1e400GiB'", "too large"]),
    ("1e9999999", ["'1e9999999'", "too large"]),
    (2**70, [str(2**70), "too large"]),
    (1e30, ["1e+30", "too large"]),
    ("12 gigs", ["'12 gigs'", "Accepted units"]),
    (-5, ["-5", ">= 0"]),
    (True, ["True"]),
    (float("nan"), ["nan"]),
], ids=["1e400GiB", "huge-exponent", "2**70", "1e30", "unknown-unit", "negative", "bool", "nan"])
def test_bad_byte_counts_are_refused_by_name(value, words):
  with pytest.raises(ValueError) as e:
    parse_bytes(value)
  for w in words:
    assert w in str(e.value)


def test_budget_names_the_tier_and_the_valid_tiers():
  with pytest.raises(ValueError, match=r"Budget.device: .*'1e400GiB'.*too large"):
    Budget(device="1e400GiB")
  with pytest.raises(ValueError) as e:
    Budget.from_any({"gpu": "1GiB"})
  assert "'gpu'" in str(e.value) and all(t in str(e.value) for t in ("device", "host", "disk"))
  with pytest.raises(config_lib.ConfigError, match="budget: .*'gpu'"):
    config_lib.build_budget({"gpu": "1GiB"})


# -- strategy options and the command line ---------------------------------------------


def test_every_option_of_every_strategy_is_a_config_field():
  section = generation.options_section()
  for name in available_strategies():
    for f in dataclasses.fields(get_strategy(name).Options):
      assert f.name in section and section[f.name] is None, (name, f.name)
  assert generation.build_options("layerwise", section) is None  # unset: the defaults


def test_options_are_built_for_the_chosen_strategy(tmp_path):
  options = generation.build_options(
      "layerwise", dict(generation.options_section().to_dict(), store_dir=str(tmp_path),
                        prefetch_depth=2, resident_layers="auto"))
  assert (options.store_dir, options.prefetch_depth, options.resident_layers) == (
      str(tmp_path), 2, "auto")


@pytest.mark.parametrize("strategy, options, error, words", [
    ("resident", {"store_dir": "/tmp/x"}, config_lib.ConfigError,
     ["store_dir", "'resident'", "layerwise", "neuron_cluster"]),
    ("layerwise", {"prefetch_dpeth": 2}, config_lib.ConfigError,
     ["prefetch_dpeth", "Did you mean 'prefetch_depth'", "reader_threads"]),
    ("layerwise", {"prefetch_depth": "two"}, config_lib.ConfigError,
     ["prefetch_depth='two'", "expects int"]),
    ("layerwise", {"prefetch_depth": -1}, config_lib.ConfigError, ["prefetch_depth=-1", ">= 0"]),
    ("layerwise", {"offload_tier": "gpu"}, config_lib.ConfigError, ["offload_tier='gpu'", "'disk'"]),
    ("neuron_cluster", {"staging_bytes": "64 parsecs"}, config_lib.ConfigError,
     ["staging_bytes", "'64 parsecs'"]),
    ("auto", {"prefetch_depth": 2}, config_lib.ConfigError, ["'auto'", "prefetch_depth"]),
    ("layerwze", {}, config_lib.ConfigError, ["'layerwze'", "Did you mean 'layerwise'"]),
], ids=["option-of-another-strategy", "misspelt", "wrong-type", "post-init", "bad-literal",
        "bad-size-type", "options-with-auto", "unknown-strategy"])
def test_bad_options_name_the_option(strategy, options, error, words):
  with pytest.raises(error) as e:
    generation.build_options(strategy, options)
  for w in words:
    assert w in str(e.value), str(e.value)


def _parse_flags(argv, config="configs/default.py"):
  """What `python -m experiments.generate` parses, in-process."""
  argv = ["prog", f"--config={os.path.join(ROOT, config)}"] + argv
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True,
                                           sys_argv=argv)
  values(argv)
  return holder.value


def test_option_flags_parse_to_the_option_types():
  config = _parse_flags(["--config.strategy.name=layerwise",
                         "--config.strategy.options.store_dir=123",
                         "--config.strategy.options.prefetch_depth=2",
                         "--config.strategy.options.direct_io=false",
                         "--config.strategy.options.resident_layers=auto",
                         "--config.strategy.options.staging_bytes=4096"])
  o = config.strategy.options
  assert (o.store_dir, o.prefetch_depth, o.direct_io, o.resident_layers, o.staging_bytes) == (
      "123", 2, False, "auto", "4096")
  assert _parse_flags(["--config.strategy.options.resident_layers=3"]).strategy.options.resident_layers == 3


@pytest.mark.parametrize("flag, words", [
    ("--config.budget.gpu=1GiB", ["--config.budget.gpu", "'gpu'", "'device'", "'disk'", "'host'"]),
    ("--config.strategy.options.prefetch_dpeth=2",
     ["prefetch_dpeth", "Did you mean 'prefetch_depth'", "'store_dir'"]),
    ("--config.max_new_tokns=3", ["max_new_tokns", "Did you mean 'max_new_tokens'"]),
    ("--config.prompt.text=hi", ["config.prompt is a value"]),
], ids=["unknown-tier", "misspelt-option", "misspelt-field", "field-of-a-value"])
def test_override_flags_that_name_no_field(flag, words):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check_overrides(["prog", "--config", os.path.join(ROOT, "configs/default.py"),
                                flag], "configs/default.py")
  for w in words:
    assert w in str(e.value), str(e.value)


def test_generation_checks_the_config_before_loading_the_model(tmp_path):
  config = config_lib.apply_smoke(_parse_flags([]))
  config.model.checkpoint = str(tmp_path / "missing")  # never reached: the options fail first
  config.strategy.options.store_dir = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="store_dir.*'resident'"):
    generation.generate(config, out=open(os.devnull, "w"))
  assert os.listdir(tmp_path) == []


def _cli(*args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "experiments.generate",
                         "--config=configs/default.py", "--config.model.name=llama-tiny",
                         "--config.max_new_tokens=2", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_sets_the_store_dir_that_convert_prints(tmp_path):
  """The flag `experiments.convert` tells users to pass, end to end."""
  from hetflow.memory.store import write_store

  store = write_store(hetflow.synthetic_model("llama-tiny"), str(tmp_path / "store"),
                      progress=False)
  before = snapshot(store.path)
  run = _cli("--config.strategy.name=layerwise",
             f"--config.strategy.options.store_dir={store.path}",
             "--config.strategy.options.prefetch_depth=2")
  assert run.returncode == 0, run.stderr[-2000:]
  assert "tokens:" in run.stdout
  assert snapshot(store.path) == before  # read, not rewritten
  bad = _cli("--config.strategy.options.prefetch_dpeth=2")
  assert bad.returncode != 0 and "Did you mean 'prefetch_depth'" in bad.stderr
  assert "Traceback" not in bad.stderr


# -- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_path_that_is_a_file(checkpoint):
  before = snapshot(checkpoint)
  with pytest.raises(CheckpointError) as e:
    hetflow.load_model(os.path.join(checkpoint, "config.json"))
  assert "is a file" in str(e.value) and repr(checkpoint) in str(e.value)
  assert snapshot(checkpoint) == before


@pytest.mark.parametrize("edit, words", [
    (lambda c: [c], ["config.json", "JSON list", "not an object"]),
    (lambda c: "llama", ["config.json", "JSON str"]),
    (lambda c: dict(c, hidden_size="64"), ["hidden_size='64'", "positive integer"]),
    (lambda c: dict(c, num_hidden_layers=2.5), ["num_hidden_layers=2.5", "positive integer"]),
    (lambda c: dict(c, vocab_size=0), ["vocab_size=0", "positive integer"]),
    (lambda c: dict(c, tie_word_embeddings="yes"), ["tie_word_embeddings='yes'", "true or false"]),
    (lambda c: dict(c, rms_norm_eps=-1e-6), ["rms_norm_eps", "positive number"]),
    (lambda c: dict(c, hidden_act=3), ["hidden_act=3", "a string"]),
    (lambda c: dict(c, eos_token_id="2"), ["eos_token_id='2'", "integer id"]),
    (lambda c: dict(c, rope_scaling=[8.0]), ["rope_scaling", "an object"]),
], ids=["list", "string", "str-size", "float-layers", "zero-vocab", "str-bool", "negative-eps",
        "int-act", "str-eos", "list-rope"])
def test_bad_config_json_names_the_field(checkpoint, tmp_path, edit, words):
  directory = copy_checkpoint(checkpoint, str(tmp_path / "m"))
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump(edit(config), f)
  before = snapshot(directory)
  with pytest.raises(CheckpointError) as e:
    hetflow.load_model(directory)
  assert path in str(e.value) or "config.json" in str(e.value)
  for w in words:
    assert w in str(e.value), str(e.value)
  assert snapshot(directory) == before


def _rewrite_tensors(directory, change):
  from safetensors.numpy import load_file, save_file

  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  save_file(change(tensors), path)


@pytest.mark.parametrize("dtype", [np.int8, np.bool_, np.uint8])
def test_non_float_tensors_are_refused_before_anything_is_placed(checkpoint, tmp_path, dtype):
  directory = copy_checkpoint(checkpoint, str(tmp_path / "m"))
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite_tensors(directory, lambda t: dict(t, **{name: t[name].astype(dtype)}))
  before = snapshot(directory)
  with pytest.raises(CheckpointError) as e:
    hetflow.load_model(directory)
  stored = {np.int8: "I8", np.bool_: "BOOL", np.uint8: "U8"}[dtype]
  assert name in str(e.value) and f"dtype {stored}" in str(e.value)
  assert "Dequantize" in str(e.value)
  assert snapshot(directory) == before


def test_bitsandbytes_style_checkpoint_is_refused_from_the_cli(checkpoint, tmp_path):
  """A save_pretrained'd 8-bit checkpoint: standard names, int8 weights, quantization_config."""
  directory = copy_checkpoint(checkpoint, str(tmp_path / "m"))

  def quantize(tensors):
    out = {}
    for k, v in tensors.items():
      if v.ndim == 2 and "embed" not in k:
        out[k] = np.clip(np.round(v * 64), -127, 127).astype(np.int8)
        out[k.replace(".weight", ".SCB")] = np.abs(v).max(1).astype(np.float32)
      else:
        out[k] = v
    return out

  _rewrite_tensors(directory, quantize)
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
  with open(path, "w") as f:
    json.dump(config, f)
  before = snapshot(directory)
  with pytest.raises(CheckpointError, match="bitsandbytes"):
    hetflow.load_model(directory)
  run = _cli(f"--config.model.checkpoint={directory}")
  assert run.returncode != 0
  assert "error:" in run.stderr and "dtype I8" in run.stderr and "Traceback" not in run.stderr
  assert snapshot(directory) == before


def test_corrupt_tokenizer_is_named_and_does_not_block_id_prompts(checkpoint, tmp_path):
  directory = copy_checkpoint(checkpoint, str(tmp_path / "m"))
  tokenizer = os.path.join(directory, "tokenizer.json")
  with open(tokenizer, "w") as f:
    f.write('{"version": "1.0", "model": ')  # cut short
  with pytest.warns(UserWarning, match="tokenizer.json"):
    model = hetflow.load_model(directory)
  with Engine(model) as engine:
    out = engine.generate(PROMPT, max_new_tokens=3)
    assert out.tokens.shape == (1, 3) and out.text is None
    with pytest.raises(CheckpointError) as e:
      engine.generate("Once upon a time", max_new_tokens=3)
    assert tokenizer in str(e.value) and "token ids" in str(e.value)
    assert engine.ledger.used("device") == sum(model.group_nbytes(g) for g in model.group_names())


# -- engine inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("call, words", [
    (dict(prompts=[[5, 512]]), ["token id 512", "[0, 512)"]),
    (dict(prompts=[[5, -1]]), ["token id -1", ">= 0"]),
    (dict(prompts=np.array([[3, 2**40]])), ["token id 1099511627776"]),
    (dict(prompts=np.array([], np.int32)), ["prompts has shape [0]"]),
    (dict(prompts=[]), ["prompts is empty"]),
    (dict(prompts=[[1, 2], []]), ["prompt 1 is empty"]),
    (dict(prompts=None), ["prompts is None"]),
    (dict(prompts=np.array([[1.0, 2.0]])), ["dtype float64", "integers"]),
    (dict(prompts=[[1, 2.5]]), ["prompt 0 holds 2.5"]),
    (dict(prompts=np.zeros((1, 2, 3), np.int32)), ["shape [1, 2, 3]"]),
    (dict(prompts=[[1, 2]], top_k=513), ["top_k=513", "vocabulary size 512"]),
    (dict(prompts=[[1, 2]], top_k=-1), ["top_k=-1"]),
    (dict(prompts=[[1, 2]], temperature=1.0, top_p=0.0), ["top_p=0.0", "greedy"]),
    (dict(prompts=[[1, 2]], temperature=1.0, top_p=1.5), ["top_p=1.5"]),
    (dict(prompts=[[1, 2]], temperature=-1.0), ["temperature=-1.0"]),
    (dict(prompts=[[1, 2]], temperature=float("nan")), ["temperature=nan"]),
    (dict(prompts=[[1, 2]], max_new_tokens=0), ["max_new_tokens=0"]),
    (dict(prompts=[[1, 2]], max_new_tokens=2.5), ["max_new_tokens=2.5"]),
    (dict(prompts="Once upon a time"), ["text prompts need a tokenizer", "token ids"]),
    (dict(prompts=["hello", [1, 2]]), ["prompt 1 is list among text prompts"]),
], ids=["id-at-vocab", "negative-id", "huge-id", "empty-array", "empty-list", "empty-row", "none",
        "float-array", "float-id", "3d", "top-k-above-vocab", "negative-top-k", "top-p-0",
        "top-p-1.5", "negative-temperature", "nan-temperature", "zero-new-tokens",
        "fractional-new-tokens", "text-without-tokenizer", "mixed-text-and-ids"])
def test_bad_generate_arguments_are_refused_by_name(engine, call, words):
  call = dict(call)
  used = engine.ledger.used("device")
  with pytest.raises(ValueError) as e:
    engine.generate(call.pop("prompts"), **dict(dict(max_new_tokens=2), **call))
  for w in words:
    assert w in str(e.value), str(e.value)
  assert engine.ledger.used("device") == used  # no KV cache left allocated


@pytest.mark.parametrize("ids, mask, words", [
    (np.array([[3, 600]]), None, ["token id 600"]),
    (np.array([[3, -2]]), None, ["token id -2"]),
    (np.array([[3, 4]]), np.array([[1, 1, 1]]), ["attention_mask has shape [1, 3]"]),
    (np.array([[3, 4]]), np.array([[0, 0]]), ["attention_mask row(s) [0]"]),
], ids=["id-past-vocab", "negative-id", "mask-shape", "empty-mask-row"])
def test_bad_forward_arguments_are_refused_by_name(engine, ids, mask, words):
  used = engine.ledger.used("device")
  with pytest.raises(ValueError) as e:
    engine.forward(ids, attention_mask=mask)
  for w in words:
    assert w in str(e.value), str(e.value)
  assert engine.ledger.used("device") == used


@pytest.mark.parametrize("pad", [10**6, -1], ids=["past-vocab", "minus-one"])
def test_a_pad_id_outside_the_vocabulary_only_fills_output(engine, pad):
  """A pad id outside the table (some Llama configs say pad_token_id=-1) must not be
  fed to the model: its NaN embedding reached the real tokens through the padding."""
  out = engine.generate([[5, 6, 7], [8]], max_new_tokens=3, pad_token_id=pad, stop_tokens=())
  alone = engine.generate([[8]], max_new_tokens=3, stop_tokens=())
  np.testing.assert_array_equal(out.tokens[1], alone.tokens[0])
  with pytest.raises(ValueError, match="pad_token_id='x'"):
    engine.generate([[5]], max_new_tokens=1, pad_token_id="x")


@pytest.mark.parametrize("row, temperature", [
    ([np.nan, 0.0, 1.0], 0.0), ([np.nan, 0.0, 1.0], 1.0), ([np.inf, 0.0, 1.0], 0.0),
    ([-np.inf, -np.inf, -np.inf], 1.0),
], ids=["nan-greedy", "nan-sampled", "inf", "all-minus-inf"])
def test_non_finite_logits_are_reported_not_decoded(row, temperature):
  logits = np.array([[0.0, 1.0, 2.0], row], np.float32)
  with pytest.raises(NonFiniteLogitsError, match=r"decode step 4 .* row\(s\) \[1\]"):
    sample(logits, SamplingOptions(temperature=temperature), np.random.default_rng(0),
           "decode step 4")
  # Masked (-inf) entries alone are fine.
  ok = np.array([[0.0, -np.inf, 2.0]], np.float32)
  assert sample(ok, SamplingOptions(), np.random.default_rng(0)).tolist() == [2]


def test_nan_weights_stop_generation_at_prefill(checkpoint, tmp_path):
  directory = copy_checkpoint(checkpoint, str(tmp_path / "m"))
  name = "model.norm.weight"
  _rewrite_tensors(directory, lambda t: dict(t, **{name: np.full_like(t[name], np.nan)}))
  with Engine(hetflow.load_model(directory)) as engine:
    used = engine.ledger.used("device")
    with pytest.raises(NonFiniteLogitsError, match="at prefill"):
      engine.generate(PROMPT, max_new_tokens=3)
    assert engine.ledger.used("device") == used


def test_opt_refuses_prompts_past_its_positions():
  with Engine(hetflow.synthetic_model("opt-tiny")) as engine:
    limit = engine.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"{limit} learned positions"):
      engine.forward(np.full((1, limit + 1), 5))
    with pytest.raises(ValueError, match=f"{limit} learned positions"):
      engine.generate(np.full((1, limit - 1), 5), max_new_tokens=4)
    assert engine.forward(np.full((1, limit), 5)).shape == (1, limit, 512)


def test_rotary_models_warn_past_their_positions():
  model = hetflow.synthetic_model("llama-tiny")
  limit = 12  # rotary weights do not depend on it: a short limit keeps the test fast
  model = dataclasses.replace(model, config=model.config.replace(max_position_embeddings=limit))
  with Engine(model) as engine:
    with pytest.warns(UserWarning, match="max_position_embeddings"):
      out = engine.generate(np.full((1, limit - 1), 5), max_new_tokens=3, stop_tokens=())
    assert out.tokens.shape == (1, 3)
    with pytest.warns(UserWarning, match="max_position_embeddings"):
      engine.forward(np.full((1, limit + 1), 5))
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      engine.forward(np.full((1, limit), 5))  # exactly fits: silent


# -- strategies -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layerwise_env(tmp_path_factory):
  model = hetflow.synthetic_model("llama-tiny")
  with Engine(model) as reference:
    tokens = reference.generate(PROMPT, max_new_tokens=6, stop_tokens=()).tokens
  return model, tokens, str(tmp_path_factory.mktemp("lw"))


class _Interrupted:
  """A loader future whose wait is hit by Ctrl-C (the KeyboardInterrupt arrives in the
  main thread while it waits; the load itself goes on)."""

  def __init__(self, future):
    self.future = future

  def result(self, timeout=None):
    raise KeyboardInterrupt


def test_ctrl_c_in_a_layerwise_decode_is_an_interrupt(layerwise_env):
  model, tokens, directory = layerwise_env
  with Engine(model, "layerwise", options=dict(store_dir=os.path.join(directory, "store"),
                                               prefetch_depth=1)) as engine:
    engine.generate(PROMPT, max_new_tokens=2, stop_tokens=())
    strategy = engine.strategy
    strategy._pending = type(strategy._pending)(
        (step, layer, _Interrupted(f)) for step, layer, f in strategy._pending)
    with pytest.raises(KeyboardInterrupt):
      engine.generate(PROMPT, max_new_tokens=6, stop_tokens=())
    strategy._pending = type(strategy._pending)(
        (step, layer, getattr(f, "future", f)) for step, layer, f in strategy._pending)
    # The same engine runs again, exactly.
    np.testing.assert_array_equal(
        engine.generate(PROMPT, max_new_tokens=6, stop_tokens=()).tokens, tokens)


def test_untraced_layerwise_timeline_is_bounded(layerwise_env, monkeypatch):
  model, tokens, _ = layerwise_env
  layers = model.config.num_layers
  with Engine(model, "layerwise", options=dict(offload_tier="host"), trace=True) as traced:
    out = traced.generate(PROMPT, max_new_tokens=6, stop_tokens=())
    kinds = [e.kind for e in traced.timeline.events]
  # Traced: every streamed layer of every pass (prefill + 5 decode steps) has a
  # transfer and a wait, and every layer a compute interval.
  passes = out.stats["new_tokens"]
  assert kinds.count("compute") == layers * passes
  assert kinds.count("wait") == layers * passes
  monkeypatch.setattr(hetflow.engine, "UNTRACED_EVENTS", 20)
  with Engine(model, "layerwise", options=dict(offload_tier="host")) as engine:
    engine.generate(PROMPT, max_new_tokens=6, stop_tokens=())
    assert len(engine.timeline.events) == 20
    last = engine.timeline.events[-1]
    engine.generate(PROMPT, max_new_tokens=30, stop_tokens=())
    assert len(engine.timeline.events) == 20  # a ring: the newest 20, never more
    assert last not in engine.timeline.events
    assert "compute" not in {e.kind for e in engine.timeline.events}


def test_resident_minimum_budget_runs():
  model = hetflow.synthetic_model("llama-tiny")
  resident = get_strategy("resident")
  with pytest.raises(BudgetExceeded) as e:
    resident().plan(model, Budget(device=1))
  minimum = e.value.minimum
  weights = sum(model.group_nbytes(g) for g in model.group_names())
  assert minimum > weights and "KV cache" in str(e.value)
  with Engine(model, "resident", budget=Budget(device=minimum)) as engine:
    full = model.config.max_position_embeddings
    out = engine.generate(np.full((1, full - 8), 5), max_new_tokens=8, stop_tokens=())
    assert out.tokens.shape == (1, 8)
  # Without the reserve the stated minimum is the weights alone, and a run fails there.
  assert resident(dict(kv_reserve_tokens=0)).plan(model, Budget(device=weights))
  with Engine(model, "resident", budget=Budget(device=weights),
              options=dict(kv_reserve_tokens=0)) as engine:
    with pytest.raises(BudgetExceeded, match="kv_cache"):
      engine.generate(PROMPT, max_new_tokens=2)
    assert engine.ledger.used("device") == weights


def test_neuron_cluster_read_error_names_layer_file_and_store(tmp_path):
  model = hetflow.synthetic_model("llama-tiny-sparse", sparsity=0.9, hotness="zipf:1.1", seed=0)
  store = str(tmp_path / "store")
  with Engine(model, "neuron_cluster",
              options=dict(store_dir=store, cache_bytes=0, calibration_tokens=64)) as engine:
    engine.generate(PROMPT, max_new_tokens=2)
    victim = engine.strategy.store.file(1)
    with open(victim, "rb") as f:
      original = f.read()
    os.truncate(victim, 0)
    with pytest.raises(ReadError) as e:
      engine.generate(PROMPT, max_new_tokens=2)
    message = str(e.value)
    assert "layer 1" in message and victim in message and store in message
    with open(victim, "wb") as f:
      f.write(original)
    assert engine.generate(PROMPT, max_new_tokens=2).tokens.shape == (1, 2)
