"""A row of the quality bench: the arch's model trained on the batches of its seed by the
library's Trainer (with the row's checkpoint when asked), measured, written to DIR."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import compile_blocks, versions
from bench.transformer import Transformer, TransformerConfig
from mmrec_model import MMRecConfig, MMRecModel
from mmrec_model.training import (
    Corpus,
    Trainer,
    bits_per_byte,
    default_autocast_dtype,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    train_batch,
    validation_offsets,
)
from mmrec_model.training.checkpoint import atomic_write
from mmrec_model.training.data import (
    check_final_windows_fit,
    check_window_fits,
    corpus_from_documents,
    read_documents,
)

from .budget import budgeted_settings, fit_to_budget
from .measure import long_context, recall, size_label
from .passkey import check_passkey_fits, passkey
from .settings import (
    OPTIONS,
    SMOKE,
    Settings,
    check_settings,
    model_config,
    row_stem,
)


def step_batch(corpus: Corpus, settings: Settings, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and targets of step `step` (settings.step_windows' shape) from the batches of `seed`."""
    return train_batch(corpus, step, seed, *settings.step_windows(step))


@dataclasses.dataclass
class Resume:
    """A row's training checkpoint: written to `path` every `every` steps (0: never) and at
    `stop_at` (where training then stops; None: at the end of training), with the row's
    `identity` (row_identity); `saved`, the checkpoint found at `path` when the row started
    (read_row_checkpoint), from which it continues, exactly; `budget`, the record of a row's
    --time-budget (fit_to_budget's), kept in the checkpoint so that the row keeps its steps."""

    path: Path
    identity: dict
    every: int = 0
    stop_at: int | None = None
    saved: dict | None = None
    budget: dict | None = None


def read_row_checkpoint(path: Path, identity: dict) -> dict | None:
    """The row checkpoint at path (None when there is none yet); a ValueError that says why
    for a file that is not one, or one of another row than `identity`."""
    if not path.exists():
        return None
    saved = load_checkpoint(path)
    if saved.get("identity") != identity:
        settings = saved.get("identity", {}).get("settings", {})
        differ = sorted(k for k in identity["settings"] if settings.get(k) != identity["settings"][k])
        raise ValueError(
            f"{path}: the checkpoint is of another row (it differs in "
            f"{', '.join(differ) or 'arch or seed'}); delete it or use another --out"
        )
    return saved


def save_row_checkpoint(trainer: Trainer, resume: Resume, corpus: Corpus) -> None:
    checkpoint = trainer.checkpoint(
        model_config=dataclasses.asdict(trainer.model.config),
        train_config=resume.identity["settings"],
        data={"sha256": corpus.sha256, "source": corpus.source},
        identity=resume.identity,
        budget=resume.budget,
    )
    resume.path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(resume.path, checkpoint)


def train(
    model: torch.nn.Module, corpus: Corpus, settings: Settings, seed: int, autocast_dtype, resume: Resume | None = None
) -> dict | None:
    """settings.steps steps of the Trainer on the batches of `seed`; times and the training
    curve (None when stopped at resume.stop_at). The loop reads nothing back from the GPU
    but at checkpoints; the steps that compile (each run's first, and the first of the
    final phase, which starts its own static graph) are left out of the steady clock."""
    trainer = Trainer(model, settings, autocast_dtype)
    save, every, stop = None, 0, settings.steps
    if resume:
        if resume.saved is not None:
            trainer.restore(resume.saved, str(resume.path))
            print(f"quality: continuing from step {trainer.step} ({resume.path})", file=sys.stderr, flush=True)
        save, every = (lambda done: save_row_checkpoint(trainer, resume, corpus)), resume.every
        stop = min(resume.stop_at or settings.steps, settings.steps)  # a budget may allow fewer steps
    bar = tqdm(total=settings.steps, initial=trainer.step, desc="train", unit="step", mininterval=10, file=sys.stderr)
    batches = functools.partial(step_batch, corpus, settings, seed)
    trainer.train(batches, stop, on_step=lambda done, loss: bar.update(), save=save, save_every=every)
    bar.close()
    if trainer.step < settings.steps:
        return None
    progress = trainer.progress
    return {
        "train_s": progress.train_s,
        "first_step_s": progress.first_step_s,
        "tokens_per_s": progress.tokens_per_s(settings.tokens_per_step),
        "curve": loss_curve(progress.losses, settings.log_every),
    }


