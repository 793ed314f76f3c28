"""Weight formats: their kernels, their bytes, and "same weights, same tokens".

Every strategy that takes a format must give resident's greedy tokens for that
format (and its logits within 1e-5); quality against float32 is computed and
must be sane (it is reported in the notes, not asserted as a target).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import hetflow
from hetflow.bench import quality
from hetflow.config import build_model, model_section
from hetflow.engine import Engine
from hetflow.memory.store import (
    StoreMismatchError,
    default_store_dir,
    model_fingerprint,
    open_store,
)
from hetflow.models import formats
from hetflow.models.formats import FormatError, WeightFormat
from strategies.layerwise import LayerwiseOptions

FORMATS = ("bfloat16", "int8", "int8-g32", "int4", "int4-g64", "int4-asym")
PROMPT = [[5, 6, 7, 8, 9, 10]]
NEW = 6


# Stores written here go to a cache of this module's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.mark.parametrize("spec,name,bits", [
    (None, "float32", 32), ("bfloat16", "bfloat16", 16), ("int8", "int8", 8),
    ("INT8-G32", "int8-g32", 8.5), ("int4", "int4", 4.5), ("int4-g32", "int4", 4.5),
    ("int4-g64", "int4-g64", 4.25), ("int4-asym", "int4-asym", 5.0),
    ("int4-g64-asym", "int4-g64-asym", 4.5)])
def test_format_names(spec, name, bits):
  fmt = WeightFormat.parse(spec)
  assert fmt.name == name and fmt.bits_per_weight == bits
  assert WeightFormat.parse(fmt.name) == fmt


@pytest.mark.parametrize("spec", ["int3", "int4-g16", "int8-asym", "bfloat16-g32", "fp8"])
def test_bad_format_names(spec):
  with pytest.raises(FormatError, match="weight format|int4 needs|int8 is|takes no"):
    WeightFormat.parse(spec)


@pytest.mark.parametrize("spec", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 8])  # matrix-vector (one row at a time), prefill
def test_matmul_equals_dequantized_kernel(spec, rows):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((128, 96), dtype=np.float32) / np.sqrt(128)
  kernel = WeightFormat.parse(spec).quantize(w)
  x = rng.standard_normal((rows, 128), dtype=np.float32)
  dense = np.asarray(formats.dequantize(jax.device_put(kernel)))
  got = np.asarray(jax.jit(formats.matmul)(jnp.asarray(x), jax.device_put(kernel)))
  np.testing.assert_allclose(got, x @ dense, rtol=1e-5, atol=1e-5)
  # The dequantized kernel is close to the original: each format's error bound.
  tol = {"bfloat16": 2 ** -8, "int8": 1 / 127, "int8-g32": 1 / 127}.get(spec, 1 / 7)
  assert np.max(np.abs(dense - w)) <= tol * np.max(np.abs(w)) * 1.01


def test_int4_rounds_like_gguf_q4_0():
  """A block's values land on the 16 levels (nibble - 8) * scale, the peak exactly at -8."""
  w = np.linspace(-1, 0.5, 64, dtype=np.float32).reshape(64, 1)  # [in, out=1]
  kernel = WeightFormat.parse("int4").quantize(w)
  assert kernel["q"].shape == (2, 1, 16) and kernel["scale"].shape == (2, 1)  # group-major
  dense = np.asarray(formats.dequantize(kernel))[:, 0]
  assert dense[0] == np.float32(np.float16(1 / 8)) * -8  # the peak |value| is exact


