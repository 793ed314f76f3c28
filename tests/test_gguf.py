"""GGUF files as a checkpoint source: llama-family F32, F16, Q8_0, Q4_0 and Q4_1.

The files are written here with the gguf package's writer and quantizers; the
model read from one must match the same weights loaded otherwise, token for
token (and quantized kernels bit for bit: no re-quantizing where types match).
"""


import jax.numpy as jnp
import numpy as np
import pytest

import hetflow
from hetflow.checkpoints import CheckpointError
from hetflow.checkpoints.gguf import save_gguf
from hetflow.engine import Engine
from hetflow.models.formats import WeightFormat
from strategies.layerwise import LayerwiseOptions

gguf = pytest.importorskip("gguf")

PROMPT = [[5, 6, 7, 8, 9, 10]]
NEW = 5


# Stores written here go to a cache of this module's (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture(scope="module")
def synthetic():
  return hetflow.synthetic_model("llama-tiny")


def _run(model, strategy="resident", options=None):
  with Engine(model, strategy, options=options) as engine:
    return (engine.generate(PROMPT, max_new_tokens=NEW, stop_tokens=()).tokens,
            engine.forward(PROMPT))


@pytest.mark.parametrize("qtype,spec", [("Q8_0", "int8-g32"), ("Q4_0", "int4"),
                                        ("Q4_1", "int4-asym")])
def test_quantizers_are_gguf_bit_for_bit(qtype, spec):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((96, 40), dtype=np.float32)  # [in, out]
  w[:32, 0] = 0  # an all-zero block
  ours = WeightFormat.parse(spec).quantize(w)  # group-major: [G, out, block]
  theirs = gguf.quants.quantize(np.ascontiguousarray(w.T), getattr(gguf.GGMLQuantizationType,
                                                                  qtype))
  blocks = theirs.reshape(40, 3, -1).transpose(1, 0, 2)  # [G, out, bytes]
  np.testing.assert_array_equal(ours["scale"].view(np.uint8).reshape(3, 40, 2), blocks[..., :2])
  start = 4 if "min" in ours else 2
  if "min" in ours:
    np.testing.assert_array_equal(ours["min"].view(np.uint8).reshape(3, 40, 2), blocks[..., 2:4])
  np.testing.assert_array_equal(ours["q"].view(np.uint8), blocks[..., start:])


@pytest.mark.parametrize("file_type,spec", [("F32", "float32"), ("Q8_0", "int8-g32"),
                                            ("Q4_0", "int4"), ("Q4_1", "int4-asym")])
def test_gguf_matches_the_same_weights(tmp_path, synthetic, file_type, spec):
  path = save_gguf(synthetic, str(tmp_path / f"m-{file_type}.gguf"), file_type)
  loaded = hetflow.load_model(path)
  assert loaded.weights == spec and loaded.config == synthetic.config.replace(
      name=loaded.config.name)
  same = hetflow.synthetic_model("llama-tiny", weights=spec)
  for name in ("layers/1/attn/q", "layers/1/attn/k", "layers/2/mlp/down", "head/lm_head",
               "embed/tokens", "head/norm"):
    got, want = loaded.param(name), same.param(name)
    if isinstance(want, dict):
      assert got.keys() == want.keys()
      for leaf in want:  # taken from the file as stored, not re-quantized
        np.testing.assert_array_equal(got[leaf], want[leaf])
    else:
      np.testing.assert_array_equal(got, want)
  tokens, logits = _run(same)
  got_tokens, got_logits = _run(loaded)
  np.testing.assert_array_equal(got_tokens, tokens)
  np.testing.assert_allclose(got_logits, logits, atol=1e-5, rtol=0)
  # And through layerwise from disk, the format's store of the GGUF model.
  got_tokens, _ = _run(loaded, "layerwise", LayerwiseOptions(offload_tier="disk"))
  np.testing.assert_array_equal(got_tokens, tokens)


def test_f16_file_equals_the_f16_checkpoint(tmp_path, synthetic):
  path = save_gguf(synthetic, str(tmp_path / "m-f16.gguf"), "F16")
  loaded = hetflow.load_model(path)
  assert loaded.weights == "float32"  # widened exactly
  hf = hetflow.load_model(hetflow.save_hf(synthetic, str(tmp_path / "hf16"),
                                          dtype=jnp.float16))
  # Embeddings and norms are F32 in the file; kernels F16 in both.
  np.testing.assert_array_equal(loaded.param("layers/0/attn/q"), hf.param("layers/0/attn/q"))
  np.testing.assert_array_equal(loaded.param("layers/2/mlp/up"), hf.param("layers/2/mlp/up"))


def test_other_format_requantizes_from_the_values(tmp_path, synthetic):
  path = save_gguf(synthetic, str(tmp_path / "m-q8.gguf"), "Q8_0")
  dense = hetflow.load_model(path, weights="float32")
  stored = hetflow.synthetic_model("llama-tiny", weights="int8-g32").param("layers/0/attn/k")
  from hetflow.models import formats
  np.testing.assert_array_equal(dense.param("layers/0/attn/k"), np.asarray(
      formats.dequantize(stored)))
  int4 = hetflow.load_model(path, weights="int4")
  kernel = int4.param("layers/0/attn/k")
  assert kernel["q"].dtype == np.uint8 and kernel["q"].shape == (2, 32, 16)  # [G, out, 16]
  tokens, _ = _run(int4)
  layerwise, _ = _run(int4, "layerwise", LayerwiseOptions(offload_tier="host"))
  np.testing.assert_array_equal(layerwise, tokens)


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / "broken.gguf"
  path.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(CheckpointError, match="broken.gguf"):
    hetflow.load_model(str(path))


