#!/usr/bin/env bash
# The whole test suite, after setting up. Extra arguments go to pytest
# (e.g. `bash scripts/test.sh -m ops`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m mmrec_ops.check
.venv/bin/python -m pytest "$@"
