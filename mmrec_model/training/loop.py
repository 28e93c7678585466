"""The training loop: a Trainer holds a model in training (its AdamW, schedule, step and
progress) and runs its optimizer steps, with the clocks, the hooks of the command that
drives it and its checkpoints (checkpoint.py's format), from which it resumes exactly.

Step s trains on the batch the caller gives for s (the data position is the step, see
data.py); a resumed run loads the weights, the optimizer and scheduler states, the
progress and the random generators' states, and goes on as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch import Tensor

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    fields_problem,
    restore_rng_states,
    rng_states,
    state_difference,
)
from .optim import make_optimizer, make_scheduler, optimizer_state_problem, train_step
from .settings import TrainSettings

# Inputs and targets [B, T], and optionally the inputs that begin a document [B, T] bool.
Batch = tuple[Tensor, ...]


@dataclasses.dataclass
class Progress:
    """What training has measured so far: the loss of every step (float32, on the CPU) and
    the clocks: train_s, the time of all steps; first_step_s, the first one's (it compiles);
    steady_s and steady_steps, the time and count of the steps that compiled nothing (all
    but the first of each call of Trainer.train and those whose batch shape is new)."""

    losses: Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))
    train_s: float = 0.0
    first_step_s: float | None = None
    steady_s: float = 0.0
    steady_steps: int = 0

    def tokens_per_s(self, tokens_per_step: int) -> float | None:
        """Training tokens per second of the steady steps (None before there is one)."""
        return self.steady_steps * tokens_per_step / self.steady_s if self.steady_steps else None


def synchronize(device: torch.device | str) -> None:
    """Waits for the GPU's queued work (the CPU's is done on return): a clock reads after it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device`; to a GPU through pinned memory, so that the host does not wait
    for the GPU's queue (a pageable copy would)."""
    if device.type != "cuda":
        return batch
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


class Clocks:
    """The clocks of one call of Trainer.train, added to its Progress. The steady clock
    stops before a step that compiles and starts again after it; nothing is read back from
    the GPU but when a clock is read."""

    def __init__(self, progress: Progress, device: torch.device, first_step: int):
        self.progress, self.device = progress, device
        self.started = self.steady_started = time.perf_counter()
        self.steady_from = first_step + 1  # a call's first step compiles

    def hold(self, step: int) -> float:
        """Adds the steady steps before `step` and their time to the progress; returns the time now."""
        synchronize(self.device)
        now = time.perf_counter()
        self.progress.steady_s += now - self.steady_started
        self.progress.steady_steps += step - self.steady_from
        self.steady_started, self.steady_from = now, step
        return now

    def compiled(self, step: int) -> None:
        """Step `step` compiled: the steady clock starts after it."""
        synchronize(self.device)
        self.steady_started, self.steady_from = time.perf_counter(), step + 1
        if self.progress.first_step_s is None:
            self.progress.first_step_s = self.steady_started - self.started

    def take_stock(self, done: int) -> None:
        """Adds the time and the steady steps up to `done` steps to the progress."""
        now = self.hold(done)
        self.progress.train_s += now - self.started
        self.started = now

    def tokens_per_s(self, done: int, tokens_per_step: int) -> float | None:
        """Tokens per second of the steady steps so far, these `done` steps included."""
        synchronize(self.device)
        seconds = self.progress.steady_s + time.perf_counter() - self.steady_started
        steps = self.progress.steady_steps + done - self.steady_from
        return steps * tokens_per_step / seconds if steps > 0 else None


class Trainer:
    """A model in training: AdamW (fused on CUDA) and the learning-rate schedule of the
    settings, the optimizer steps taken (`step`, the data position) and the progress."""

    def __init__(self, model: torch.nn.Module, settings: TrainSettings, autocast_dtype: torch.dtype | None = None):
        self.model, self.settings, self.autocast_dtype = model, settings, autocast_dtype
        self.device = next(model.parameters()).device
        self.optimizer = make_optimizer(model, settings.lr, settings.weight_decay, fused=self.device.type == "cuda")
        self.scheduler = make_scheduler(self.optimizer, settings.warmup_steps, settings.steps)
        self.step = 0
        self.progress = Progress()
        self.resumed_rng: dict | None = None
        self.clocks: Clocks | None = None

    def restore(self, checkpoint: dict, source: str) -> None:
        """Continues the run of a checkpoint (load_checkpoint's): its weights, optimizer and
        scheduler states, step and progress, and its random generators' states when `train`
        starts. A CheckpointError naming `source` if the states do not fit the model: their
        structure is checked against this trainer's before anything is loaded."""
        fresh = self.optimizer.state_dict()["param_groups"], self.scheduler.state_dict()
        problem = (
            state_difference(checkpoint["optimizer"].get("param_groups"), fresh[0], "optimizer.param_groups")
            or optimizer_state_problem(checkpoint["optimizer"], self.optimizer)
            or state_difference(checkpoint["scheduler"], fresh[1], "scheduler")
            or fields_problem(Progress, checkpoint.get("progress", {}), "progress")
        )
        if problem:
            raise CheckpointError(f"{source}: not a usable checkpoint: {problem}")
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        except (KeyError, RuntimeError, ValueError) as err:
            reason = str(err).strip().splitlines()[0]
            raise CheckpointError(f"{source}: the checkpoint's states do not fit its model_config ({reason})") from None
        self.step = checkpoint["step"]
        self.progress = Progress(**checkpoint.get("progress", {}))
        self.resumed_rng = checkpoint["rng"]

    def checkpoint(self, **entries) -> dict:
        """The run as it stands, in checkpoint.py's format: the trainer's entries and the
        caller's (model_config, train_config and data, and any of its own)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_states(),
            "progress": dataclasses.asdict(self.progress),
            **entries,
        }

    def tokens_per_s(self) -> float | None:
        """Training tokens per second of the steady steps so far (reads the clock: a host sync)."""
        if self.clocks is None:
            return self.progress.tokens_per_s(self.settings.tokens_per_step)
        return self.clocks.tokens_per_s(self.step, self.settings.tokens_per_step)

    def train(
        self,
        batches: Callable[[int], Batch],
        stop: int,
        net: torch.nn.Module | None = None,
        on_step: Callable[[int, Tensor], None] | None = None,
        save: Callable[[int], None] | None = None,
        save_every: int = 0,
    ) -> None:
        """Optimizer steps from `step` to `stop`: step s trains on batches(s) (inputs and
        targets [B, T] on the CPU, then optionally starts [B, T]: train_step's) through `net` (the model, or a DDP or compiled wrapper of
        it), by optim.train_step. A step whose batch shape differs from the step before's
        compiles anew (a static graph per shape: with settings.compile Dynamo's caches are
        reset), and is left out of the steady clock.

        After each step: on_step(steps done, its loss: a detached scalar on the device, so
        that reading it is the caller's choice of a host sync); then, after every
        `save_every`-th step (0: none) and the step reaching `stop`, save(steps done), with
        the progress up to date (a checkpoint: ``self.checkpoint``).
        """
        if self.resumed_rng is not None:
            restore_rng_states(self.resumed_rng)
            self.resumed_rng = None
        net = self.model if net is None else net
        self.clocks = clocks = Clocks(self.progress, self.device, self.step)
        losses, shape = [], None
        for step in range(self.step, stop):
            batch = batches(step)
            compiles = batch[0].shape != shape
            if compiles and shape is not None:
                clocks.hold(step)
                if self.settings.compile:
                    torch._dynamo.reset()  # a static graph for the new shape, not a dynamic one for both
            shape = batch[0].shape
            inputs, targets, *starts = to_device(batch, self.device)
            loss = train_step(
                net,
                inputs,
                targets,
                self.optimizer,
                self.scheduler,
                self.settings.grad_clip,
                self.autocast_dtype,
                *starts,
            )
            losses.append(loss)
            if compiles:
                clocks.compiled(step)
            self.step = step + 1
            if on_step is not None:
                on_step(self.step, loss)
            if save is not None and (self.step == stop or (save_every and self.step % save_every == 0)):
                self.take_stock(losses)
                save(self.step)
        self.take_stock(losses)
        self.clocks = None

    def take_stock(self, losses: list[Tensor]) -> None:
        """Adds the clocks and the losses of the steps since the last stock-taking to the progress."""
        self.clocks.take_stock(self.step)
        if losses:
            self.progress.losses = torch.cat([self.progress.losses, torch.stack(losses).cpu().float()])
            losses.clear()