def test_other_architecture(tmp_path):
  path = str(tmp_path / "gpt2.gguf")
  writer = gguf.GGUFWriter(path, "gpt2")
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(CheckpointError, match="general.architecture='gpt2'"):
    hetflow.load_model(path)


def test_save_gguf_refuses_existing(tmp_path, synthetic):
  path = tmp_path / "exists.gguf"
  path.write_bytes(b"mine")
  with pytest.raises(FileExistsError):
    save_gguf(synthetic, str(path), "F32")
  assert path.read_bytes() == b"mine"


def _assert_llama_cpp_agrees(llama_cpp, path: str, tol: float):
  """hetflow (resident) and llama.cpp give the same argmax at every position of a fixed prompt,
  and logits within `tol` of llama.cpp's largest."""
  ids = [1, 5, 9, 33, 7, 2, 100, 4, 17, 300]
  with Engine(hetflow.load_model(path), "resident") as engine:
    ours = engine.forward([ids])[0]
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=2, logits_all=True, verbose=False)
  llm.eval(ids)
  theirs = np.array(llm.scores[:len(ids)])
  np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
  assert np.abs(ours - theirs).max() <= tol * np.abs(theirs).max()


@pytest.mark.parametrize("file_type,tol", [("F32", 5e-3), ("Q8_0", 5e-2), ("Q4_0", 5e-2)])
def test_llama_cpp_reads_the_same_model(tmp_path, synthetic, file_type, tol):
  """llama.cpp (llama-cpp-python, the `peers` extra) on the same file: same next tokens.

  Its quantized matmuls also quantize the activations (to Q8), hence the looser tolerance.
  """
  llama_cpp = pytest.importorskip("llama_cpp")
  path = save_gguf(synthetic, str(tmp_path / f"m-{file_type}.gguf"), file_type)
  _assert_llama_cpp_agrees(llama_cpp, path, tol)


@pytest.fixture(scope="module")
def mixtral():
  return hetflow.synthetic_model("mixtral-tiny")


@pytest.mark.parametrize("file_type,spec", [("F32", "float32"), ("Q8_0", "int8-g32"),
                                            ("Q4_0", "int4")])
def test_mixtral_gguf_round_trips(tmp_path, mixtral, file_type, spec):
  """Mixtral as llama.cpp names it (ffn_{gate,up,down}_exps, ffn_gate_inp): the same
  weights, experts taken from the file as stored, the same tokens."""
  path = save_gguf(mixtral, str(tmp_path / f"moe-{file_type}.gguf"), file_type)
  names = {t.name: t for t in gguf.GGUFReader(path).tensors}
  assert {"blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight",
          "blk.0.ffn_down_exps.weight", "blk.0.ffn_gate_inp.weight"} <= names.keys()
  assert names["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
  loaded = hetflow.load_model(path)
  assert loaded.weights == spec and loaded.config == mixtral.config.replace(
      name=loaded.config.name)
  same = hetflow.synthetic_model("mixtral-tiny", weights=spec)
  for name in ("layers/1/mlp/gate", "layers/1/mlp/down", "layers/1/mlp/router",
               "layers/0/attn/k"):
    got, want = loaded.param(name), same.param(name)
    if isinstance(want, dict):
      assert got.keys() == want.keys()
      for leaf in want:
        np.testing.assert_array_equal(got[leaf], want[leaf])
    else:
      np.testing.assert_array_equal(got, want)
  tokens, logits = _run(same)
  got_tokens, got_logits = _run(loaded)
  np.testing.assert_array_equal(got_tokens, tokens)
  np.testing.assert_allclose(got_logits, logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("file_type,tol", [("F32", 5e-3), ("Q4_0", 5e-2)])
def test_llama_cpp_reads_the_same_mixtral(tmp_path, mixtral, file_type, tol):
  """llama.cpp loads save_gguf's Mixtral file and computes the same next tokens."""
  llama_cpp = pytest.importorskip("llama_cpp")
  path = save_gguf(mixtral, str(tmp_path / f"moe-{file_type}.gguf"), file_type)
  _assert_llama_cpp_agrees(llama_cpp, path, tol)


@pytest.mark.parametrize("file_type,spec", [("Q8_0", "int8-g32"), ("Q4_0", "int4"),
                                            ("Q4_1", "int4-asym"), ("BF16", "bfloat16")])
def test_save_gguf_writes_a_models_own_blocks(tmp_path, synthetic, file_type, spec):
  """A model already in the file type's format is written as stored: the same bytes as
  quantizing its float32 values, and a GGUF file written back from itself is unchanged."""
  from_float = save_gguf(synthetic, str(tmp_path / "a.gguf"), file_type)
  quantized = hetflow.synthetic_model("llama-tiny", weights=spec)
  from_stored = save_gguf(quantized, str(tmp_path / "b.gguf"), file_type)
  again = save_gguf(hetflow.load_model(from_stored), str(tmp_path / "c.gguf"), file_type)
  tensors = [{t.name: (t.tensor_type, np.asarray(t.data).tobytes())
              for t in gguf.GGUFReader(p).tensors} for p in (from_float, from_stored, again)]
  assert tensors[0]["blk.0.attn_q.weight"][0] == getattr(gguf.GGMLQuantizationType, file_type)
  assert tensors[0] == tensors[1] == tensors[2]
