"""HF transformers, Accelerate and llama.cpp as peers in the benchmark table (the `[peers]` extra).

Both load the same weights as hetflow, written once as an HF directory by
`hetflow.save_hf` (float32), run on torch CPU, and decode greedily with the
KV cache in a plain loop, so prefill and decode are timed separately:

- "transformers": plain `from_pretrained`; safetensors are memory-mapped, so
  weights live in the page cache, and under a memory limit they are evicted and
  read again from disk (through the page cache, never O_DIRECT).
- "accelerate": `from_pretrained(device_map=..., offload_folder=...)` with the
  chosen blocks on "disk" and the rest in CPU RAM. With a safetensors
  checkpoint (transformers 5 / accelerate 1.x) nothing is copied into the
  offload folder: the disk blocks are read from the original safetensors
  files, through the page cache. Without a memory limit they are served from
  a warm page cache after the first token, which flatters its figure; the
  table says so in the "page cache" column, and the measured read bytes per
  token (/proc/self/io) show how much really came from the disk.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from hetflow.bench.process import drop_cold, peak_rss, proc_read_bytes, touched_bytes
from hetflow.memory.budget import format_bytes


def _decode_result(tokens: list[int], ttft: float, decode_s: float, new_tokens: int,
                   read_bytes: int) -> dict[str, Any]:
  """A peer's timed greedy decode as the benchmark table reads it (the first new token
  belongs to prefill, so decode timed new_tokens - 1 steps)."""
  steps = new_tokens - 1
  return {"tokens": [tokens], "ttft_s": ttft, "decode_s": decode_s,
          "decode_tok_s": steps / decode_s if steps else float("nan"),
          "decode_s_per_token": decode_s / steps if steps else float("nan"),
          "new_tokens": new_tokens, "decode_read_bytes": read_bytes}


def hf_dir_for(model, progress: bool = True) -> str:
  """The HF directory of `model` in the cache, written with save_hf on first use."""
  from hetflow.checkpoints import save_hf
  from hetflow.memory.store import default_store_dir

  if model.description and os.path.isfile(os.path.join(model.description, "config.json")):
    return model.description  # already an HF checkpoint
  path = default_store_dir(model).replace(os.sep + "stores" + os.sep, os.sep + "hf" + os.sep)
  if not os.path.exists(os.path.join(path, "config.json")):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Small shards keep the writer's peak memory low.
    save_hf(model, path, dtype=np.float32, max_shard_bytes=512 << 20, progress=progress)
  return path


def gguf_for(model, gguf_type: str, positions: int | None = None) -> str:
  """The GGUF file of `model` at `gguf_type` in the cache, written with save_gguf on first use.

  Args:
    model: the benchmark's model (its float values are written, whatever its format).
    gguf_type: "F32", "F16", "BF16", "Q8_0", "Q4_0" or "Q4_1".
    positions: how many positions the benchmark runs (prompt + new tokens). Needed for a
      model with an attention window (the synthetic routed MoE models): llama.cpp's llama
      and Mixtral have none, so the file is written without it, which computes the same
      function only while every query sees the whole context; refused otherwise.

  Returns:
    The path of the file.
  """
  from hetflow.checkpoints.gguf import save_gguf
  from hetflow.memory.store import default_store_dir

  if model.description and model.description.endswith(".gguf"):
    raise ValueError(f"{model.description} is a GGUF file; a llamacpp row writes its own from"
                     " a synthetic model or an HF directory. Benchmark that file directly.")
  folder = default_store_dir(model).replace(os.sep + "stores" + os.sep, os.sep + "gguf" + os.sep)
  path = os.path.join(folder, f"{gguf_type}.gguf")
  window = model.config.sliding_window
  if window is not None:
    if positions is None or positions > window:
      raise ValueError(
          f"{model.description or model.config.arch} attends over a window of {window} tokens,"
          f" which llama.cpp's {model.config.arch} does not have; a llamacpp row computes the"
          f" same model only up to {window} positions (asked: {positions}). Shorten the"
          " prompt plus new tokens, or leave the llamacpp row out.")
    model = dataclasses.replace(model, config=model.config.replace(sliding_window=None))
  if not os.path.exists(path):
    os.makedirs(folder, exist_ok=True)
    save_gguf(model, path, gguf_type)
  return path


def gguf_touched_bytes(path: str) -> int:
  """Weight bytes one decode token reads from a GGUF file, counted like `touched_bytes`:
  every tensor but the embedding table, which counts only where it is the (tied) head."""
  import gguf

  sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path, "r").tensors}
  embed = sizes.pop("token_embd.weight")
  return sum(sizes.values()) + (0 if "output.weight" in sizes else embed)


def _layers_prefix(torch_model, num_layers: int) -> str:
  import torch

  for name, module in torch_model.named_modules():
    if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
      return name
  raise ValueError("no ModuleList of the model's blocks found")


def device_map(hf_dir: str, num_layers: int, disk_layers: list[int]) -> dict[str, str]:
  """Blocks in `disk_layers` on "disk", every other module on "cpu"."""
  from accelerate import init_empty_weights
  from transformers import AutoConfig, AutoModelForCausalLM

  with init_empty_weights():
    empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
  prefix = _layers_prefix(empty, num_layers)
  out: dict[str, str] = {}
  # Every sibling along the path to the block list stays in RAM.
  parts = prefix.split(".")
  for depth in range(len(parts)):
    parent = ".".join(parts[:depth])
    module = empty.get_submodule(parent) if parent else empty
    for child, _ in module.named_children():
      full = f"{parent}.{child}" if parent else child
      if full != ".".join(parts[:depth + 1]):
        out[full] = "cpu"
  for i in range(num_layers):
    out[f"{prefix}.{i}"] = "disk" if i in disk_layers else "cpu"
  return out


def _greedy(torch_model, prompt: np.ndarray, new_tokens: int) -> dict[str, Any]:
  import torch

  ids = torch.from_numpy(prompt.astype(np.int64))
  with torch.inference_mode():
    t0 = time.perf_counter()
    out = torch_model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1)
    ttft = time.perf_counter() - t0
    tokens = [int(token[0])]
    past = out.past_key_values
    io0 = proc_read_bytes()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
      out = torch_model(input_ids=token[:, None], past_key_values=past, use_cache=True)
      past = out.past_key_values
      token = out.logits[:, -1].argmax(-1)
      tokens.append(int(token[0]))
    decode_s = time.perf_counter() - t1
    io1 = proc_read_bytes()
  return _decode_result(tokens, ttft, decode_s, new_tokens, io1 - io0)


def _measured_runs(run, spec: dict[str, Any]) -> dict[str, Any]:
  """`run()` once to warm up (then cold again), then `repeats` times; the fastest decode,
  with every run's figures (noise from other work only ever slows a run down)."""
  if spec.get("warmup", True):
    run()
    drop_cold(spec)  # the measured run starts cold, like hetflow's
  runs = []
  for repeat in range(max(1, spec.get("repeats", 1))):
    if repeat:
      drop_cold(spec)
    io0 = proc_read_bytes()
    runs.append(run())
    runs[-1]["proc_read_bytes"] = proc_read_bytes() - io0
  r = max(runs, key=lambda x: x["decode_tok_s"])
  r["decode_tok_s_all"] = [x["decode_tok_s"] for x in runs]
  r["ttft_s_all"] = [x["ttft_s"] for x in runs]
  return r


