#!/usr/bin/env bash
# The main job: set up, show the library's status, run a scan demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m mmrec_ops.check
.venv/bin/python examples/scan_demo.py
