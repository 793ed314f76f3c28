"""The token loop: prefill, decode, KV cache, sampling, timing (docs/architecture.md).

The engine runs embed -> block 0..L-1 -> head with one jitted function per
half-block kind, asking the strategy for each layer's weights just in time.
It never waits inside the loop except where the strategy's `fetch` says a
tier must be ready; JAX's asynchronous dispatch lets the strategy's transfers
and reads run while earlier layers compute.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hetflow.memory import tiers
from hetflow.memory.budget import Budget, MemoryLedger
from hetflow.models import sharding
from hetflow.models.model import Model
from hetflow.strategy import NotApplicable, Strategy, make_strategy
from hetflow.trace import Timeline

# Events an untraced engine's timeline keeps: a llama-1b decode step streams 22
# layers with 3 events each, so this covers about 60 tokens (~1 MB) and never grows.
UNTRACED_EVENTS = 4096


@dataclasses.dataclass
class GenerationOutput:
  """What `Engine.generate` returns.

  Attributes:
    tokens: [B, N] new token ids per prompt (pad_token_id after a stop token).
    stats: prefill_s (time to first token), decode_tokens_per_s, new_tokens,
      decode_host_cpu_s (the calling thread's CPU seconds over the decode steps),
      recompilations, per-tier bytes (peak) from the ledger, and under "strategy" the
      strategy's StrategyStats (cumulative over the engine's runs).
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

  def __post_init__(self):
    t, k, p = self.temperature, self.top_k, self.top_p
    if not _is_number(t) or not math.isfinite(t) or t < 0:
      raise ValueError(f"temperature={t!r}; expected a finite number >= 0 (0 is greedy).")
    if not _is_int(k) or k < 0:
      raise ValueError(f"top_k={k!r}; expected an int >= 0 (0 keeps every token).")
    if not _is_number(p) or not 0 < p <= 1:
      raise ValueError(f"top_p={p!r}; expected 0 < top_p <= 1 (1.0 keeps every token; top_p"
                       " = 0 would keep none: use temperature=0 for greedy decoding).")
    if not _is_int(self.seed):
      raise ValueError(f"seed={self.seed!r}; expected an int.")


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
  return _is_int(x) or isinstance(x, (float, np.floating))


