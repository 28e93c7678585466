import importlib
import os

import pytest


@pytest.fixture(scope="module")
def interpreted(request):
    """The package's Triton launchers of the test module's op (its OP), running
    in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the Triton interpreter is not enabled"
    return importlib.import_module(f"mmrec_ops.triton.{request.module.OP}")
