"""Finding and loading the compiled operator library, mmrec_ops._C.

The library is mandatory: without it there is no torch.ops.mmrec.* and no
silent fallback to Python. Importing mmrec_ops without it raises an
ImportError that says how to build it. The one exception is the status report
(`python -m mmrec_ops.check` / `mmrec-check`), which must run to say what is
missing.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent

BUILD_HELP = f"""\
MM-Rec's compiled operator library (mmrec_ops._C) could not be loaded.
Build it against the installed torch, from {REPO_DIR}:

    python -m pip install --no-build-isolation -e .
or
    python setup.py build_ext --inplace

then run `python -m mmrec_ops.check` to see its status."""


def library_candidates() -> list[Path]:
    """Files that `import mmrec_ops._C` would consider, in the package folder."""
    return sorted(
        PACKAGE_DIR / name
        for name in os.listdir(PACKAGE_DIR)
        if name.startswith("_C.") and name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    )


def status_report_requested() -> bool:
    """True when this process is the status report, which runs without the library."""
    argv = getattr(sys, "orig_argv", sys.argv)
    return "mmrec_ops.check" in argv or Path(sys.argv[0]).name == "mmrec-check"


def load_library():
    """Imports mmrec_ops._C (registering torch.ops.mmrec.*) and returns it.

    Returns None instead of raising only inside the status report; the error is
    kept in LOAD_ERROR for it.
    """
    global LOAD_ERROR
    import torch  # noqa: F401  (libtorch must be in the process before _C loads)

    try:
        from . import _C
    except ImportError as err:
        LOAD_ERROR = f"{type(err).__name__}: {err}"
        if status_report_requested():
            return None
        raise ImportError(BUILD_HELP) from err
    return _C


LOAD_ERROR: str | None = None