def _run_llamacpp(system, model, spec: dict[str, Any], prompt: np.ndarray) -> dict[str, Any]:
  path = spec["gguf_path"]
  t0 = time.perf_counter()
  llm, kwargs = _load_llamacpp(system, spec)
  load_s = time.perf_counter() - t0
  r = _measured_runs(lambda: _llamacpp_greedy(llm, prompt, spec["new_tokens"]), spec)
  steps = r["new_tokens"] - 1
  r.update({
      "load_s": load_s,
      "placement": (f"llama.cpp {system.gguf_type} GGUF ({format_bytes(os.path.getsize(path))}),"
                    f" mmap={kwargs.get('use_mmap', True)}, {kwargs['n_threads']} threads"),
      "disk_bytes_per_token": r["decode_read_bytes"] / steps if steps else float("nan"),
      "host_to_device_bytes_per_token": 0,
      "peak_ledger": {},
      "touched_bytes": gguf_touched_bytes(path),
      "streamed": {"disk": 0, "host": 0},
      "page_cache": "yes (mmap)",
      "peak_rss": peak_rss(),
  })
  return r


def _llamacpp_greedy(llm, prompt: np.ndarray, new_tokens: int) -> dict[str, Any]:
  import llama_cpp

  n_vocab = llm.n_vocab()

  def next_token() -> int:
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
    return int(logits.argmax())

  llm.reset()  # the next eval starts at position 0 and clears the KV cache
  t0 = time.perf_counter()
  llm.eval([int(t) for t in prompt[0]])
  tokens = [next_token()]
  ttft = time.perf_counter() - t0
  io0 = proc_read_bytes()
  t1 = time.perf_counter()
  for _ in range(new_tokens - 1):
    llm.eval([tokens[-1]])
    tokens.append(next_token())
  decode_s = time.perf_counter() - t1
  io1 = proc_read_bytes()
  return _decode_result(tokens, ttft, decode_s, new_tokens, io1 - io0)


