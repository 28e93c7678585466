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


def step_shape(seq_shape) -> list:
    """Shape of one time step of a [B, T, ...] tensor: [B, ...]."""
    return [seq_shape[0], *seq_shape[2:]]
