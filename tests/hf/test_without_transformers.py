"""Without transformers installed, mmrec_model imports as before and mmrec-export says what to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.pretrain.cli import environment, run_module

pytestmark = [pytest.mark.hf, pytest.mark.packaging]

# A sitecustomize that makes transformers look uninstalled (None in sys.modules stops its import).
NO_TRANSFORMERS = """
import sys

sys.modules["transformers"] = None
"""


@pytest.fixture
def without_transformers(tmp_path) -> dict:
    (tmp_path / "sitecustomize.py").write_text(NO_TRANSFORMERS)
    env = environment()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    return env


def test_package_imports_without_registering(tmp_path, without_transformers):
    code = "import sys, mmrec_model; print(sorted(name for name in sys.modules if 'hf' in name.split('.')))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=without_transformers, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_export_names_the_extra_to_install(tmp_path, without_transformers):
    result = run_module("mmrec_model.export", [tmp_path / "run", tmp_path / "out"], tmp_path, env=without_transformers)
    assert result.returncode == 1
    assert result.stderr.startswith("mmrec-export: error: needs transformers") and result.stderr.count("\n") == 1
    assert 'pip install "mmrec[hf]"' in result.stderr
