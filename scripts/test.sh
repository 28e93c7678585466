#!/usr/bin/env bash
# The whole test suite, after setting up. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m "not install and not long"`, the fast subset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${MMREC_VENV:-.venv}/bin/python"
"$PY" -m mmrec_ops.check
"$PY" -m pytest "$@"
