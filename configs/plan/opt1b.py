"""Which strategy for opt-1.3b (4.9 GiB in float32) under a device budget, on this machine.

Run:
  python -m experiments.plan --config=configs/plan/opt1b.py
  python -m experiments.plan --config=configs/plan/opt1b.py --config.budget.device=3GiB \
      --config.run=true --workdir=/tmp/plan-opt1b
Hardware: this machine's HardwareProfile (cached in $HETFLOW_CACHE/hardware_profile.json,
~/.cache/hetflow by default, with this model's decode costs measured once), or
--config.profile=a10-pcie.
Expect: as configs/plan/llama1b.py; OPT's 50272-token tied embedding (393 MiB)
and the KV reserve for its 2048 positions make the smallest layer-wise budget 1.52 GiB.
The planner's accuracy over three budgets: scripts/planner_accuracy.sh.
"""

from hetflow.planner import plan_config


def get_config(arg=None):
  del arg
  return plan_config("opt-1.3b", device="2GiB",
                     smoke={"model": {"name": "opt-tiny"}, "budget": {"device": "1MiB"},
                            "profile": "a10-pcie", "prompt_tokens": 8, "new_tokens": 4})
