"""The token loop: prefill, decode, KV cache, sampling, timing (docs/architecture.md).

The engine runs embed -> block 0..L-1 -> head with one jitted function per
half-block kind, asking the strategy for each layer's weights just in time.
It never waits inside the loop except where the strategy's `fetch` says a
tier must be ready; JAX's asynchronous dispatch lets the strategy's transfers
and reads run while earlier layers compute.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.memory import tiers
from hetflow.memory.budget import Budget, MemoryLedger
from hetflow.models.model import Model
from hetflow.strategy import Strategy, make_strategy
from hetflow.trace import Timeline


@dataclasses.dataclass
class GenerationOutput:
  """What `Engine.generate` returns.

  Attributes:
    tokens: [B, N] new token ids per prompt (pad_token_id after a stop token).
    stats: prefill_s (time to first token), decode_tokens_per_s, new_tokens,
      recompilations, per-tier bytes (peak) from the ledger, and under
      "strategy" the strategy's StrategyStats (cumulative over the engine's runs).
    text: decoded strings when the model has a tokenizer, else None.
  """

  tokens: np.ndarray
  stats: dict[str, Any]
  text: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How the next token is chosen.

  Attributes:
    temperature: 0 is greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set whose probability reaches top_p (1.0: all).
    seed: seed of the sampler, so sampled runs are reproducible.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0


def pad_batch(prompts: Any, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads a batch of prompts (lists of ids or a [B, T] array).

  Returns:
    ids [B, T] int32 and mask [B, T] bool (True on real tokens).
  """
  if isinstance(prompts, (np.ndarray, jax.Array)):
    ids = np.asarray(prompts, dtype=np.int32)
    if ids.ndim == 1:
      ids = ids[None]
    return ids, np.ones(ids.shape, bool)
  rows = [list(p) for p in prompts]
  if rows and not isinstance(rows[0], list):
    rows = [rows]
  if not rows or min(len(r) for r in rows) == 0:
    raise ValueError("every prompt needs at least one token.")
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = True
  return ids, mask


