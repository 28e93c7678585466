#!/usr/bin/env bash
# The whole test suite, after setting up, in as many pytest-xdist workers as there are
# cores. Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not install and
# not long"`, the fast subset; `-n 0` runs in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${MMREC_VENV:-.venv}/bin/python"
"$PY" -m mmrec_ops.check
"$PY" -m pytest -n auto "$@"
