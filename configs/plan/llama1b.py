"""Which strategy for llama-1b (4.1 GiB in float32) under a device budget, on this machine.

Run:
  python -m experiments.plan --config=configs/plan/llama1b.py
  python -m experiments.plan --config=configs/plan/llama1b.py --config.budget.device=2GiB \
      --config.run=true --workdir=/tmp/plan-llama1b
Hardware: this machine's HardwareProfile (measured once, cached in
$HETFLOW_CACHE/hardware_profile.json,
~/.cache/hetflow by default); or --config.profile=a10-pcie.
Expect: resident first when the budget holds the model; otherwise the plan that
keeps the most bytes off the slowest link. With run=true, predicted and measured
decode tok/s side by side (WORKSPACE_NOTES.md, "Planner").
"""

from hetflow.planner import plan_config


def get_config(arg=None):
  del arg
  return plan_config("llama-1b", device="1GiB",
                     smoke={"model": {"name": "llama-tiny"}, "budget": {"device": "1MiB"},
                            "profile": "a10-pcie", "prompt_tokens": 8, "new_tokens": 4})
