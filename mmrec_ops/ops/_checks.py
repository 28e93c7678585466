"""Argument checks for the Python-side kernels (fake and CUDA).

They mirror csrc/common.h word for word, so an error reads the same whichever
kernel raised it: ValueError for a wrong dtype, device or shape.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_floating(t: Tensor, op: str, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: expected {name} to be float32, float64, bfloat16 or float16, got {t.dtype}")


def check_like(t: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: expected {name} to have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: expected {name} to be on the device of {ref_name} ({ref.device}), got {t.device}")


def check_shape(t: Tensor, expected, op: str, name: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: expected {name} of shape {list(expected)}, got {list(t.shape)}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a read's scores, sums and lse accumulate in for q's dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_read_outputs(op: str, q: Tensor, grad_out: Tensor, out: Tensor, grad_lse: Tensor, lse: Tensor) -> None:
    """A read's backward: its saved out and lse, and their upstream gradients, match q
    ``[B, T, H, d]`` (out ``[B, T, H, d]`` in q's dtype, lse ``[B, H, T]`` in
    ``accumulation_dtype``)."""
    B, T, H, _ = q.shape
    for name, t in (("grad_out", grad_out), ("out", out)):
        check_like(t, q, op, name, "q")
        check_shape(t, q.shape, op, name)
    for name, t in (("grad_lse", grad_lse), ("lse", lse)):
        if t.dtype != accumulation_dtype(q.dtype) or t.device != q.device:
            raise ValueError(
                f"{op}: expected {name} in {accumulation_dtype(q.dtype)} on {q.device}, got {t.dtype} on {t.device}"
            )
        check_shape(t, (B, H, T), op, name)


def step_shape(seq_shape) -> list:
    """Shape of one time step of a [B, T, ...] tensor: [B, ...]."""
    return [seq_shape[0], *seq_shape[2:]]
