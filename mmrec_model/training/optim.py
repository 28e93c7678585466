"""The loss, the learning-rate schedule, the optimizer and one training step.

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

from ..model import MMRecModel
from .device import autocast

MIN_LR_RATIO = 0.1
ADAM_BETAS = (0.9, 0.95)


def window_logits(net: torch.nn.Module, inputs: Tensor, starts: Tensor | None = None) -> Tensor:
    """The logits [B, T, V] of windows inputs [B, T] read from their start through `net` (a
    model, or a DDP or compiled wrapper of it): an MMRecModel is asked not to build the state
    it would return (its long-term store), which training and validation never read; any other
    model's output is its logits, or a tuple whose first is. `starts` [B, T] bool (None:
    none): the inputs that begin a document, read from an empty state (MMRecModel only)."""
    model = getattr(net, "module", net)
    if isinstance(getattr(model, "_orig_mod", model), MMRecModel):
        if starts is None:
            return net(inputs, return_state=False)[0]
        return net(inputs, return_state=False, starts=starts)[0]
    if starts is not None:
        raise ValueError(
            f"window_logits: starts (documents read from an empty state) needs an MMRecModel, "
            f"got a {type(getattr(model, '_orig_mod', model)).__name__}"
        )
    output = net(inputs)
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


# What AdamW keeps per parameter: the step count and the two moments, each of the
# parameter's shape.
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def optimizer_state_problem(saved: dict, optimizer: torch.optim.Optimizer) -> str | None:
    """What in `saved`, an AdamW state_dict read from a checkpoint, does not fit
    `optimizer` (make_optimizer's, for the same model): a state of a parameter it does
    not have, or one without the step count and moments of the parameter's shape and
    dtype; or None. Checked before loading: AdamW would fail only at its next step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    states = saved.get("state")
    if not isinstance(states, dict):
        return "optimizer.state: expected a dict of the parameters' states"
    for index, state in states.items():
        where = f"optimizer.state[{index!r}]"
        if type(index) is not int or not 0 <= index < len(params):
            return f"{where}: no such parameter (the model has {len(params)})"
        if not isinstance(state, dict) or sorted(state) != sorted(ADAM_STATE):
            return f"{where}: expected AdamW's {', '.join(ADAM_STATE)}"
        param = params[index]
        step = state["step"]
        if not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point()):
            return f"{where}.step: expected a float tensor of one element"
        for name in ADAM_STATE[1:]:
            moment = state[name]
            if not (isinstance(moment, torch.Tensor) and moment.shape == param.shape and moment.dtype == param.dtype):
                return f"{where}.{name}: expected a {param.dtype} tensor of the parameter's shape {list(param.shape)}"
    return None


def train_step(
    net: torch.nn.Module,
    inputs: Tensor,
    targets: Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
    autocast_dtype: torch.dtype | None = None,
    starts: Tensor | None = None,
) -> Tensor:
    """One optimizer step on the windows inputs, targets [B, T], each read from its start
    (and from each document's start, `starts`: window_logits'): the forward net(inputs)
    under autocast, the mean of next_byte_loss, backward, the gradient norm clipped to
    `grad_clip`, then the optimizer and the scheduler step. Returns the loss, a detached
    scalar left on the device (reading it is the caller's host sync)."""
    with autocast(inputs.device, autocast_dtype):
        logits = window_logits(net, inputs, starts)
    loss = next_byte_loss(logits, targets).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.detach()
