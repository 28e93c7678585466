#!/usr/bin/env bash
# Trains bench/quality.py rows side by side on one GPU machine: every (arch, seed) pair
# in its own process (they share the GPU, so their tokens/s are not the model's alone),
# each row's log in DIR/<arch>-seed<S>.log, then the report of DIR.
#
#   bash scripts/quality_rows.sh DIR "mmrec transformer" "0 1 2" [run options...]
set -uo pipefail
cd "$(dirname "$0")/.."
dir=$1 archs=$2 seeds=$3
shift 3
mkdir -p "$dir"
export PYTHONUNBUFFERED=1
pids=()
for arch in $archs; do
    for seed in $seeds; do
        python3 bench/quality.py run --arch "$arch" --seed "$seed" --out "$dir" --compile "$@" \
            > "$dir/$arch-seed$seed.log" 2>&1 &
        pids+=($!)
    done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
tail -n 2 "$dir"/*.log
python3 bench/quality.py report "$dir" --out "$dir/report" > /dev/null
exit $failed
