"""Loading the compiled library, the mandatory-library rule, the check tool."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmrec_ops
from mmrec_ops import _library

pytestmark = pytest.mark.packaging

PACKAGE_DIR = Path(mmrec_ops.__file__).parent


def clean_env(**extra) -> dict:
    """The environment without any library-path or preload tricks."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH")}
    env.update(extra)
    return env


def run_python(args, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_in_fresh_process_without_ld_library_path(tmp_path):
    code = "import torch, mmrec_ops; print(mmrec_ops.cumprod(torch.full((1, 3, 2), 0.5))[0, :, 0].tolist())"
    result = run_python(["-c", code], cwd=tmp_path, env=clean_env(PYTHONPATH=str(PACKAGE_DIR.parent)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[0.5, 0.25, 0.125]"


# An editable install's import hook would still find mmrec_ops._C in the
# working tree for a copy of the package; this drops it, so that the copy is
# truly without a library.
DROP_EDITABLE_FINDER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
"""


@pytest.fixture
def package_without_library(tmp_path) -> Path:
    """A folder holding a copy of the mmrec_ops sources with no compiled library in it."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "mmrec_ops", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (tmp_path / "sitecustomize.py").write_text(DROP_EDITABLE_FINDER)
    return tmp_path


def test_missing_library_raises_import_error_with_build_instructions(package_without_library):
    env = clean_env(PYTHONPATH=str(package_without_library))
    result = run_python(["-c", "import mmrec_ops"], cwd=package_without_library, env=env)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "could not be loaded" in result.stderr
    assert f"{sys.executable} setup.py build_ext --inplace" in result.stderr


def test_check_tool_reports_missing_library_with_exit_status_1(package_without_library):
    env = clean_env(PYTHONPATH=str(package_without_library))
    result = run_python(["-m", "mmrec_ops.check", "--json"], cwd=package_without_library, env=env)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["library"]["loaded"] is False
    assert report["ok"] is False
    assert any("not loaded" in problem for problem in report["problems"])
    assert not report["ops"]["scan"]["CPU"]


def test_check_tool_reports_library_and_dispatch_keys(tmp_path):
    result = run_python(
        ["-m", "mmrec_ops.check", "--json"], cwd=tmp_path, env=clean_env(PYTHONPATH=str(PACKAGE_DIR.parent))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    library = report["library"]
    assert library["loaded"] and report["ok"]
    path = Path(library["path"])
    assert path == Path(mmrec_ops._C.__file__)
    assert library["size_bytes"] == path.stat().st_size
    assert library["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert library["built_with_torch"] == torch.__version__
    assert library["built_version"] == mmrec_ops.__version__
    for op in ("scan", "scan_backward"):
        assert all(report["ops"][op][key] for key in ("CPU", "CUDA", "Meta", "Autograd")), report["ops"][op]


def test_check_tool_human_readable(tmp_path):
    result = run_python(["-m", "mmrec_ops.check"], cwd=tmp_path, env=clean_env(PYTHONPATH=str(PACKAGE_DIR.parent)))
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ("mmrec_ops._C", "loaded", "SHA256", "mmrec::scan", "mmrec::scan_backward", "OK"):
        assert text in result.stdout


def another_torch(minor_step: int = 0, patch_step: int = 0) -> str:
    """A torch version next to the running one: minor or patch level moved."""
    major, minor, patch = (int(part) for part in torch.__version__.split("+")[0].split(".")[:3])
    return f"{major}.{minor + minor_step}.{patch + patch_step}"


def assert_names_versions_and_commands(message: str, built: str, running: str) -> None:
    assert f"built with torch {built}" in message
    assert f"runs torch {running}" in message
    assert (
        f"{sys.executable} -m pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir mmrec-"
        in message
    )
    assert f"cd {PACKAGE_DIR.parent} && {sys.executable} -m pip install --no-build-isolation -e ." in message
    assert f"{sys.executable} -m pip install setuptools wheel ninja" in message  # what a bare venv lacks


def test_library_records_the_torch_it_was_built_with():
    path = Path(mmrec_ops._C.__file__)
    assert mmrec_ops._C.built_with_torch == torch.__version__
    assert _library.recorded_torch_version(path) == torch.__version__


def test_torch_version_comparison(recwarn):
    _library.check_torch_version("2.13.0+cpu", "2.13.0+cpu")
    assert not recwarn.list
    with pytest.raises(ImportError) as raised:
        _library.check_torch_version("2.14.1+cu130", "2.13.0+cpu")
    assert_names_versions_and_commands(str(raised.value), "2.14.1+cu130", "2.13.0+cpu")
    with pytest.raises(ImportError, match="built with torch 3.13.0"):
        _library.check_torch_version("3.13.0", "2.13.0")
    for built in ("2.13.1+cpu", "2.13.0+cu130", "2.13.0"):
        with pytest.warns(RuntimeWarning) as warned:
            _library.check_torch_version(built, "2.13.0+cpu")
        assert_names_versions_and_commands(str(warned[0].message), built, "2.13.0+cpu")


def import_with_torch_version(version: str, tmp_path) -> subprocess.CompletedProcess:
    """Imports mmrec_ops in a fresh process whose torch reports `version`."""
    code = f"import torch; torch.__version__ = {version!r}; import mmrec_ops; print('imported')"
    return run_python(["-c", code], cwd=tmp_path, env=clean_env(PYTHONPATH=str(PACKAGE_DIR.parent)))


def test_import_with_another_minor_torch_raises(tmp_path):
    running = another_torch(minor_step=-1)
    result = import_with_torch_version(running, tmp_path)
    assert result.returncode != 0 and "imported" not in result.stdout
    assert "ImportError" in result.stderr
    assert_names_versions_and_commands(result.stderr, torch.__version__, running)


def test_import_with_another_patch_level_warns(tmp_path):
    running = another_torch(patch_step=1)
    result = import_with_torch_version(running, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout
    assert "RuntimeWarning" in result.stderr
    assert_names_versions_and_commands(result.stderr, torch.__version__, running)


# Makes `import mmrec_ops._C` fail as a library built with another torch does
# when loaded: dlopen reports a libtorch symbol it cannot find.
UNDEFINED_SYMBOL_ON_LOAD = """
import sys

class UndefinedSymbol:
    def find_spec(self, name, path=None, target=None):
        if name == "mmrec_ops._C":
            import mmrec_ops._library as lib
            library = str(lib.library_candidates()[0])
            raise ImportError(library + ": undefined symbol: _ZNR5torch7Library4_defEOS0_", name=name, path=library)
        return None

sys.meta_path.insert(0, UndefinedSymbol())
"""


def test_undefined_symbol_at_load_is_explained(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(UNDEFINED_SYMBOL_ON_LOAD)
    env = clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(PACKAGE_DIR.parent)]))
    result = run_python(["-c", "import mmrec_ops"], cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "undefined symbol: _ZNR5torch7Library4_def" in result.stderr
    # The version is read from the library file, which did not load.
    assert_names_versions_and_commands(result.stderr, torch.__version__, torch.__version__)


def test_check_tool_reads_the_torch_of_a_library_that_did_not_load(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(UNDEFINED_SYMBOL_ON_LOAD)
    env = clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(PACKAGE_DIR.parent)]))
    result = run_python(["-m", "mmrec_ops.check"], cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "mmrec_ops._C        NOT LOADED" in result.stdout
    assert f"  built with torch  {torch.__version__}\n" in result.stdout