def _load_llamacpp(system, spec: dict[str, Any]):
  import llama_cpp

  kwargs = dict(n_threads=2, verbose=False, n_ctx=max(256, spec["prompt_tokens"]
                                                      + spec["new_tokens"] + 16))
  kwargs.update(system.options or {})
  return llama_cpp.Llama(model_path=spec["gguf_path"], **kwargs), kwargs


def run_peer(system, model, spec: dict[str, Any], prompt: np.ndarray) -> dict[str, Any]:
  """Loads and runs one peer system; returns the same figures as a hetflow row."""
  if system.kind == "llamacpp":
    return _run_llamacpp(system, model, spec, prompt)

  import torch
  from transformers import AutoModelForCausalLM

  from strategies.layerwise import spread

  hf_dir = spec["hf_dir"]
  n = model.config.num_layers
  t0 = time.perf_counter()
  disk_layers: list[int] = []
  if system.kind == "transformers":
    torch_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  else:
    resident = n if system.resident_layers is None else system.resident_layers
    kept = set(spread(n, resident))
    disk_layers = [i for i in range(n) if i not in kept]
    offload = os.path.join(spec["workdir"], "offload", system.name)
    os.makedirs(offload, exist_ok=True)
    torch_model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, device_map=device_map(hf_dir, n, disk_layers),
        offload_folder=offload)
  torch_model.eval()
  load_s = time.perf_counter() - t0
  r = _measured_runs(lambda: _greedy(torch_model, prompt, spec["new_tokens"]), spec)
  layer_bytes = [sum(model.group_nbytes(f"layers/{i}/{h}") for h in ("attn", "mlp"))
                 for i in range(n)]
  disk = sum(layer_bytes[i] for i in disk_layers)
  steps = r["new_tokens"] - 1
  r.update({
      "load_s": load_s,
      "placement": (f"{system.kind}: {len(disk_layers)} of {n} blocks on disk"
                    f" ({format_bytes(disk)}), the rest in RAM"),
      # What the page cache could not serve, per decode token.
      "disk_bytes_per_token": r["decode_read_bytes"] / steps if steps else float("nan"),
      "host_to_device_bytes_per_token": 0,
      "peak_ledger": {},
      "touched_bytes": touched_bytes(model),
      "streamed": {"disk": disk, "host": 0},
      "page_cache": "yes (mmap)",
      "peak_rss": peak_rss(),
  })
  return r