def sample(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
  """Next token per row from logits [B, V] (float32, on the host)."""
  if options.temperature <= 0:
    return np.argmax(logits, axis=-1).astype(np.int32)
  logits = logits / options.temperature
  if options.top_k:
    kth = np.sort(logits, axis=-1)[:, -options.top_k][:, None]
    logits = np.where(logits < kth, -np.inf, logits)
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  if options.top_p < 1.0:
    order = np.argsort(-probs, axis=-1)
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    # Keep a token if the mass before it is below top_p (the first always stays).
    keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < options.top_p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum(axis=-1, keepdims=True)
  return np.array([rng.choice(len(p), p=p) for p in probs], np.int32)


class Engine:
  """Runs a model under a strategy and a budget.

  Example:
    engine = hetflow.Engine(model, strategy="layerwise",
                            budget=hetflow.Budget(device="512MiB"))
    out = engine.generate([[1, 2, 3]], max_new_tokens=16)
  """

  def __init__(self, model: Model, strategy: str | Strategy = "resident",
               budget: Any = None, options: Any = None, profile: Any = None,
               trace: bool = False):
    """Plans and materialises `model` under `strategy` within `budget`.

    Args:
      model: from hetflow.load_model or hetflow.synthetic_model.
      strategy: a registered name ("resident", "layerwise", ...), an instance,
        or "auto": the planner's best plan for this budget (hetflow.planner,
        registered as a resolver by the `hetflow` package).
      budget: hetflow.Budget, a dict, or None (unlimited).
      options: the strategy's Options dataclass (or a dict of its fields).
      profile: a HardwareProfile for the strategy's planning, if it uses one.
      trace: record per-layer compute intervals (this blocks after every
        half-block, which removes overlap; for timelines, not for speed).
    """
    self.model = model
    self.budget = Budget.from_any(budget)
    self.ledger = MemoryLedger(self.budget)
    self.strategy, profile = make_strategy(strategy, options, model, self.budget, profile)
    self.timeline = Timeline()
    self.trace = trace
    self.strategy.timeline = self.timeline
    self.strategy.ledger = self.ledger
    self.placement = self.strategy.plan(model, self.budget, profile)
    try:
      self.strategy.materialize(self.placement, model, self.ledger)
    except BaseException:  # nothing placed may outlive a failed start
      self.close()
      raise
    self.functions = model.functions
    kv_tier = self.strategy.kv_cache_tier()
    self._kv_sharding = (tiers.host_sharding() if kv_tier == "host"
                         else tiers.device_sharding())
    self._kv_tier = kv_tier

  # -- one forward pass ------------------------------------------------------

  def _run(self, phase, ids, positions, caches, cache_index, kv_mask, last_only):
    fn, cfg = self.functions, self.model.config
    counters = self.strategy.counters.phase(phase)
    counters.passes += 1
    counters.tokens += ids.shape[1]
    self.strategy.begin(phase, ids.shape[1])
    globals_ = self.strategy.globals()
    x = fn.embed(globals_["embed"], ids, positions)
    for i in range(cfg.num_layers):
      t0 = time.perf_counter()
      attn = self.strategy.fetch(i, "attn")
      x, caches[i] = self.strategy.run_attention(i, attn, x, caches[i], cache_index, positions,
                                                 kv_mask, fn.attention)
      self.strategy.release(i, "attn")
      del attn  # released weights must not outlive the strategy's accounting
      mlp = self.strategy.fetch(i, "mlp")
      x = self.strategy.run_ffn(i, mlp, x, fn.ffn)
      self.strategy.release(i, "mlp")
      del mlp
      if self.trace:
        x.block_until_ready()
        self.timeline.add("compute", f"layer {i}", t0, time.perf_counter(), layer=i)
    if last_only:
      x = x[:, -1:]
    tokens = globals_["embed"]["tokens"] if cfg.tie_word_embeddings else None
    logits = fn.head(globals_.get("head", {}), tokens, x)
    self.strategy.end()
    return logits

  def _new_caches(self, batch: int, slots: int):
    cfg = self.model.config
    nbytes = self.model.kv_cache_nbytes(slots, batch, layers=1)
    allocations = []
    try:
      for _ in range(cfg.num_layers):
        allocations.append(self.ledger.allocate(self._kv_tier, nbytes, "kv_cache"))
    except BaseException:  # refused part-way: give back what was taken
      for a in allocations:
        self.ledger.release(a)
      raise
    if self._kv_tier == "host":
      # jnp.zeros cannot be made directly in a host memory kind on CPU (memory
      # kind mismatch); place host zeros there explicitly instead.
      shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
      zeros = np.zeros(shape, jnp.dtype(self.model.dtype))
      caches = [jax.device_put((zeros, zeros), self._kv_sharding)
                for _ in range(cfg.num_layers)]
    else:
      caches = [self.functions.new_cache(batch, slots, self._kv_sharding)
                for _ in range(cfg.num_layers)]
    return caches, allocations

  def forward(self, ids, attention_mask=None) -> np.ndarray:
    """Logits [B, T, V] (float32) for a full sequence; no generation."""
    ids, mask = pad_batch(ids, self._pad_id())
    if attention_mask is not None:
      mask = np.asarray(attention_mask, bool)
    b, t = ids.shape
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    caches, allocations = self._new_caches(b, t)
    try:
      logits = self._run("prefill", jnp.asarray(ids), jnp.asarray(positions), caches, 0,
                         jnp.asarray(mask), last_only=False)
      return np.asarray(logits)
    finally:
      for a in allocations:
        self.ledger.release(a)

  def _pad_id(self) -> int:
    cfg = self.model.config
    if cfg.pad_token_id is not None:
      return cfg.pad_token_id
    return cfg.stop_tokens[0] if cfg.stop_tokens else 0

  # -- generation ------------------------------------------------------------

  def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               stop_tokens: Sequence[int] | None = None,
               pad_token_id: int | None = None) -> GenerationOutput:
    """Generates up to `max_new_tokens` per prompt.

    Args:
      prompts: [B, T] ids, a list of id lists (left-padded here), or a string /
        list of strings when the model has a tokenizer.
      max_new_tokens: tokens to generate per prompt.
      temperature, top_k, top_p, seed: sampling (temperature 0 = greedy).
      stop_tokens: ids that end a row (default: the model's eos ids; pass ()
        to never stop early).
      pad_token_id: fills rows that have stopped (default: the model's pad).

    Returns:
      GenerationOutput with tokens [B, max_new_tokens] and stats.
    """
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    prompts = self._encode(prompts)
    pad = self._pad_id() if pad_token_id is None else pad_token_id
    stops = np.array(self.model.config.stop_tokens if stop_tokens is None else list(stop_tokens),
                     np.int32)
    options = SamplingOptions(temperature, top_k, top_p, seed)
    rng = np.random.default_rng(seed)
    ids, mask = pad_batch(prompts, pad)
    b, t = ids.shape
    slots = t + max_new_tokens
    limit = self.model.config.max_position_embeddings
    if self.model.config.arch == "opt" and slots > limit:
      raise ValueError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds the"
                       f" model's {limit} learned positions.")
    kv_mask = np.concatenate([mask, np.ones((b, max_new_tokens), bool)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    kv_mask_dev = jnp.asarray(kv_mask)
    compiles_before = _compilations()
    caches, allocations = self._new_caches(b, slots)
    try:
      start = time.perf_counter()
      logits = self._run("prefill", jnp.asarray(ids), jnp.asarray(positions), caches, 0,
                         kv_mask_dev, last_only=True)
      token = sample(np.asarray(logits[:, -1]), options, rng)
      prefill_s = time.perf_counter() - start
      out = np.full((b, max_new_tokens), pad, np.int32)
      done = np.zeros(b, bool)
      last_pos = positions[:, -1]
      decode_start = time.perf_counter()
      steps = 0
      for step in range(max_new_tokens):
        out[:, step] = np.where(done, pad, token)
        done |= np.isin(token, stops)
        if done.all() or step == max_new_tokens - 1:
          break
        last_pos = last_pos + 1
        logits = self._run("decode", jnp.asarray(token[:, None]),
                           jnp.asarray(last_pos[:, None].astype(np.int32)), caches, t + step,
                           kv_mask_dev, last_only=True)
        token = sample(np.asarray(logits[:, -1]), options, rng)
        steps += 1
      decode_s = time.perf_counter() - decode_start
    finally:
      for a in allocations:
        self.ledger.release(a)
    stats = {
        "prefill_s": prefill_s,
        "prompt_tokens": t,
        "new_tokens": steps + 1,
        "decode_s": decode_s,
        "decode_tokens_per_s": steps / decode_s if steps else float("nan"),
        "recompilations": _compilations() - compiles_before,
        "ledger": self.ledger.summary(),
        "strategy": self.strategy.stats().copy(),
    }
    text = None
    if self.model.tokenizer is not None:
      text = [self.model.tokenizer.decode([int(i) for i in row if i != pad]) for row in out]
    return GenerationOutput(tokens=out, stats=stats, text=text)

  def _encode(self, prompts):
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], str)):
      if self.model.tokenizer is None:
        raise ValueError("text prompts need a model with tokenizer.json; pass token ids.")
      texts = [prompts] if isinstance(prompts, str) else list(prompts)
      return [self.model.tokenizer.encode(s).ids for s in texts]
    return prompts

  def close(self) -> None:
    """Closes the strategy and gives back every byte it placed: the ledger ends at zero."""
    self.strategy.close()
    for allocation in self.ledger.live():
      self.ledger.release(allocation)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_compile_count = 0


def _on_duration_event(event: str, *args, **kwargs) -> None:
  """Counts XLA compilations, so stats can show that recompiles stop after warm-up."""
  global _compile_count
  if event.endswith("backend_compile_duration"):
    _compile_count += 1


def _compilations() -> int:
  return _compile_count


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)