def test_model_shapes_and_bytes():
  f32 = hetflow.synthetic_model("llama-tiny")
  for spec in FORMATS:
    model = hetflow.synthetic_model("llama-tiny", weights=spec)
    fmt = model.format
    assert "layers/0/mlp/up/q" in model.shapes and "layers/0/mlp/up" not in model.shapes
    assert model.shapes["layers/0/mlp/norm"] == f32.shapes["layers/0/mlp/norm"]
    assert model.shapes["embed/tokens"] == f32.shapes["embed/tokens"]  # embeddings stay wide
    kernels = sum(s.size for n, s in f32.shapes.items() if fmt.applies(n))
    stored = sum(s.size * s.dtype.itemsize for n, s in model.shapes.items()
                 if fmt.applies(n.rsplit("/", 1)[0]))
    per_channel = 4 * sum(s.shape[-1] for n, s in f32.shapes.items() if fmt.applies(n))
    assert stored == pytest.approx(kernels * fmt.bits_per_weight / 8,
                                   abs=per_channel if spec == "int8" else 0)
    tensors = model.group_tensors("layers/1/mlp")
    assert set(tensors["up"]) == set(fmt.leaf_shapes((64, 192)))
    assert formats.nbytes(tensors) == model.group_nbytes("layers/1/mlp")
    assert model.nbytes < f32.nbytes


