#!/usr/bin/env bash
# Trains bench.quality rows side by side on one GPU machine: every (arch, seed) pair
# (each arch with each seed, or an ARCH:SEED item alone)
# in its own process (they share the GPU, so their tokens/s are not the model's alone),
# each row's log in LOGS/<arch>-seed<S>.log (LOGS defaults to DIR), then the report of
# DIR. A row is written when it finishes, so a call cut short keeps the finished ones.
#
#   bash scripts/quality_rows.sh DIR "mmrec transformer" "0 1 2" [run options...]
#   LOGS=/tmp/logs bash scripts/quality_rows.sh "$OUT" "mmrec-no-longterm" "0 1"
#   bash scripts/quality_rows.sh DIR "mmrec-no-recurrence:1 transformer-window:2" ""   # ARCH:SEED pairs

set -uo pipefail
cd "$(dirname "$0")/.."
dir=$1 archs=$2 seeds=$3
shift 3
logs=${LOGS:-$dir}
mkdir -p "$dir" "$logs"
export PYTHONUNBUFFERED=1
rows=()
for item in $archs; do
    if [[ $item == *:* ]]; then rows+=("$item"); else for seed in $seeds; do rows+=("$item:$seed"); done; fi
done
pids=()
for row in "${rows[@]}"; do
    arch=${row%%:*} seed=${row#*:}
    python3 -m bench.quality run --arch "$arch" --seed "$seed" --out "$dir" --compile "$@" \
        > "$logs/$arch-seed$seed.log" 2>&1 &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
tail -n 2 "$logs"/*.log
python3 -m bench.quality report "$dir" --out "$logs/report"
exit $failed
