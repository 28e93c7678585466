"""Finding and loading the compiled operator library, mmrec_ops._C.

The library is mandatory: without it there is no torch.ops.mmrec.* and no
silent fallback to Python. Importing mmrec_ops without it raises an
ImportError that says how to build it. The library records the torch it was
built with; a library built with another torch raises ImportError (another
minor version, or a symbol missing at load) or warns (another patch level),
naming both versions and the rebuild commands. The one exception is the status
report (`python -m mmrec_ops.check` / `mmrec-check`), which must run to say
what is missing or mismatched.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys
import warnings
from pathlib import Path

from ._version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
# How csrc/ops.cpp tags the torch version in the library file.
TORCH_TAG = re.compile(rb"mmrec-built-with-torch:([^\x00]+)\x00")


def rebuild_commands() -> str:
    """The commands that rebuild the library against the torch of this Python."""
    python = sys.executable
    checkout = REPO_DIR if (REPO_DIR / "setup.py").is_file() else "<your MM-Rec source checkout>"
    return f"""\
Rebuild it against the torch installed for this Python ({python}):
  first, in a virtual environment without the build tools (pip then fails with
  "invalid command 'bdist_wheel'"):
      {python} -m pip install setuptools wheel ninja
  installed package (from its sdist, or the source folder it was installed from):
      {python} -m pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir mmrec-{__version__}.tar.gz
  source checkout:
      cd {checkout} && {python} -m pip install --no-build-isolation -e .
  or, in the checkout, without pip:
      {python} setup.py build_ext --inplace
--no-build-isolation makes pip compile against this torch, not a torch it fetches into
a temporary build environment. Then run `{python} -m mmrec_ops.check` to see the status."""


def build_help() -> str:
    """The ImportError message when there is no library to load."""
    return f"MM-Rec's compiled operator library (mmrec_ops._C) could not be loaded.\n{rebuild_commands()}"


def torch_mismatch_message(built: str, running: str) -> str:
    return (
        f"MM-Rec's compiled operator library (mmrec_ops._C) was built with torch {built}, "
        f"but this Python runs torch {running}: a C++ extension works only with the torch "
        f"it was compiled against.\n{rebuild_commands()}"
    )


def major_minor(version: str) -> tuple[str, ...]:
    """("2", "13") of "2.13.0+cpu": torch keeps its C++ ABI only within a minor release."""
    return tuple(version.split("+")[0].split(".")[:2])


def check_torch_version(built: str, running: str) -> None:
    """Compares the torch the library was built with against the running one.

    Raises ImportError when the major or minor versions differ (the library
    may load and then misbehave); warns when only the patch level or the local
    build tag (+cpu, +cu130) differs; silent when they are equal.
    """
    if built == running:
        return
    if major_minor(built) != major_minor(running):
        raise ImportError(torch_mismatch_message(built, running))
    warnings.warn(torch_mismatch_message(built, running), RuntimeWarning, stacklevel=2)


def recorded_torch_version(path: Path) -> str | None:
    """The torch version tagged in the library file, read without loading it."""
    match = TORCH_TAG.search(path.read_bytes())
    return match.group(1).decode() if match else None


def load_failure_message(err: ImportError, running: str) -> str:
    """Explains why `import mmrec_ops._C` failed. A symbol missing at load time
    means the library was built with another torch (its C++ API differs)."""
    if "undefined symbol" not in str(err):
        return build_help()
    path = Path(err.path) if err.path else next(iter(library_candidates()), None)
    built = recorded_torch_version(path) if path is not None and path.is_file() else None
    return f"{torch_mismatch_message(built or 'an unknown version', running)}\n(Loading {path} failed: {err})"


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

    Raises ImportError when the library is missing, fails to load or was built
    with another minor version of torch; warns when only the patch level of
    torch differs. Inside the status report it returns None instead of raising
    (the error kept in LOAD_ERROR) and leaves the version comparison to it.
    """
    global LOAD_ERROR
    import torch  # libtorch must be in the process before _C loads

    try:
        from . import _C
    except ImportError as err:
        LOAD_ERROR = f"{type(err).__name__}: {err}"
        if status_report_requested():
            return None
        raise ImportError(load_failure_message(err, torch.__version__)) from err
    if not status_report_requested():
        check_torch_version(_C.built_with_torch, torch.__version__)
    return _C


LOAD_ERROR: str | None = None