def build_model(config: MMRecConfig | TransformerConfig, seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MMRecModel(config) if isinstance(config, MMRecConfig) else Transformer(config)
    return model.to(device)


def row_model(config: MMRecConfig | TransformerConfig, seed: int, settings: Settings) -> torch.nn.Module:
    """The row's model from `seed` on settings.device, each block compiled with settings.compile."""
    model = build_model(config, seed, torch.device(settings.device))
    if settings.compile:
        compile_blocks(model)
    return model


def loss_curve(losses: torch.Tensor, every: int) -> dict:
    """Mean training bits per byte over each `every` steps of the per-step losses [steps]:
    {"every", "step": the last step of each span (1-based), "bpb"}."""
    spans = losses.double().split(every)
    return {
        "every": every,
        "step": [min((i + 1) * every, len(losses)) for i in range(len(spans))],
        "bpb": [bits_per_byte(span.mean().item()) for span in spans],
    }


def measure_row(
    arch: str,
    seed: int,
    settings: Settings,
    model: torch.nn.Module,
    documents: list[bytes],
    corpus: Corpus,
    resume: Resume | None = None,
    budget: dict | None = None,
) -> dict | None:
    """Trains the arch's model (row_model's) on the batches of `seed`, then measures it: the
    row's record (None when training stopped at resume.stop_at); `budget`: the record of
    --time-budget (None without one), whose steps are settings.steps."""
    device = torch.device(settings.device)
    autocast_dtype = default_autocast_dtype(device)
    parameters = sum(p.numel() for p in model.parameters())
    within = f" (what --time-budget {settings.time_budget:g} s allows)" if budget else ""
    print(
        f"quality: {arch} seed {seed}: {parameters:,} parameters, {settings.steps} steps{within} of "
        f"{settings.batch_size} x {settings.seq_len} bytes on {device}",
        file=sys.stderr,
        flush=True,
    )
    trained = train(model, corpus, settings, seed, autocast_dtype, resume)
    if trained is None:
        return None
    # Evaluation shapes differ from training's: eager spares compiling them.
    with torch.compiler.set_stance("force_eager"):
        offsets = validation_offsets(corpus, settings.val_windows, settings.seq_len)
        val_loss = evaluate(model, corpus.val, offsets, settings.seq_len, settings.batch_size, autocast_dtype)
        long = long_context(model, documents, corpus, settings, autocast_dtype)
        recalled = recall(model, documents, corpus, settings, autocast_dtype)
        passkeys = passkey(model, corpus, settings, autocast_dtype)
    return {
        "arch": arch,
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "model_config": dataclasses.asdict(model.config),
        "parameters": parameters,
        "tokens": settings.steps * settings.batch_size * settings.seq_len,
        **trained,
        "time_budget": budget,
        "val_loss": val_loss,
        "val_bpb": bits_per_byte(val_loss),
        "long_context": long,
        "recall": recalled,
        "passkey": passkeys,
        "corpus": corpus.describe(),
        "autocast": str(autocast_dtype).replace("torch.", ""),
        **versions(settings.device),
        "command": "python " + " ".join(sys.argv),
    }


def write_row(row: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{row_stem(row)}.json"
    atomic_write(path, lambda f: f.write(json.dumps(row, indent=2).encode()))
    return path


def row_resume(args: argparse.Namespace, settings: Settings) -> Resume | None:
    """The row's checkpointing as --checkpoint-every and --stop-at ask (None: neither)."""
    every, stop_at = args.checkpoint_every, args.stop_at
    if not every and stop_at is None:
        return None
    if every < 0:
        raise ValueError(f"--checkpoint-every: expected a number of steps >= 0, got {every}")
    if settings.time_budget is not None and stop_at is not None and stop_at < 1:
        raise ValueError(f"--stop-at: expected a step > 0, got {stop_at}")
    if settings.time_budget is None and stop_at is not None and not 0 < stop_at < settings.steps:
        raise ValueError(
            f"--stop-at: expected a step between 0 and --steps ({settings.steps}), exclusive, got {stop_at}"
        )
    identity = row_identity(args.arch, args.seed, settings)
    path = args.out / f"{row_stem(identity)}.ckpt.pt"
    return Resume(path, identity, every, stop_at, read_row_checkpoint(path, identity))


def row_identity(arch: str, seed: int, settings: Settings) -> dict:
    """What a row's checkpoint must match: arch, seed and settings, but for the steps that a
    time budget sets (they come from the checkpoint's budget)."""
    kept = dataclasses.asdict(settings)
    if settings.time_budget is not None:
        del kept["steps"]
    return {"arch": arch, "seed": seed, "settings": kept}


def row_budget(model, corpus: Corpus, settings: Settings, seed: int, resume: Resume | None) -> tuple[Settings, dict]:
    """The settings with the steps that --time-budget allows and the budget's record: timed
    now (fit_to_budget), or those of the row's checkpoint when the row continues."""
    if resume and resume.saved:
        budget = resume.saved["budget"]
        settings = budgeted_settings(settings, budget)
    else:
        autocast_dtype = default_autocast_dtype(torch.device(settings.device))
        settings, budget = fit_to_budget(model, corpus, settings, seed, autocast_dtype)
    if resume:
        resume.budget = budget
    return settings, budget


def run_command(args: argparse.Namespace) -> None:
    given = {
        name: tuple(value) if isinstance(value, list) else value
        for name, value in vars(args).items()
        if name in OPTIONS or name in ("compile", "device")
    }
    if "config" in args:
        given["config"] = dict(args.config)
    settings = dataclasses.replace(SMOKE if args.smoke else Settings(), **given)
    try:
        if "time_budget" in given and "steps" in given:
            raise ValueError("--time-budget: sets the steps itself; expected --time-budget or --steps, not both")
        check_settings(settings)
        config = model_config(args.arch, settings)
        documents, source = read_documents(None)
        corpus = corpus_from_documents(documents, source)
        check_window_fits(corpus, settings.seq_len)
        check_final_windows_fit(corpus, settings.final_steps, settings.final_seq_len)
        check_passkey_fits(corpus, settings)
        resume = row_resume(args, settings)
    except ValueError as err:
        sys.exit(f"bench.quality run: error: {err}")
    model, budget = row_model(config, args.seed, settings), None
    if settings.time_budget is not None:
        try:
            settings, budget = row_budget(model, corpus, settings, args.seed, resume)
        except ValueError as err:
            sys.exit(f"bench.quality run: error: {err}")
    row = measure_row(args.arch, args.seed, settings, model, documents, corpus, resume, budget)
    if row is None:
        print(f"{resume.path}: stopped at step {resume.stop_at}; the same command without --stop-at continues")
        return
    path = write_row(row, args.out)
    if resume:
        resume.path.unlink(missing_ok=True)
    bands = ", ".join(f"{b['band']} {b['bpb']:.3f}" for b in row["long_context"]["bands"]) or "-"
    copies = ", ".join(f"{size_label(d['distance'])} {d['copy_bpb']:.3f}" for d in row["recall"]["distances"]) or "-"
    keys = ", ".join(f"{size_label(c['context'])} {c['accuracy']:.0%}" for c in row["passkey"]["contexts"])
    print(
        f"{path}: val bits/byte {row['val_bpb']:.4f}; by position {bands}; recalled passage at {copies}; "
        f"passkey at {keys}; {row['train_s']:.0f} s"
    )
