"""Where training runs: the device of a command's --device, bf16 autocast, the sum over
torchrun processes."""

from __future__ import annotations

import torch
from torch import Tensor


class DeviceError(ValueError):
    """A --device that this machine cannot give, with the message to show."""


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of a command's --device: 'cpu', 'cuda' (GPU ``local_rank``, the
    process's under torchrun) or 'auto' (CUDA when available). The one way the
    commands and benches pick it."""
    if name not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"--device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available here")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def default_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 on a GPU that supports it; None (float32) elsewhere."""
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if gpu_bf16 else None


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s type; None: a context that changes nothing (float32)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def all_reduce_sum(value: Tensor, world_size: int) -> Tensor:
    """The sum of `value` over the torchrun processes (in place); itself in a single process."""
    if world_size > 1:
        torch.distributed.all_reduce(value)
    return value
