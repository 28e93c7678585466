#!/usr/bin/env bash
# The README's first command: set up this machine (.venv, torch, the operator
# library), report the library's status, then pretrain the `tiny` MM-Rec model
# on the Python standard library's source (byte-level, no download) on the CPU.
# It shows a progress bar and the training and validation loss falling (bits
# per byte), and leaves a checkpoint, metrics.jsonl, loss.png and a generated
# sample in runs/tiny-<date>-<time>/.
#
#   bash scripts/demo.sh                  # the demo: the command's defaults
#   bash scripts/demo.sh --steps 3000     # extra arguments go to mmrec_model.pretrain
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${MMREC_VENV:-.venv}/bin/python"
"$PY" -m mmrec_ops.check
exec "$PY" -m mmrec_model.pretrain --preset tiny "$@"
