"""The Triton launchers behind the CUDA kernels of the ops."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def triton_launchers(op: str) -> ModuleType:
    """mmrec_ops.triton.<op>, imported on first CUDA use (CPU-only runs never
    import Triton); a missing or broken Triton is a clear RuntimeError."""
    try:
        return importlib.import_module(f"mmrec_ops.triton.{op}")
    except ImportError as err:
        raise RuntimeError(
            f"mmrec::{op} on CUDA tensors needs a working Triton (pip install triton); importing it failed: {err}"
        ) from err
