"""TrainSettings: how a model is trained, the settings `pretrain` and `bench.quality` share."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


class SettingsError(ValueError):
    """Settings that cannot train, with a message naming the option."""


def option(name: str) -> str:
    """The command-line option of a settings field: 'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


# The final phase's options, as every command's --help gives them.
FINAL_PHASE_HELP = {
    "final_steps": "N: the last N steps read windows of --final-seq-len bytes, the same bytes a step "
    "(a long-window phase at the end, as long-context pretraining ends); 0: none",
    "final_seq_len": "bytes per training window of the last --final-steps steps "
    "(a divisor of --batch-size x --seq-len)",
}


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

    A final phase of long windows (final_steps > 0): the last final_steps steps read
    batch_size * seq_len / final_seq_len windows of final_seq_len bytes instead, the same
    bytes a step, as long-context pretraining ends: what a memory beyond the training
    window can learn to keep, it learns where the windows are long.

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
    final_steps: int = 0
    final_seq_len: int | None = None

    @property
    def warmup_steps(self) -> int:
        return self.steps // 20 if self.warmup is None else self.warmup

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def step_windows(self, step: int) -> tuple[int, int]:
        """(windows, bytes a window) of the global batch of step `step`: batch_size x seq_len,
        or in the last final_steps steps batch_size * seq_len / final_seq_len x final_seq_len."""
        if not self.final_steps or step < self.steps - self.final_steps:
            return self.batch_size, self.seq_len
        return self.tokens_per_step // self.final_seq_len, self.final_seq_len

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
        self.check_final_phase()

    def check_final_phase(self) -> None:
        if not 0 <= self.final_steps <= self.steps:
            raise SettingsError(f"--final-steps: expected 0 to --steps ({self.steps}), got {self.final_steps}")
        if self.final_steps and (
            self.final_seq_len is None or self.final_seq_len < 1 or self.tokens_per_step % self.final_seq_len
        ):
            raise SettingsError(
                f"--final-seq-len: expected a divisor of --batch-size x --seq-len ({self.tokens_per_step}) with "
                f"--final-steps, got {self.final_seq_len}"
            )
