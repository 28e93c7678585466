#!/usr/bin/env bash
# Sets up a fresh machine for MM-Rec: a virtual environment in .venv with torch,
# the package (its C++ operator library built against that torch) and the test
# dependencies. Idempotent: a second run only rebuilds what changed.
#
#   PYTHON=python3.11 bash scripts/setup.sh
#   MMREC_TORCH=2.13.0 ...   torch version to install when none is present
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${MMREC_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

"$PY" -m pip install --quiet --upgrade pip setuptools wheel ninja numpy
# torch first, from a pinned version only when there is none: the library is
# compiled against whichever torch is installed (>= 2.11).
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==${MMREC_TORCH:-2.13.0}"
fi
# No build isolation: the extension must be built against the torch above.
"$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
