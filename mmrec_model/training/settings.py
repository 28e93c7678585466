"""TrainSettings: how a model is trained, the settings `pretrain` and `bench.quality` share."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


class SettingsError(ValueError):
    """Settings that cannot train, with a message naming the option."""


def option(name: str) -> str:
    """The command-line option of a settings field: 'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


def check_finite(settings) -> None:
    """A SettingsError naming the first float option (of any settings dataclass) that is
    NaN or infinite: no size check catches NaN (every comparison with it is false)."""
    for field in fields(settings):
        value = getattr(settings, field.name)
        if "float" in str(field.type) and isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{option(field.name)}: expected a finite number, got {value}")


@dataclass
class TrainSettings:
    """How a model is trained (a command's options, one field each; a command's own
    settings subclass it, with defaults of their own).

    steps optimizer steps, each on batch_size windows of seq_len bytes; AdamW at peak
    learning rate lr with weight_decay on matrices, the gradient norm clipped to grad_clip;
    the learning rate warms up linearly for `warmup_steps` (warmup; None: steps / 20) and
    then falls by a cosine to lr * MIN_LR_RATIO at `steps`. log_every: steps per point of
    the training curve; compile: train through torch.compile; device: where.

    The defaults are pretrain's demo: `tiny` on 2 CPU cores, 1200 steps of 8 x 256 bytes
    (among the learning rates, batch shapes and modes tried for a run of a few minutes,
    this gave the lowest validation loss; its time is in the README).
    """

    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 5e-3
    warmup: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    compile: bool = False
    device: str = "auto"

    @property
    def warmup_steps(self) -> int:
        return self.steps // 20 if self.warmup is None else self.warmup

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def check(self) -> None:
        """A SettingsError naming the first option whose value cannot train."""
        check_finite(self)
        for name in ("steps", "batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{option(name)}: expected a positive integer, got {getattr(self, name)}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{option(name)}: expected a positive number, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise SettingsError(f"--weight-decay: expected a number >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise SettingsError(f"--warmup: expected 0 .. --steps ({self.steps}), got {self.warmup_steps}")
