#!/usr/bin/env bash
# The headline measurements, one after another on a quiet machine (each system
# of each benchmark also runs in its own fresh process). Results land in
# $OUT/<name>/results.{json,md} and are copied into WORKSPACE_NOTES.md by hand,
# with the command and the prediction made before the run.
#
#   bash scripts/final_benchmarks.sh /tmp/final [names...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/final}; shift || true
NAMES=${*:-"profile resident sparse 3gib plan"}
mkdir -p "$OUT"
for name in $NAMES; do
  echo "=== $name $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
  case $name in
    profile) python -m experiments.profile_hardware --workdir="$OUT/profile" \
               --out="${HETFLOW_CACHE:-$HOME/.cache/hetflow}/hardware_profile.json" ;;
    resident|disk|half|3gib|sparse)
      config=configs/bench/llama1b_$name.py
      python -m experiments.benchmark --config="$config" --workdir="$OUT/$name" ;;
    plan) python -m experiments.plan --config=configs/plan/llama1b.py --config.run=true \
            --workdir="$OUT/plan" ;;
  esac 2>&1 | grep -v -E "libtpu|TPU" | tee "$OUT/$name.log" | tail -40
done
