"""Measure one strategy on this machine and compare with the simulator's prediction.

  python -m experiments.validate_simulator --profile=/tmp/this_machine.json \
      --model=llama-1b --strategy=resident
  python -m experiments.validate_simulator --profile=... --strategy=layerwise \
      --options='{"offload_tier": "disk", "kv_reserve_tokens": 128}' --device=1GiB
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.validate_simulator \
      --profile=... --strategy=tensor_split --options='{"alpha": 0.0}' --device=512MiB

One case per process (a fresh process per measurement keeps RSS bounded and
caches honest). Prints predicted and measured prefill and decode, and the error.
"""

import json

from absl import app, flags

_PROFILE = flags.DEFINE_string("profile", "", "HardwareProfile name or JSON ('': this"
                                " machine's, calibrated for the model)")
_MODEL = flags.DEFINE_string("model", "llama-1b", "synthetic shape")
_STRATEGY = flags.DEFINE_string("strategy", "resident", "registered strategy")
_OPTIONS = flags.DEFINE_string("options", "{}", "strategy options as JSON")
_DEVICE = flags.DEFINE_string("device", "", "device budget, e.g. 1GiB ('' unlimited)")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 16, "generated tokens")


def main(argv):
  del argv
  import numpy as np

  import hetflow
  from hetflow import simulate
  from hetflow.bench.machine import machine_profile

  model = hetflow.synthetic_model(_MODEL.value)
  profile = machine_profile(_PROFILE.value or None, model)
  options = json.loads(_OPTIONS.value)
  budget = hetflow.Budget(device=_DEVICE.value or None)
  engine = hetflow.Engine(model, _STRATEGY.value, budget=budget, options=options or None,
                          profile=profile)
  ids = np.random.default_rng(0).integers(3, 1000, (1, _PROMPT.value)).astype(np.int32)
  engine.generate(ids, max_new_tokens=_NEW.value, stop_tokens=())  # compile, same shapes
  out = engine.generate(ids, max_new_tokens=_NEW.value, stop_tokens=())
  pred = simulate.predict(model, engine.placement, profile, 1, _PROMPT.value, _NEW.value)
  measured_decode = 1.0 / out.stats["decode_tokens_per_s"]
  result = dict(
      model=_MODEL.value, strategy=_STRATEGY.value, options=options, device=_DEVICE.value,
      predicted_prefill_s=pred.prefill_s, measured_prefill_s=out.stats["prefill_s"],
      predicted_decode_s=pred.decode_s_per_token, measured_decode_s=measured_decode,
      decode_error=pred.decode_s_per_token / measured_decode - 1,
      prefill_error=pred.prefill_s / out.stats["prefill_s"] - 1, bound_by=pred.bottleneck)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
