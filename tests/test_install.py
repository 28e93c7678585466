"""The way a user installs MM-Rec: sdist -> wheel -> a fresh venv, then the
check tool and an op from outside the repository.

Slow (the wheel compiles the C++ library once, a few minutes on 2 cores): CI
runs it; deselect it with `-m "not install"`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch

from tests.test_packaging import PACKAGE_DIR, clean_env

pytestmark = [pytest.mark.packaging, pytest.mark.install]

REPO_DIR = PACKAGE_DIR.parent
BUILD_TIMEOUT_S = 1200


def run(args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


def clean_copy(destination: Path) -> Path:
    """The repository's files (tracked, or new and not ignored), without what
    builds leave in the working tree: setuptools would reuse an old
    *.egg-info/SOURCES.txt and could put in the sdist files MANIFEST.in leaves out."""
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_DIR).stdout
    for name in filter(None, listed.split("\0")):
        if (REPO_DIR / name).is_file():  # a deleted file not yet committed is still listed
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_DIR / name, destination / name)
    return destination


def build_sdist(source: Path, out: Path) -> Path:
    """The sdist, built by setuptools' PEP 517 hook as `python -m build --sdist` would."""
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    name = run([sys.executable, "-c", code], cwd=source).stdout.strip().splitlines()[-1]
    return out / name


def fresh_venv(path: Path) -> Path:
    """A new venv (no pip) that sees this test run's torch and other
    dependencies through a .pth file, so the wheel runs against the torch it
    was built with without a second copy of torch. Returns its python."""
    run([sys.executable, "-m", "venv", "--without-pip", path], cwd=path.parent)
    python = path / "bin" / "python"
    site_packages = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=path).stdout
    Path(site_packages.strip(), "test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_sdist_builds_a_wheel_that_installs_and_runs(tmp_path):
    sdist = build_sdist(clean_copy(tmp_path / "source"), tmp_path / "sdist")
    with tarfile.open(sdist) as archive:
        members = {Path(name).relative_to(Path(name).parts[0]).as_posix() for name in archive.getnames()}
    for source in sorted((PACKAGE_DIR / "csrc").iterdir()):
        assert f"mmrec_ops/csrc/{source.name}" in members, f"{source.name} is not in the sdist"

    wheels = tmp_path / "wheels"
    build_dir = tmp_path / "build"  # nowhere near the repository, which holds a built library
    build_dir.mkdir()
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-cache-dir",
            "-w",
            wheels,
            sdist,
        ],
        cwd=build_dir,
        timeout=BUILD_TIMEOUT_S,
    )
    (wheel,) = wheels.glob("mmrec-*.whl")

    python = fresh_venv(tmp_path / "venv")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = run([python.parent / "mmrec-check", "--json"], cwd=elsewhere)
    assert '"ok": true' in check.stdout
    code = """
import torch, mmrec_ops
from mmrec_ops.reference import scan_reference
gamma, x = torch.rand(2, 50, 3, dtype=torch.float64), torch.randn(2, 50, 3, dtype=torch.float64)
print(mmrec_ops.__file__)
print(torch.__version__, mmrec_ops._C.built_with_torch)
print(float((mmrec_ops.scan(gamma, x) - scan_reference(gamma, x)).abs().max()))
"""
    module_file, versions, error = run([python, "-c", code], cwd=elsewhere).stdout.split("\n")[:3]
    assert Path(module_file).is_relative_to(tmp_path / "venv"), module_file
    assert versions.split() == [torch.__version__, torch.__version__]
    assert float(error) < 1e-12
