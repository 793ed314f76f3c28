"""Loading HF checkpoint directories: round trips, sharding, and bad input."""

import json
import os

import numpy as np
import pytest

import hetflow
from hetflow.checkpoints import CheckpointError, save_hf
from hetflow.models import forward_reference

IDS = np.array([[3, 17, 42, 7, 99]])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return save_hf(hetflow.synthetic_model("llama-tiny"), str(tmp_path_factory.mktemp("c") / "m"))


@pytest.mark.parametrize("name", ["llama-tiny", "opt-tiny", "mixtral-tiny", "llama-tiny-drelu"])
def test_synthetic_round_trip_through_hf_files(tmp_path, name):
  model = hetflow.synthetic_model(name, seed=3)
  loaded = hetflow.load_model(save_hf(model, str(tmp_path / "m")))
  assert loaded.config.replace(name=name) == model.config
  np.testing.assert_array_equal(np.asarray(forward_reference(loaded, IDS)),
                                np.asarray(forward_reference(model, IDS)))


def test_synthetic_models_are_deterministic():
  a = hetflow.synthetic_model("opt-tiny", seed=1).tensor("layers/1/mlp/up")
  b = hetflow.synthetic_model("opt-tiny", seed=1).tensor("layers/1/mlp/up")
  c = hetflow.synthetic_model("opt-tiny", seed=2).tensor("layers/1/mlp/up")
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sharded_checkpoint_with_index(tmp_path):
  model = hetflow.synthetic_model("llama-tiny")
  directory = save_hf(model, str(tmp_path / "m"), max_shard_bytes=100_000)
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  assert len(files) > 2 and os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
  loaded = hetflow.load_model(directory)
  np.testing.assert_array_equal(np.asarray(forward_reference(loaded, IDS)),
                                np.asarray(forward_reference(model, IDS)))


def test_loading_is_lazy(tiny_dir):
  """load_model reads headers only; a tensor is read when asked for."""
  model = hetflow.load_model(tiny_dir)
  assert not hasattr(model.source, "_cache")
  assert model.tensor("layers/0/attn/q").shape == (64, 64)


def test_tokenizer_loaded_when_present(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  directory = save_hf(hetflow.synthetic_model("llama-tiny"), str(tmp_path / "m"))
  vocab = {f"w{i}": i for i in range(512)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(directory, "tokenizer.json"))
  model = hetflow.load_model(directory)
  out = hetflow.Engine(model).generate("w5 w6 w7", max_new_tokens=3, stop_tokens=())
  assert out.text is not None and len(out.text[0].split()) == 3


# -- bad input: one clear error naming the file or field ---------------------

def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    hetflow.load_model(str(tmp_path / "nope"))


def test_missing_config(tmp_path, tiny_dir):
  import shutil
  directory = shutil.copytree(tiny_dir, tmp_path / "m")
  os.remove(directory / "config.json")
  with pytest.raises(CheckpointError, match="config.json is missing"):
    hetflow.load_model(str(directory))


def test_no_safetensors(tmp_path, tiny_dir):
  import shutil
  directory = tmp_path / "m"
  directory.mkdir()
  shutil.copy(os.path.join(tiny_dir, "config.json"), directory)
  with pytest.raises(CheckpointError, match="no \\*.safetensors"):
    hetflow.load_model(str(directory))


def test_missing_shard(tmp_path):
  directory = save_hf(hetflow.synthetic_model("llama-tiny"), str(tmp_path / "m"),
                      max_shard_bytes=100_000)
  shard = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[1]
  os.remove(os.path.join(directory, shard))
  with pytest.raises(CheckpointError, match=f"lists shard.*{shard}"):
    hetflow.load_model(directory)


def test_truncated_shard(tmp_path, tiny_dir):
  import shutil
  directory = shutil.copytree(tiny_dir, tmp_path / "m")
  path = directory / "model.safetensors"
  size = path.stat().st_size
  with open(path, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(CheckpointError, match="truncated"):
    hetflow.load_model(str(directory))


def test_wrong_shape(tmp_path):
  from safetensors.numpy import load_file, save_file

  directory = save_hf(hetflow.synthetic_model("llama-tiny"), str(tmp_path / "m"))
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((10, 64), np.float32)
  save_file(tensors, path)
  with pytest.raises(CheckpointError,
                     match=r"model.layers.1.mlp.up_proj.weight .* shape \[10, 64\], expected \[192, 64\]"):
    hetflow.load_model(directory)


def test_missing_tensor(tmp_path):
  from safetensors.numpy import load_file, save_file

  directory = save_hf(hetflow.synthetic_model("opt-tiny"), str(tmp_path / "m"))
  path = os.path.join(directory, "model.safetensors")
  tensors = load_file(path)
  del tensors["model.decoder.layers.2.fc2.bias"]
  save_file(tensors, path)
  with pytest.raises(CheckpointError, match="model.decoder.layers.2.fc2.bias .* missing"):
    hetflow.load_model(directory)


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "gpt2", "model_type='gpt2' is not supported"),
    ("hidden_act", "tanh", "hidden_act='tanh' is not supported"),
    ("num_attention_heads", None, "num_attention_heads"),
])
def test_bad_config_fields(tmp_path, tiny_dir, field, value, message):
  import shutil
  directory = shutil.copytree(tiny_dir, tmp_path / "m")
  config = json.loads((directory / "config.json").read_text())
  if value is None:
    del config[field]
  else:
    config[field] = value
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=message):
    hetflow.load_model(str(directory))


def test_save_hf_leaves_nothing_on_failure(tmp_path):
  class Broken(hetflow.synthetic_model("llama-tiny").source.__class__):
    def get(self, name, dtype):
      if name.startswith("layers/2"):
        raise RuntimeError("disk full")
      return super().get(name, dtype)

  model = hetflow.synthetic_model("llama-tiny")
  model.source = Broken(model.config, 0)
  with pytest.raises(RuntimeError, match="disk full"):
    save_hf(model, str(tmp_path / "m"))
  assert os.listdir(tmp_path) == []


def test_unknown_synthetic_name():
  with pytest.raises(ValueError, match="unknown synthetic model 'llama-9t'"):
    hetflow.synthetic_model("llama-9t")
