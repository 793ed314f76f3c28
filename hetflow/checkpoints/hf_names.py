"""One table per architecture: hetflow parameter names <-> HF checkpoint names.

Each entry maps a hetflow name (with `{i}` for the layer and, for Mixtral
experts, `{e}` for the expert) to the HF tensor name and a transform. HF
stores Linear weights [out, in]; hetflow stores kernels [in, out], so those
are transposed ("T"). Mixtral's per-expert tensors are stacked on axis 0.
"""

from __future__ import annotations

from typing import Any

from hetflow.models.config import ModelConfig

# (hetflow leaf under its group, HF name, transpose?)
_LLAMA_ATTN = [
    ("norm", "model.layers.{i}.input_layernorm.weight", False),
    ("q", "model.layers.{i}.self_attn.q_proj.weight", True),
    ("k", "model.layers.{i}.self_attn.k_proj.weight", True),
    ("v", "model.layers.{i}.self_attn.v_proj.weight", True),
    ("o", "model.layers.{i}.self_attn.o_proj.weight", True),
    ("q_bias", "model.layers.{i}.self_attn.q_proj.bias", False),
    ("k_bias", "model.layers.{i}.self_attn.k_proj.bias", False),
    ("v_bias", "model.layers.{i}.self_attn.v_proj.bias", False),
    ("o_bias", "model.layers.{i}.self_attn.o_proj.bias", False),
]
_LLAMA_MLP = [
    ("norm", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("gate", "model.layers.{i}.mlp.gate_proj.weight", True),
    ("up", "model.layers.{i}.mlp.up_proj.weight", True),
    ("down", "model.layers.{i}.mlp.down_proj.weight", True),
    ("gate_bias", "model.layers.{i}.mlp.gate_proj.bias", False),
    ("up_bias", "model.layers.{i}.mlp.up_proj.bias", False),
    ("down_bias", "model.layers.{i}.mlp.down_proj.bias", False),
]
_MIXTRAL_MLP = [
    ("norm", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("router", "model.layers.{i}.block_sparse_moe.gate.weight", True),
    ("gate", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", True),
    ("up", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", True),
    ("down", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", True),
]
_LLAMA_GLOBAL = [
    ("embed/tokens", "model.embed_tokens.weight", False),
    ("head/norm", "model.norm.weight", False),
    ("head/lm_head", "lm_head.weight", True),
]
_OPT_ATTN = [
    ("norm", "model.decoder.layers.{i}.self_attn_layer_norm.weight", False),
    ("norm_bias", "model.decoder.layers.{i}.self_attn_layer_norm.bias", False),
] + [(f"{p}{suffix}", f"model.decoder.layers.{{i}}.self_attn.{hf}_proj.{kind}", suffix == "")
     for p, hf in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out"))
     for suffix, kind in (("", "weight"), ("_bias", "bias"))]
_OPT_MLP = [
    ("norm", "model.decoder.layers.{i}.final_layer_norm.weight", False),
    ("norm_bias", "model.decoder.layers.{i}.final_layer_norm.bias", False),
    ("up", "model.decoder.layers.{i}.fc1.weight", True),
    ("up_bias", "model.decoder.layers.{i}.fc1.bias", False),
    ("down", "model.decoder.layers.{i}.fc2.weight", True),
    ("down_bias", "model.decoder.layers.{i}.fc2.bias", False),
]
_OPT_GLOBAL = [
    ("embed/tokens", "model.decoder.embed_tokens.weight", False),
    ("embed/positions", "model.decoder.embed_positions.weight", False),
    ("embed/project_in", "model.decoder.project_in.weight", True),
    ("head/norm", "model.decoder.final_layer_norm.weight", False),
    ("head/norm_bias", "model.decoder.final_layer_norm.bias", False),
    ("head/project_out", "model.decoder.project_out.weight", True),
    ("head/lm_head", "lm_head.weight", True),
]

_TABLES = {
    "llama": (_LLAMA_GLOBAL, _LLAMA_ATTN, _LLAMA_MLP),
    "mixtral": (_LLAMA_GLOBAL, _LLAMA_ATTN, _MIXTRAL_MLP),
    "opt": (_OPT_GLOBAL, _OPT_ATTN, _OPT_MLP),
}


def hf_names(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """Maps every possible hetflow name to (HF names to stack, transpose?).

  Entries for tensors a given config does not have (biases, project_in, ...)
  are harmless: callers look up only the names hetflow's modules define.
  """
  global_table, attn, mlp = _TABLES[config.arch]
  table = {name: ((hf,), t) for name, hf, t in global_table}
  for i in range(config.num_layers):
    for group, entries in (("attn", attn), ("mlp", mlp)):
      for leaf, hf, t in entries:
        if "{e}" in hf:
          names = tuple(hf.format(i=i, e=e) for e in range(config.num_experts))
        else:
          names = (hf.format(i=i),)
        table[f"layers/{i}/{group}/{leaf}"] = (names, t)
  return table


# HF config.json "architectures" / "model_type" -> hetflow arch.
_ARCH_BY_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "mixtral": "mixtral", "opt": "opt"}


# config.json fields hetflow reads, by the kind of value each must hold.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "ffn_dim", "num_key_value_heads", "head_dim",
                  "max_position_embeddings", "num_local_experts", "num_experts_per_tok",
                  "word_embed_proj_dim", "sliding_window")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "do_layer_norm_before",
          "_remove_final_layer_norm", "layer_norm_elementwise_affine")
_STRINGS = ("model_type", "hidden_act", "activation_function")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_DICTS = ("rope_scaling", "rope_parameters")


def _check_field_types(hf: dict[str, Any]) -> None:
  """A field of the wrong type is named here, not met later as a numpy error."""

  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  for field, kind, ok in (
      [(f, "a positive integer", lambda v: is_int(v) and v > 0) for f in _POSITIVE_INTS]
      + [(f, "a positive number", lambda v: (is_int(v) or isinstance(v, float)) and v > 0)
         for f in _POSITIVE_NUMBERS]
      + [(f, "true or false", lambda v: isinstance(v, bool)) for f in _BOOLS]
      + [(f, "a string", lambda v: isinstance(v, str)) for f in _STRINGS]
      # Some converted Llama configs say pad_token_id=-1: ids are not bounded here.
      + [(f, "an integer id (or a list of them)",
          lambda v: is_int(v) or (isinstance(v, list) and v and all(is_int(x) for x in v)))
         for f in _TOKEN_IDS]
      + [(f, "an object", lambda v: isinstance(v, dict)) for f in _DICTS]):
    value = hf.get(field)
    if value is not None and not ok(value):
      raise ValueError(f"config.json: {field}={value!r} ({type(value).__name__}); expected"
                       f" {kind}. Copy the checkpoint's own config.json, or fix the field.")


def config_from_hf(hf: dict[str, Any], name: str = "model") -> ModelConfig:
  """Builds a ModelConfig from an HF config.json dict; clear error otherwise."""
  if not isinstance(hf, dict):
    raise ValueError(f"config.json holds a JSON {type(hf).__name__}, not an object.")
  _check_field_types(hf)
  model_type = hf.get("model_type")
  if model_type not in _ARCH_BY_MODEL_TYPE:
    raise ValueError(
        f"config.json: model_type={model_type!r} is not supported; hetflow loads"
        f" {sorted(_ARCH_BY_MODEL_TYPE)}.")
  arch = _ARCH_BY_MODEL_TYPE[model_type]
  common = dict(
      arch=arch, name=name, vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
      pad_token_id=hf.get("pad_token_id"))
  if arch == "opt":
    act = hf.get("activation_function", "relu")
    _check_activation(act, "activation_function")
    return ModelConfig(
        **common, intermediate_size=hf["ffn_dim"],
        num_kv_heads=hf["num_attention_heads"],
        head_dim=hf["hidden_size"] // hf["num_attention_heads"],
        hidden_act=act, norm_eps=1e-5,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        do_layer_norm_before=hf.get("do_layer_norm_before", True),
        word_embed_proj_dim=hf.get("word_embed_proj_dim") or hf["hidden_size"],
        final_layer_norm=(hf.get("do_layer_norm_before", True)
                          and not hf.get("_remove_final_layer_norm", False)))
  if not hf.get("layer_norm_elementwise_affine", True):
    raise ValueError("config.json: layer_norm_elementwise_affine=False is not supported.")
  act = hf.get("hidden_act", "silu")
  _check_activation(act, "hidden_act")
  # transformers >= 5 writes "rope_parameters"; older files "rope_theta" and
  # "rope_scaling". Accept both.
  rope = dict(hf.get("rope_parameters") or {})
  theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
  if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
    scaling = None
  heads = hf["num_attention_heads"]
  return ModelConfig(
      **common, intermediate_size=hf["intermediate_size"],
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      hidden_act=act, norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
      rope_scaling=scaling, sliding_window=hf.get("sliding_window"),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
      attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
      num_experts=hf.get("num_local_experts", 0) if arch == "mixtral" else 0,
      experts_per_token=hf.get("num_experts_per_tok", 0) if arch == "mixtral" else 0)


def _check_activation(act: str, field: str):
  from hetflow.models.config import SUPPORTED_ACTIVATIONS
  if act not in SUPPORTED_ACTIVATIONS:
    raise ValueError(
        f"config.json: {field}={act!r} is not supported; expected one of"
        f" {SUPPORTED_ACTIVATIONS}.")


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The HF config.json of a hetflow config (for writing synthetic models)."""
  common = dict(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      max_position_embeddings=config.max_position_embeddings,
      bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
      pad_token_id=config.pad_token_id,
      tie_word_embeddings=config.tie_word_embeddings)
  if config.arch == "opt":
    return dict(common, model_type="opt", architectures=["OPTForCausalLM"],
                ffn_dim=config.intermediate_size,
                activation_function=config.hidden_act,
                do_layer_norm_before=config.do_layer_norm_before,
                word_embed_proj_dim=config.embed_dim, enable_bias=True,
                _remove_final_layer_norm=(config.do_layer_norm_before
                                          and not config.final_layer_norm))
  out = dict(common, model_type=config.arch,
             architectures=["MixtralForCausalLM" if config.arch == "mixtral"
                            else "LlamaForCausalLM"],
             intermediate_size=config.intermediate_size,
             num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
             hidden_act=config.hidden_act, rms_norm_eps=config.norm_eps,
             rope_theta=config.rope_theta, rope_scaling=config.rope_scaling_dict,
             attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
  if config.sliding_window is not None:
    out["sliding_window"] = config.sliding_window
  if config.arch == "mixtral":
    out.update(num_local_experts=config.num_experts,
               num_experts_per_tok=config.experts_per_token)
  return out
