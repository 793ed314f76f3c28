"""The benchmark config schema: a bench config's fields and its systems.

Configs under configs/bench/ call `bench_config` and state only what differs
from its defaults; `systems_from_config` turns their `systems` section into
`SystemSpec` rows, in the config's order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from hetflow import config as config_lib


def bench_config(model: str = "llama-tiny", **overrides) -> ml_collections.ConfigDict:
  """A bench config with the harness's defaults; configs state only what differs.

  Fields:
    model: the model section (hetflow.config.model_section(model)).
    budget: device/host/disk sizes ("" = unlimited).
    store_dir: the layerwise disk store ("" = the model's default, converted
      on first use).
    prompt_tokens, new_tokens: the workload.
    repeats: measured runs per system; the fastest decode is kept, all are reported.
    warmup: an identical run first, so the measured one compiles nothing.
    warmup_prompt: "other" (default: the warm-up decodes another random prompt
      of the same length, and again before each later repeat, so the same shapes
      compile and a strategy's caches hold another sequence's neurons or experts
      when a measured run starts, as when serving a new request) or "same" (the
      warm-up decodes the measured prompt: the replayed-request case).
    memory_limit: e.g. "3GiB": lock the rest of RAM for the whole run.
    drop_caches: evict the model's files before each run (and after warm-up).
    drop_method: "fadvise" (per file) or "drop_caches" (machine-wide; disturbs
      other jobs on the machine).
    timeline: write timeline.png of one traced decode step.
    profile_trace: a jax.profiler (Perfetto) trace per hetflow system.
    timeout_s: per system.
    order: comma-separated names of `systems` to run, in this order.
    systems: name -> SystemSpec fields.
    smoke: overrides that make the config a seconds-long run (tests).
  """
  c = ml_collections.ConfigDict(dict(
      model=config_lib.model_section(model).to_dict(),
      budget=dict(device="", host="", disk=""), store_dir="", prompt_tokens=16,
      new_tokens=8, repeats=2, warmup=True, warmup_prompt="other", memory_limit="",
      drop_caches=True,
      drop_method="fadvise", timeline=True, profile_trace=False, timeout_s=900, order="",
      systems={}, smoke={}))
  for key, value in overrides.items():
    c[key] = value
  return c


KINDS = ("hetflow", "transformers", "accelerate", "llamacpp")


@dataclasses.dataclass(frozen=True)
class SystemSpec:
  """One row of the table.

  Attributes:
    name: the row's label.
    kind: "hetflow" (a strategy), "transformers" (plain from_pretrained, torch
      CPU), "accelerate" (device_map with disk offload) or "llamacpp"
      (llama-cpp-python on the model written as GGUF; hetflow.bench.peers).
    strategy: registered strategy name (kind "hetflow").
    options: the strategy's options (kind "hetflow"); keyword arguments of
      `llama_cpp.Llama` (kind "llamacpp"; n_threads defaults to 2).
    resident_layers: kind "accelerate": blocks kept in RAM, spread like
      layerwise's; the others go to disk (offload_folder). None: all in RAM.
    budget: overrides the config's budget for this system (device/host/disk).
    weights: kind "hetflow": the model's weight format for this row
      ("int8", "int4", ...; hetflow/models/formats.py); "" = the config's
      model.weights. Each format has its own layer store.
    gguf_type: kind "llamacpp": the GGUF file type the model is written as
      ("F32", "F16", "Q8_0", "Q4_0", ...).
  """

  name: str
  kind: str = "hetflow"
  strategy: str = "layerwise"
  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  resident_layers: int | None = None
  budget: dict[str, Any] | None = None
  weights: str = ""
  gguf_type: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"system {self.name!r}: kind={self.kind!r}; expected one of {KINDS}.")
    if (self.kind == "llamacpp") != bool(self.gguf_type):
      raise ValueError(f"system {self.name!r}: gguf_type={self.gguf_type!r}; a 'llamacpp' row"
                       " names its GGUF type (e.g. 'Q8_0') and no other kind takes one.")
    if self.weights and self.kind != "hetflow":
      raise ValueError(f"system {self.name!r}: weights={self.weights!r} is for hetflow rows;"
                       " a peer's bytes follow its kind (llamacpp: gguf_type).")


def systems_from_config(config) -> list[SystemSpec]:
  """The systems a config lists, in `config.order` (comma-separated; empty: sorted names)."""
  names = [n.strip() for n in (config.get("order") or "").split(",") if n.strip()]
  names = names or sorted(config.systems.keys())
  out = []
  for name in names:
    if name not in config.systems:
      raise ValueError(f"order names {name!r}, which is not in systems {sorted(config.systems)}.")
    s = config_lib.to_dict(config.systems[name])
    budget = s.pop("budget", None)
    out.append(SystemSpec(name=name, budget=({k: v for k, v in budget.items() if v} or None)
                          if budget else None, **s))
  return out
