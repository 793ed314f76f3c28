"""Architecture-neutral description of a decoder-only language model.

`ModelConfig` is what every other part of hetflow reads: the Flax modules build
from it, the checkpoint loader fills it from an HF `config.json`, strategies
size their plans from it. It holds shapes and numerics only, never weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Architecture = Literal["llama", "opt", "mixtral"]
Activation = Literal["silu", "relu", "gelu", "gelu_new", "drelu"]

SUPPORTED_ACTIVATIONS = ("silu", "relu", "gelu", "gelu_new", "drelu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder-only transformer.

  Attributes:
    arch: model family; picks the Flax modules and the HF name table.
    vocab_size: V, rows of the embedding table.
    hidden_size: D, width of the residual stream.
    intermediate_size: F, FFN width (per expert for Mixtral).
    num_layers: L, number of decoder blocks.
    num_heads: H, attention heads of the queries.
    num_kv_heads: G, key/value heads (G < H is GQA, G = 1 is MQA).
    head_dim: K, width of one head.
    max_position_embeddings: longest sequence the positions support.
    hidden_act: FFN activation. "drelu" is ReLU on both gate and up
      (TurboSparse, Bamboo); for OPT the single FFN activation.
    norm_eps: epsilon of RMSNorm / LayerNorm.
    rope_theta: RoPE base frequency (Llama family, Mixtral).
    rope_scaling: None, or a dict with "rope_type" in {"linear", "llama3"}
      and that type's parameters, as in HF configs.
    sliding_window: Mistral's attention window in tokens, or None.
    tie_word_embeddings: the LM head reuses the embedding matrix.
    attention_bias: q/k/v/o projections carry biases.
    mlp_bias: FFN projections carry biases.
    do_layer_norm_before: OPT only: pre-LN (True) or post-LN (False, OPT-350m).
    word_embed_proj_dim: OPT only: embedding width when it differs from D
      (project_in / project_out), else equal to hidden_size.
    final_layer_norm: whether a norm precedes the LM head.
    num_experts: Mixtral: experts per layer (0 for dense models).
    experts_per_token: Mixtral: experts each token is routed to (top-k).
    bos_token_id, eos_token_id, pad_token_id: special token ids, if known.
    name: a label for tables and logs.
  """

  arch: Architecture
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  hidden_act: Activation = "silu"
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  sliding_window: int | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  do_layer_norm_before: bool = True
  word_embed_proj_dim: int | None = None
  final_layer_norm: bool = True
  num_experts: int = 0
  experts_per_token: int = 0
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  name: str = "model"

  def __post_init__(self):
    if self.hidden_act not in SUPPORTED_ACTIVATIONS:
      raise ValueError(
          f"hidden_act={self.hidden_act!r} is not supported; expected one of"
          f" {SUPPORTED_ACTIVATIONS}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of"
          f" num_kv_heads={self.num_kv_heads}.")
    if self.arch == "mixtral" and not (
        0 < self.experts_per_token <= self.num_experts):
      raise ValueError(
          f"Mixtral needs 0 < experts_per_token ({self.experts_per_token})"
          f" <= num_experts ({self.num_experts}).")
    if self.rope_scaling is not None:
      kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
      if kind not in ("linear", "llama3", "default"):
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; expected 'linear' or"
            " 'llama3'.")
    # Keep the object hashable: the Flax modules carry it as a field.
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling",
                         tuple(sorted(self.rope_scaling.items())))

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def embed_dim(self) -> int:
    """Width of the token embedding (OPT's word_embed_proj_dim, else D)."""
    return self.word_embed_proj_dim or self.hidden_size

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def replace(self, **changes) -> "ModelConfig":
    if isinstance(changes.get("rope_scaling"), tuple):
      changes["rope_scaling"] = dict(changes["rope_scaling"])
    fields = dataclasses.asdict(self)
    if isinstance(fields["rope_scaling"], tuple):
      fields["rope_scaling"] = dict(fields["rope_scaling"])
    fields.update(changes)
    return ModelConfig(**fields)
