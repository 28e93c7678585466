"""The training library beneath the command lines (`mmrec_model.pretrain`, `bench/quality.py`,
`bench/model_*.py`): the loss, the schedule, the optimizer, a training step and evaluation.

A window of bytes gives inputs x [B, T] and targets y [B, T] (y[:, t] = x[:, t + 1]); a
model maps x to logits [B, T, 256]. The loss of window b is its mean next-byte cross-entropy

    loss_b = -1/T sum_t log p(y[b, t] | x[b, :t+1])            (nats per byte)
    bits per byte = loss / ln 2                               (a token is a byte)

Training: AdamW, betas (0.9, 0.95), weight decay on matrices only; gradient-norm
clipping; a learning rate that warms up linearly for `warmup` steps, then follows a
cosine down to lr * MIN_LR_RATIO at `steps`; bf16 autocast where asked.

Models return logits [B, T, V] (a Transformer) or (logits, state) (MMRecModel); every
function here takes either.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import windows

MIN_LR_RATIO = 0.1
ADAM_BETAS = (0.9, 0.95)


def logits_of(output) -> Tensor:
    """The logits [B, T, V] of a model's output: the output itself, or the first of (logits, state)."""
    return output[0] if isinstance(output, tuple) else output


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """-log p(y[b, t]) per position, float32 [B, T], of logits [B, T, V] and targets [B, T]."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return per_token.view(targets.shape)


def next_byte_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per window, [B]: mean over its T positions of -log p(target)."""
    return token_losses(logits, targets).mean(dim=1)


def bits_per_byte(loss):
    """A loss in nats per byte (a float or a tensor) in bits per byte: loss / ln 2."""
    return loss / math.log(2)


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based):

    (step + 1) / warmup during the warmup, then
    r + (1 - r) (1 + cos(pi min(1, (step - warmup) / (steps - warmup)))) / 2,  r = MIN_LR_RATIO.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of `lr_factor`, one scheduler step per optimizer step."""
    factor = functools.partial(lr_factor, warmup=warmup, steps=steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) and none on gains and biases;
    `fused`: PyTorch's fused kernel (None: PyTorch's default)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, fused=fused)


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


def train_step(
    net: torch.nn.Module,
    inputs: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """One optimizer step on the windows inputs, targets [B, T], each read from its start:
    the forward net(inputs) under autocast, the mean of next_byte_loss, backward, the
    gradient norm clipped to `grad_clip`, then the optimizer and the scheduler step.
    Returns the loss, a detached scalar left on the device (reading it is the caller's
    host sync)."""
    with autocast(inputs.device, autocast_dtype):
        output = net(inputs)
    loss = next_byte_loss(logits_of(output), targets).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    split: Tensor,
    offsets: Tensor,
    seq_len: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean next-byte loss (nats per byte) over the windows of `seq_len` + 1 bytes of
    `split` starting at `offsets`, in eval mode (the model's mode is restored after).

    Shared among `world_size` torchrun processes: rank r takes windows r, r + world_size, ...,
    batch_size / world_size at a time (batch_size is the global batch), and the float64
    sums are all-reduced, so every rank returns the same mean.
    """
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for chunk in offsets[rank::world_size].split(batch_size // world_size):
        inputs, targets = (t.to(device) for t in windows(split, chunk, seq_len))
        with autocast(device, autocast_dtype):
            output = model(inputs)
        total += next_byte_loss(logits_of(output), targets).sum().double()
    model.train(was_training)
    return all_reduce_sum(total, world_size).item() / len(offsets)
