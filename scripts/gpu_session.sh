#!/usr/bin/env bash
# One call on a lent GPU machine: build, report, test (gpu and triton markers),
# benchmark. Results go to $OUT (or ./gpu-out). Wheels of missing packages
# (expecttest, peers for the benchmark) are installed from .whl/ when present.
#
#   bash scripts/gpu_session.sh [pytest -k expression]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 -m mmrec_ops.check | tee "$OUT/check.txt"
python3 -m pytest -q -x -m "gpu or triton" -p no:cacheprovider ${1:+-k "$1"} 2>&1 | tail -25 | tee "$OUT/tests.txt"
python3 -m bench.scan --device cuda --out "$OUT/scan_cuda" 2>"$OUT/bench.log"
