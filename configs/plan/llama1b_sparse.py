"""Which strategy for llama-1b-sparse (dReLU, sparsity 0.9, zipf:1.1; 4.1 GiB in float32) in 1.64 GiB of RAM.

Run:
  python -m experiments.plan --config=configs/plan/llama1b_sparse.py
  python -m experiments.plan --config=configs/plan/llama1b_sparse.py --config.profile=oneplus12-ufs4
Hardware: this machine's HardwareProfile (measured once, cached in
$HETFLOW_CACHE/hardware_profile.json, ~/.cache/hetflow by default), or a named
one. The budget is all the memory the model may use: host is 0 because on a
CPU-only machine (and on a phone) the host and device tiers are the same RAM,
so the rest must come from disk. Nothing is materialised: shapes only.
Expect: neuron_cluster with a trained predictor first (it reads only the
predicted-active, uncached neurons: ~10-20% of the FFN bytes per token),
layer-wise from disk next (it streams every non-resident layer per token,
~2.5 GB); neuron_cluster with the oracle predictor does not fit (it keeps
gate and up in memory); resident does not fit.
Note: the trained candidate's predictor lives at
$HETFLOW_CACHE/predictors/llama-1b-sparse (train it with
experiments.train_predictor before running that plan); until then plan()
sizes it at rank D/16.
"""

from hetflow.planner import plan_config


def get_config(arg=None):
  del arg
  c = plan_config("llama-1b-sparse", device="1.64GiB", host="0", run_top=2,
                  smoke={"model": {"name": "llama-tiny-sparse"}, "budget": {"device": "4MB"},
                         "profile": "oneplus12-ufs4", "prompt_tokens": 8, "new_tokens": 4})
  c.model.kwargs = dict(sparsity=0.9, hotness="zipf:1.1")
  return c
