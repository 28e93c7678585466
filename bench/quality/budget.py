"""A row trained for a wall-clock budget (--time-budget) instead of a step count: a short
timed warm-up of each phase's batch shape gives the seconds a steady step takes, and the
steps that the budget allows become the row's --steps, so that the learning-rate schedule
(warm-up, then cosine to the last step) fits them. The budget is steady training time:
compiling (each phase's first step) and the warm-up itself are not counted."""

from __future__ import annotations

import copy
import dataclasses

import torch

from mmrec_model.training import Corpus, Trainer, train_batch
from mmrec_model.training.checkpoint import restore_rng_states, rng_states

from .settings import Settings

TIMED_STEPS = 10  # timed steps of each phase, after the one that compiles


def steady_step_seconds(model: torch.nn.Module, settings: Settings, batches, autocast_dtype) -> float:
    """Seconds a steady step of `batches(step)` takes: 1 + TIMED_STEPS steps of a Trainer of
    their own, the first (it compiles) not counted."""
    if settings.compile:
        torch._dynamo.reset()  # a static graph for this shape, as training compiles its own
    steps = 1 + TIMED_STEPS
    trainer = Trainer(model, dataclasses.replace(settings, steps=steps, final_steps=0, warmup=0), autocast_dtype)
    trainer.train(batches, steps)
    return trainer.progress.steady_s / trainer.progress.steady_steps


def time_phases(
    model: torch.nn.Module, corpus: Corpus, settings: Settings, seed: int, autocast_dtype
) -> tuple[float, float | None]:
    """Seconds a steady step takes on the batches of `seed`, and in the final phase (None
    without one). The warm-up trains nothing: the model's weights and the random
    generators' states are restored after it."""
    weights, generators = copy.deepcopy(model.state_dict()), rng_states()
    shapes = [(settings.batch_size, settings.seq_len)]
    if settings.final_steps:
        shapes.append(settings.step_windows(settings.steps - 1))
    seconds = [
        steady_step_seconds(
            model, settings, lambda step, shape=shape: train_batch(corpus, step, seed, *shape), autocast_dtype
        )
        for shape in shapes
    ]
    model.load_state_dict(weights)
    restore_rng_states(generators)
    if settings.compile:
        torch._dynamo.reset()  # training compiles its first shape anew, not as a dynamic graph
    return seconds[0], seconds[1] if settings.final_steps else None


def steps_within(budget_s: float, step_s: float, final_step_s: float | None, final_steps: int) -> int:
    """The most steps whose steady time fits budget_s: final_steps at final_step_s each, the
    others at step_s; a ValueError naming --time-budget when not one step besides the final
    phase's fits."""
    final_s = final_steps * (final_step_s or 0.0)
    steps = final_steps + int((budget_s - final_s) // step_s)
    if steps <= final_steps:
        final = f" after the final phase's {final_steps} steps ({final_s:.3g} s)" if final_steps else ""
        raise ValueError(
            f"--time-budget {budget_s:g}: leaves no time for a step of {step_s:.3g} s{final}; expected a larger budget"
        )
    return steps


def fit_to_budget(
    model: torch.nn.Module, corpus: Corpus, settings: Settings, seed: int, autocast_dtype
) -> tuple[Settings, dict]:
    """The settings with the steps that settings.time_budget allows, checked, and the
    budget's record {"seconds", "step_s", "final_step_s", "timed_steps", "steps"}."""
    step_s, final_step_s = time_phases(model, corpus, settings, seed, autocast_dtype)
    steps = steps_within(settings.time_budget, step_s, final_step_s, settings.final_steps)
    budget = {
        "seconds": settings.time_budget,
        "step_s": step_s,
        "final_step_s": final_step_s,
        "timed_steps": TIMED_STEPS,
        "steps": steps,
    }
    return budgeted_settings(settings, budget), budget


def budgeted_settings(settings: Settings, budget: dict) -> Settings:
    """settings with the budget's steps, checked (the learning rate's warm-up and the final
    phase must fit them: a SettingsError naming the option otherwise)."""
    budgeted = dataclasses.replace(settings, steps=budget["steps"])
    budgeted.check()
    return budgeted