def pad_batch(prompts: Any, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads a batch of prompts (lists of ids or a [B, T] array).

  Returns:
    ids [B, T] int32 and mask [B, T] bool (True on real tokens).

  Raises:
    ValueError: naming the prompt that is empty, not made of integer ids, or
      not shaped [T] / [B, T].
  """
  if prompts is None:
    raise ValueError("prompts is None; pass token ids ([B, T] or a list of id lists) or text.")
  if isinstance(prompts, (np.ndarray, jax.Array)):
    array = np.asarray(prompts)
    if array.dtype.kind not in "iu":
      raise ValueError(f"prompts has dtype {array.dtype}; token ids must be integers"
                       " (e.g. np.asarray(ids, np.int32)).")
    if array.ndim not in (1, 2) or array.size == 0:
      raise ValueError(f"prompts has shape {list(array.shape)}; expected [T] or [B, T] token"
                       " ids with at least one token.")
    _check_id_range(array, "prompts")
    ids = array.astype(np.int32)
    if ids.ndim == 1:
      ids = ids[None]
    return ids, np.ones(ids.shape, bool)
  try:
    rows = [list(p) if not _is_int(p) else p for p in prompts]
  except TypeError:
    raise ValueError(f"prompts={prompts!r} is not a list of token id lists; pass [[1, 2, 3]],"
                     " a [B, T] array, or text.") from None
  if rows and all(_is_int(r) for r in rows):
    rows = [rows]  # one prompt given as a flat list of ids
  if not rows:
    raise ValueError("prompts is empty; pass at least one prompt.")
  for i, r in enumerate(rows):
    if not isinstance(r, list) or not r:
      raise ValueError(f"prompt {i} is {'empty' if r == [] else repr(r)}; every prompt needs"
                       " at least one token id.")
    bad = next((x for x in r if not _is_int(x)), None)
    if bad is not None:
      raise ValueError(f"prompt {i} holds {bad!r} ({type(bad).__name__}); token ids must be"
                       " integers.")
    _check_id_range(np.asarray(r, dtype=object), f"prompt {i}")
  t = max(len(r) for r in rows)
  ids = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = True
  return ids, mask


def _check_id_range(ids: np.ndarray, what: str) -> None:
  """Ids must fit int32 and be >= 0 (the vocabulary bound is checked by the engine)."""
  low, high = ids.min(), ids.max()
  if low < 0:
    raise ValueError(f"{what} holds token id {int(low)}; token ids are >= 0.")
  if high > np.iinfo(np.int32).max:
    raise ValueError(f"{what} holds token id {int(high)}, beyond any vocabulary.")


def check_ids(ids: np.ndarray, mask: np.ndarray, vocab_size: int) -> None:
  """Refuses token ids outside [0, vocab_size) among the real (unmasked) tokens.

  An id past the embedding table would be gathered as garbage (NaN logits on
  the CPU), so it is refused by name rather than decoded.
  """
  real = ids[mask]
  bad = real[(real < 0) | (real >= vocab_size)]
  if bad.size:
    rows = sorted({int(r) for r in np.nonzero(((ids < 0) | (ids >= vocab_size)) & mask)[0]})
    raise ValueError(f"token id {int(bad[0])} (prompt row(s) {rows[:8]}) is outside the model's"
                     f" vocabulary [0, {vocab_size}); pass ids below {vocab_size}.")


class NonFiniteLogitsError(FloatingPointError):
  """The model produced NaN or +inf logits: no token can be chosen from them."""


def sample(logits: np.ndarray, options: SamplingOptions, rng: np.random.Generator,
           where: str = "") -> np.ndarray:
  """Next token per row from logits [B, V] (float32, on the host).

  Args:
    logits: [B, V].
    options: how to choose.
    rng: the sampler's generator.
    where: what produced the logits (e.g. "decode step 3"), for errors.

  Returns:
    [B] int32 token ids.

  Raises:
    NonFiniteLogitsError: a row holds NaN or +inf, or is -inf everywhere. Such a
      row means the forward pass went wrong (NaN/inf weights or inputs, or a
      float16 overflow): any token "chosen" from it would be garbage (argmax of
      NaN is token 0), so the run stops there, by name, instead.
    ValueError: top_k above the vocabulary size.
  """
  bad = np.isnan(logits).any(-1) | np.isposinf(logits).any(-1) | np.isneginf(logits).all(-1)
  if bad.any():
    rows = [int(r) for r in np.nonzero(bad)[0]]
    raise NonFiniteLogitsError(
        f"the model's logits{' at ' + where if where else ''} are NaN or infinite for batch"
        f" row(s) {rows[:8]}: the weights or the inputs hold NaN/inf, or the compute dtype"
        " overflowed (float16); check the checkpoint's tensors, or run in float32/bfloat16.")
  if options.top_k > logits.shape[-1]:
    raise ValueError(f"top_k={options.top_k} is above the vocabulary size {logits.shape[-1]};"
                     f" pass top_k <= {logits.shape[-1]} (0 keeps every token).")
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

  On a mesh (`mesh=2`: two devices, or two processes under jax.distributed,
  docs/distributed.md) the weights are split over the mesh's "model" axis
  (hetflow.models.sharding) and every process runs this same code. The budget
  is then per device: each shard's bytes in each tier, planned on one shard's
  Model (`shards.shard`); the ledger counts one shard's bytes.
  """

  def __init__(self, model: Model, strategy: str | Strategy = "resident",
               budget: Any = None, options: Any = None, profile: Any = None,
               trace: bool = False, mesh: Any = None):
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
      mesh: None (one device), an int N or {"model": N} (the first N of
        jax.devices()), or a jax Mesh with one axis "model"
        (hetflow.models.sharding.make_mesh). N > 1 needs a strategy that
        shards (`Strategy.shards_over_mesh`: every built-in strategy).

    Raises:
      NotApplicable: the strategy does not run on a mesh.
      hetflow.models.sharding.ShardingError: the model cannot be split N ways.
    """
    self.model = model
    self.shards = sharding.MeshShards(model, sharding.as_mesh(mesh))
    local = self.shards.shard  # plans, budgets and the ledger are per device: one shard
    self.budget = Budget.from_any(budget)
    self.ledger = MemoryLedger(self.budget)
    self.strategy, profile = make_strategy(strategy, options, local, self.budget, profile)
    if self.shards.mesh is not None and not self.strategy.shards_over_mesh:
      raise NotApplicable(
          f"strategy {self.strategy.name!r} does not run on a mesh yet (mesh of"
          f" {self.shards.size} shards); use a built-in strategy ('resident', 'layerwise',"
          " 'tensor_split', 'neuron_cluster', 'moe_offload', 'moe_sparse') or no mesh"
          " (docs/distributed.md).")
    if self.shards.mesh is not None and self.strategy.kv_cache_tier() != "device":
      raise NotApplicable(f"kv_cache_tier={self.strategy.kv_cache_tier()!r} on a mesh: the KV"
                          " cache stays on the devices there; use kv_cache_tier='device'.")
    self.strategy.mesh = self.shards
    # Untraced, the strategy's read/transfer/wait events stay a bounded ring (the
    # benchmark's disk-busy figure reads them); traced runs keep everything.
    self.timeline = Timeline(max_events=None if trace else UNTRACED_EVENTS)
    self.trace = trace
    self.strategy.timeline = self.timeline
    self.strategy.ledger = self.ledger
    self.placement = self.strategy.plan(local, self.budget, profile)
    try:
      self.strategy.materialize(self.placement, model, self.ledger)
    except BaseException:  # nothing placed may outlive a failed start
      self.close()
      raise
    self.functions = (model.functions if self.shards.mesh is None
                      else sharding.ShardedFunctions(self.shards))
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
    x = self.strategy.run_embed(globals_["embed"], ids, positions, fn.embed)
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
    nbytes = self.shards.shard.kv_cache_nbytes(slots, batch, layers=1)  # one device's
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
    elif self.shards.mesh is not None:
      caches = [self.functions.new_cache(batch, slots) for _ in range(cfg.num_layers)]
    else:
      caches = [self.functions.new_cache(batch, slots, self._kv_sharding)
                for _ in range(cfg.num_layers)]
    return caches, allocations

  def forward(self, ids, attention_mask=None) -> np.ndarray:
    """Logits [B, T, V] (float32) for a full sequence; no generation.

    Raises:
      ValueError: bad ids (see pad_batch, check_ids), an attention_mask of
        another shape or with a row of no tokens, or (OPT) a sequence longer
        than the model's learned positions. Rotary models warn past
        max_position_embeddings, as transformers does.
    """
    ids, mask = pad_batch(ids, self._input_pad(self._pad_id()))
    if attention_mask is not None:
      mask = np.asarray(attention_mask)
      if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {list(mask.shape)} but the ids have"
                         f" {list(ids.shape)}; pass one mask entry per token.")
      mask = mask.astype(bool)
      empty = np.nonzero(~mask.any(1))[0]
      if empty.size:
        raise ValueError(f"attention_mask row(s) {empty[:8].tolist()} mask every token; each"
                         " row needs at least one real token.")
    check_ids(ids, mask, self.model.config.vocab_size)
    self._check_positions(int(mask.sum(1).max()), 0)
    b, t = ids.shape
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    caches, allocations = self._new_caches(b, t)
    try:
      put = self.shards.replicate
      logits = self._run("prefill", put(ids), put(positions), caches, 0, put(mask),
                         last_only=False)
      return np.asarray(logits)
    finally:
      for a in allocations:
        self.ledger.release(a)

  def _check_positions(self, prompt_len: int, max_new_tokens: int) -> None:
    """Past the model's positions: an error for learned positions (OPT), a warning
    for rotary ones (they run, with degraded quality), as transformers does."""
    cfg = self.model.config
    limit, total = cfg.max_position_embeddings, prompt_len + max_new_tokens
    if total <= limit:
      return
    what = (f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens})" if max_new_tokens
            else f"sequence ({prompt_len} tokens)")
    if cfg.arch == "opt":
      raise ValueError(f"{what} = {total} exceeds the model's {limit} learned positions;"
                       f" shorten the prompt or generate fewer tokens.")
    warnings.warn(f"{what} = {total} exceeds the model's max_position_embeddings ({limit});"
                  " rotary positions run past it, but the output usually degrades.",
                  stacklevel=3)

  def _input_pad(self, pad: int) -> int:
    """The id left padding feeds the model: `pad` if it is in the vocabulary, else 0.

    Masked positions still pass through the embedding: an id outside the table
    (a config's pad_token_id=-1, say) gathers NaN, which reaches the real
    tokens through the attention's zero weights (0 * NaN).
    """
    return pad if 0 <= pad < self.model.config.vocab_size else 0

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
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected an int >= 1.")
    options = SamplingOptions(temperature, top_k, top_p, seed)
    vocab = self.model.config.vocab_size
    if options.top_k > vocab:
      raise ValueError(f"top_k={top_k} is above the vocabulary size {vocab}; pass top_k <="
                       f" {vocab} (0 keeps every token).")
    prompts = self._encode(prompts)
    pad = self._pad_id() if pad_token_id is None else pad_token_id
    if not _is_int(pad) or not abs(pad) <= np.iinfo(np.int32).max:
      raise ValueError(f"pad_token_id={pad!r}; expected an int (the id that fills stopped rows).")
    stops = np.array(self.model.config.stop_tokens if stop_tokens is None else list(stop_tokens),
                     np.int32)
    rng = np.random.default_rng(seed)
    ids, mask = pad_batch(prompts, self._input_pad(pad))
    check_ids(ids, mask, vocab)
    b, t = ids.shape
    slots = t + max_new_tokens
    # Left padding takes KV slots but no positions; OPT's check counts slots (as before).
    self._check_positions(t if self.model.config.arch == "opt" else int(mask.sum(1).max()),
                          max_new_tokens)
    kv_mask = np.concatenate([mask, np.ones((b, max_new_tokens), bool)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    put = self.shards.replicate  # whole on every shard (jnp.asarray without a mesh)
    kv_mask_dev = put(kv_mask)
    compiles_before = _compilations()
    caches, allocations = self._new_caches(b, slots)
    try:
      start = time.perf_counter()
      logits = self._run("prefill", put(ids), put(positions), caches, 0, kv_mask_dev,
                         last_only=True)
      token = sample(np.asarray(logits[:, -1]), options, rng, "prefill")
      prefill_s = time.perf_counter() - start
      out = np.full((b, max_new_tokens), pad, np.int32)
      done = np.zeros(b, bool)
      last_pos = positions[:, -1]
      decode_start = time.perf_counter()
      # This thread's CPU over the decode loop: the host's own work per token (Python,
      # dispatch, the syscalls it issues), which a 2-core machine serialises with the
      # device's compute more than it overlaps (docs/measuring.md).
      decode_cpu_start = time.thread_time()
      steps = 0
      for step in range(max_new_tokens):
        out[:, step] = np.where(done, pad, token)
        done |= np.isin(token, stops)
        if done.all() or step == max_new_tokens - 1:
          break
        last_pos = last_pos + 1
        logits = self._run("decode", put(token[:, None]),
                           put(last_pos[:, None].astype(np.int32)), caches, t + step,
                           kv_mask_dev, last_only=True)
        token = sample(np.asarray(logits[:, -1]), options, rng, f"decode step {step + 1}")
        steps += 1
      decode_host_cpu_s = time.thread_time() - decode_cpu_start  # inside the wall interval
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
        "decode_host_cpu_s": decode_host_cpu_s,
        "recompilations": _compilations() - compiles_before,
        "ledger": self.ledger.summary(),
        "strategy": self.strategy.stats().copy(),
        "mesh": {"shards": self.shards.size, "process": jax.process_index(),
                 "local_shards": [s.rank for s in self.shards.local]},
    }
    text = None
    # An unreadable tokenizer.json (hetflow.checkpoints.hf) still lets id prompts run.
    if self.model.tokenizer is not None and getattr(self.model.tokenizer, "readable", True):
      text = [self.model.tokenizer.decode([int(i) for i in row if i != pad]) for row in out]
    return GenerationOutput(tokens=out, stats=stats, text=text)

  def _encode(self, prompts):
    """Text prompts -> id lists (ids pass through); errors name the prompt."""
    is_list = isinstance(prompts, (list, tuple))
    if not (isinstance(prompts, str) or (is_list and any(isinstance(p, str) for p in prompts))):
      return prompts
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    mixed = next((i for i, p in enumerate(texts) if not isinstance(p, str)), None)
    if mixed is not None:
      raise ValueError(f"prompt {mixed} is {type(texts[mixed]).__name__} among text prompts;"
                       " pass all prompts as text or all as token ids.")
    if self.model.tokenizer is None:
      raise ValueError(f"text prompts need a tokenizer, and {self.model.description or 'the model'}"
                       " has no tokenizer.json; pass token ids instead.")
    encoded = [self.model.tokenizer.encode(s).ids for s in texts]
    empty = next((i for i, e in enumerate(encoded) if not e), None)
    if empty is not None:
      raise ValueError(f"prompt {empty} ({texts[empty]!r}) encodes to no tokens; pass"
                       " non-empty text.")
    return encoded

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
