#!/usr/bin/env bash
# Issue 6's accuracy check: the planner's top plans for three models at three
# budgets each, run for real (experiments.plan --config.run=true) next to their
# predictions. Run on a quiet machine, after `python -m experiments.profile_hardware`;
# each model's decode costs are calibrated once on first use. Prints one table
# of every plan's predicted and measured decode tok/s.
#
#   bash scripts/planner_accuracy.sh /tmp/planacc [model ...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/planacc}; shift || true
MODELS=${*:-"llama1b opt1b llama1b_sparse"}
declare -A BUDGETS=(
  [llama1b]="1GiB 2GiB 3GiB"                 # host unlimited: tensor_split and host tiers run
  [opt1b]="2GiB 2.75GiB 3.5GiB"
  [llama1b_sparse]="1.64GiB 2GiB 2.5GiB"     # host 0: all the model's RAM is the budget
)
mkdir -p "$OUT"
for model in $MODELS; do
  for budget in ${BUDGETS[$model]}; do
    dir="$OUT/$model-$budget"
    echo "=== $model $budget $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
    python -m experiments.plan --config="configs/plan/$model.py" --config.budget.device="$budget" \
      --config.new_tokens=10 --config.run=true --workdir="$dir" 2>&1 \
      | grep -v -E "libtpu|TPU" > "$dir.log"
    grep -E "^\| (plan|.*\|.*%)" "$dir.log"
  done
done
python - "$OUT" <<'PY'
import glob, json, os, sys
rows = ["| model | budget | plan | predicted tok/s | measured tok/s | error | disk probed GB/s"
        " | error at that disk rate |", "|---|---|---|---|---|---|---|---|"]
errors, errors_at_disk = [], []
pct = lambda e: "" if e is None else f"{e:+.0%}"
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*", "plan.json"))):
  s = json.load(open(path))
  for r in s["compared"]:
    got = r["measured_decode_tok_s"]
    if r["error"] is not None:
      errors.append(abs(r["error"]))
      errors_at_disk.append(abs(r["error_at_probed_disk"]))
    rows.append(f"| {s['model']} | {s['budget']} | {r['plan']} | {r['predicted_decode_tok_s']:.3f}"
                f" | {'failed' if got is None else f'{got:.3f}'} | {pct(r['error'])}"
                f" | {r['disk_probed_bytes_per_s'] / 1e9:.2f} | {pct(r['error_at_probed_disk'])} |")
print("\n".join(rows))
for name, errs in (("as predicted", errors), ("at the disk rate probed in the run", errors_at_disk)):
  if errs:
    print(f"{name}: {sum(e <= 0.2 for e in errs)} of {len(errs)} plans within 20%;"
          f" worst {max(errs):.0%}")
PY