def test_bfloat16_is_never_widened(tmp_path):
  """A bf16 checkpoint's kernels are asked for in bfloat16 and kept bit for bit."""
  path = hetflow.save_hf(hetflow.synthetic_model("llama-tiny"), str(tmp_path / "bf16"),
                         dtype=jnp.bfloat16)
  model = hetflow.load_model(path, weights="bfloat16")
  asked = []
  get = model.source.get
  model.source.get = lambda name, dtype: asked.append((name, np.dtype(dtype))) or get(name, dtype)
  up = model.param("layers/0/mlp/up")
  assert asked == [("layers/0/mlp/up", np.dtype(ml_dtypes.bfloat16))]
  assert up["q"].dtype == ml_dtypes.bfloat16
  from safetensors.numpy import load_file
  stored = load_file(os.path.join(path, "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
  np.testing.assert_array_equal(up["q"].view(np.uint16), stored.view(np.uint16))


def _reference(model):
  with Engine(model, "resident") as engine:
    return (engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens,
            engine.forward(PROMPT))


def _check(model, tokens, logits, options):
  with Engine(model, "layerwise", options=options) as engine:
    out = engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=())
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(engine.forward(PROMPT), logits, atol=1e-5, rtol=0)
    return engine, out


@pytest.mark.parametrize("spec", FORMATS)
def test_layerwise_gives_residents_tokens(spec):
  model = hetflow.synthetic_model("llama-tiny", weights=spec)
  tokens, logits = _reference(model)
  with Engine(model, "resident") as engine:
    note = engine.placement.notes[0]
  assert f"weights: {model.weights} (" in note and "embeddings, norms" in note
  for tier in ("host", "disk"):
    engine, out = _check(model, tokens, logits,
                         LayerwiseOptions(offload_tier=tier, resident_layers=1))
    if tier == "disk":
      counted = out.stats["strategy"].decode.disk_bytes
      streamed = sum(model.group_nbytes(f"layers/{i}/{h}") for i in (0, 2)
                     for h in ("attn", "mlp"))
      assert counted == streamed * (NEW - 1)  # the format's bytes, not float32's


@pytest.mark.parametrize("name,spec", [("opt-tiny", "int8-g32"), ("opt-tiny", "int4"),
                                       ("mixtral-tiny", "int8"), ("mixtral-tiny", "int4-asym"),
                                       ("llama-tiny-drelu", "bfloat16")])
def test_other_families(name, spec):
  model = hetflow.synthetic_model(name, weights=spec)
  tokens, logits = _reference(model)
  _check(model, tokens, logits, LayerwiseOptions(offload_tier="disk", prefetch_depth=2))


def test_store_records_its_format(tmp_path):
  int8 = hetflow.synthetic_model("llama-tiny", weights="int8")
  int4 = hetflow.synthetic_model("llama-tiny", weights="int4")
  assert default_store_dir(int8) != default_store_dir(int4)
  path = str(tmp_path / "store")
  store = open_store(int8, path, progress=False, lock=False)
  assert store.metadata["fingerprint_record"]["tensors"]["layers/0/mlp/up/scale"] == [
      [192, 1], "float32"]
  assert "up/scale" in store.tensors("layers/0/mlp")
  store.close()
  with pytest.raises(StoreMismatchError, match="Pass another store_dir"):  # another format
    open_store(int4, path, progress=False, lock=False)
  assert "layers/0/mlp/up/min" in model_fingerprint(
      hetflow.synthetic_model("llama-tiny", weights="int4-asym"))["tensors"]


def test_fingerprint_never_quantizes_a_kernel(monkeypatch):
  # A store's identity samples parameters as the source holds them: quantizing every
  # kernel of a 7B model to hash its scales took minutes per store build.
  model = hetflow.synthetic_model("llama-tiny", weights="int8")

  def refuse(self, name):
    raise AssertionError(f"model_fingerprint quantized {name}")

  monkeypatch.setattr(type(model), "param", refuse)
  samples = model_fingerprint(model)["samples"]
  assert samples and all(name in model.logical_shapes for name in samples)
  assert len(samples) == len(model.group_names())


def test_config_model_weights():
  section = model_section()
  assert section.weights == "float32"
  section.weights = "int4"
  assert build_model(section).weights == "int4"
  section.weights = "int5"
  with pytest.raises(FormatError, match="model.weights: weights='int5' is not a weight format"):
    build_model(section)


def _check_quality(results, specs):
  by = {q.weights: q for q in results}
  assert set(by) == set(specs)
  assert by["float32"].top1 == 1.0 and by["float32"].mean_kl == pytest.approx(0, abs=1e-9)
  for q in results:
    assert 0.0 <= q.top1 <= 1.0 and 0.0 <= q.mean_kl <= q.max_kl and np.isfinite(q.max_kl)
    assert q.positions == 8 * 32
  # More bits, closer to float32.
  assert by["bfloat16"].mean_kl < by["int8"].mean_kl < by["int4"].mean_kl
  assert by["int8"].top1 >= 0.9 and by["int4"].top1 >= 0.5
  return by


QUALITY_FORMATS = ("float32", "bfloat16", "int8", "int8-g32", "int4", "int4-asym")


def test_quality_synthetic():
  _check_quality(quality.measure(hetflow.synthetic_model("llama-tiny"), QUALITY_FORMATS),
                 QUALITY_FORMATS)


def test_quality_hf_initialised(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
  model = hetflow.load_model(str(tmp_path / "hf"))
  _check_quality(quality.measure(model, QUALITY_FORMATS), QUALITY_FORMATS)


def test_replace_keeps_the_source():
  model = hetflow.synthetic_model("llama-tiny")
  int8 = dataclasses.replace(model, weights="int8")
  assert int8.source is model.source and int8.weights == "int8" and model.weights == "float32"


# Every strategy takes every format; each one's parity tests give the same tokens as
# resident of the same format (tests/test_tensor_split.py, test_neuron_formats.py,
# test_moe.py, test_moe_sparse.py). Here: each built-in plans a quantized model of its kind.
FORMAT_MODELS = {"resident": "llama-tiny", "layerwise": "llama-tiny",
                 "tensor_split": "llama-tiny", "neuron_cluster": "llama-tiny-sparse",
                 "moe_offload": "mixtral-tiny", "moe_sparse": "mixtral-tiny-8e-sparse"}


@pytest.mark.parametrize("weights", ["bfloat16", "int8", "int4"])
def test_no_strategy_refuses_a_format(weights):
  from importlib import metadata

  from hetflow.strategy import get_strategy
  builtin = {e.name for e in metadata.entry_points(group="hetflow.strategies")
             if e.value.startswith("strategies.")}
  assert builtin <= set(FORMAT_MODELS)
  for strategy, name in FORMAT_MODELS.items():
    model = hetflow.synthetic_model(name, weights=weights)
    placement = get_strategy(strategy)().plan(model, hetflow.Budget())
    # Planned at the format's stored bytes (every strategy keeps attention whole here).
    attn = model.group_nbytes("layers/0/attn")
    assert placement.groups["layers/0/attn"].nbytes == attn, (strategy, placement)
    assert attn < hetflow.synthetic_model(name).group_nbytes("layers/0/attn")


def test_a_format_the_shapes_do_not_allow_fails_at_once():
  with pytest.raises(FormatError, match="llama-tiny: layers/0/attn/[qkv]: a kernel of 64 inputs"
                                        " cannot be cut into groups of 128"):
    hetflow.synthetic_model("llama-tiny", weights="int8-g128")
