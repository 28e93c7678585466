#!/usr/bin/env bash
# Sets up a fresh machine for MM-Rec: a virtual environment in .venv with torch,
# the package installed editable from this checkout (its C++ operator library
# built against that torch) and the test dependencies. A second run reuses the
# built library unless it is out of date (see library_is_current).
#
#   PYTHON=python3.11 bash scripts/setup.sh
#   MMREC_TORCH=2.13.0 ...   torch version to install when none is present
#   MMREC_VENV=/tmp/venv ... the virtual environment's folder (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${MMREC_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

# True when the package is installed editable from this checkout, with the
# unconditional requirements of its `test` extra and of the extras of the
# package that it names (`mmrec[hf]`).
installed_here() {
    "$PY" - "$PWD" <<'EOF'
import json
import re
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

try:
    dist = metadata.distribution("mmrec")
except metadata.PackageNotFoundError:
    sys.exit(1)
origin = json.loads(dist.read_text("direct_url.json") or "{}")
url = urlparse(origin.get("url", ""))
if url.scheme != "file" or not origin.get("dir_info", {}).get("editable"):
    sys.exit(1)
if Path(unquote(url.path)).resolve() != Path(sys.argv[1]).resolve():
    sys.exit(1)


def requirements_of(extra):
    """The requirements of an extra with no other condition (a platform's, say)."""
    only = re.compile(rf';\s*extra\s*==\s*"{extra}"\s*$')
    return [requirement for requirement in dist.requires or [] if only.search(requirement)]


requirements = requirements_of("test")
for requirement in list(requirements):
    own_extras = re.match(r"mmrec\[([^\]]+)\]", requirement)
    if own_extras:
        requirements += [r for extra in own_extras.group(1).split(",") for r in requirements_of(extra.strip())]
for requirement in requirements:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
EOF
}

# True when the built library is newer than every input of its build and was
# built against the installed torch (as `python -m mmrec_ops.check` reports).
library_is_current() {
    local libraries=(mmrec_ops/_C*.so) report
    [ -f "${libraries[0]}" ] || return 1
    [ -z "$(find mmrec_ops/csrc setup.py pyproject.toml -newer "${libraries[0]}" -print -quit)" ] || return 1
    # The report's exit status also counts what the library does not decide (Triton).
    report=$("$PY" -m mmrec_ops.check --json 2>/dev/null || true)
    "$PY" -c '
import json, sys
try:
    report = json.loads(sys.argv[1])
except ValueError:
    sys.exit(1)
library = report["library"]
sys.exit(0 if library["loaded"] and library["built_with_torch"] == report["torch_version"] else 1)' "$report"
}

"$PY" -m pip install --quiet --upgrade pip setuptools wheel ninja numpy
# torch first, from a pinned version only when there is none: the library is
# compiled against whichever torch is installed (>= 2.11).
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==${MMREC_TORCH:-2.13.0}"
fi
if installed_here && library_is_current; then
    echo "setup: mmrec is installed from this checkout and its library is up to date; not rebuilt"
else
    # No build isolation: the extension must be built against the torch above.
    # pip builds in a fresh temporary folder, so this compiles the whole library.
    "$PY" -m pip install --quiet --no-build-isolation -e ".[test]"
fi
