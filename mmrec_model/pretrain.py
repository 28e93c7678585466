"""Pretrains an MM-Rec language model on bytes: `python -m mmrec_model.pretrain` (or `mmrec-pretrain`).

    python -m mmrec_model.pretrain --preset tiny --steps 600 --out runs/tiny
    python -m mmrec_model.pretrain --resume runs/tiny             # continue exactly
    torchrun --nproc-per-node 2 -m mmrec_model.pretrain ...       # data parallel

By default it trains on the Python standard library's source (no download).
Each step minimises the mean next-byte cross-entropy over a global batch of
`batch_size` windows of `seq_len` bytes, each starting from a fresh model state:

    loss = -1/(B T) sum_{b,t} log p(x[b, t+1] | x[b, :t+1]),   ids [B, T], logits [B, T, 256]

with AdamW (weight decay on matrices only), gradient-norm clipping, and a
learning rate that warms up linearly for `warmup` steps, then follows a cosine
down to lr / 10 at `steps`. With `--final-steps N --final-seq-len L` the last N
steps read windows of L bytes instead, as many as make the same bytes a step (a
long-window phase at the end, as long-context pretraining ends). Validation reports
the same loss on fixed windows of seq_len bytes of the held-out split, and bits per
byte = loss / ln 2 (a token is a byte).
The settings, loss, schedule, optimizer, loop, checkpoints and evaluation are
`mmrec_model.training`'s; this module is the command line, the run folder and torchrun
around them.

The run folder (`--out`) receives, from rank 0 only: checkpoint.pt (atomic),
metrics.jsonl, loss.png, config.json and sample.txt, and .lock, which the run
holds (fcntl.flock) while it writes the folder, so that a second run is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mmrec_model import MMRecConfig, MMRecModel

from .generate import Sampling, generate_text
from .training import Trainer, TrainSettings, bits_per_byte, evaluate
from .training.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write,
    checkpoint_path,
    fields_problem,
    load_checkpoint,
    model_from_checkpoint,
    non_finite_entries,
    save_checkpoint,
)
from .training.data import (
    Corpus,
    DataError,
    check_final_windows_fit,
    check_window_fits,
    load_corpus,
    train_batch,
    train_starts,
    validation_offsets,
)
from .training.device import DeviceError, all_reduce_sum, default_autocast_dtype, pick_device
from .training.run_folder import METRICS_NAME, RunFolder, RunFolderError, file_stamp
from .training.settings import FINAL_PHASE_HELP, SettingsError

PROG = "mmrec-pretrain"


class UsageError(ValueError):
    """A command line that cannot run, with the message to show."""


class Diverged(Exception):
    """The training loss or the weights are no longer finite, with the message to show."""


@dataclass
class PretrainSettings(TrainSettings):
    """Settings of a pretraining run (the command line's options, one field each): the
    training's (TrainSettings, whose defaults are this command's) and the model's, the
    data's, the validation's, the run folder's and the sample's."""

    preset: str = "tiny"
    data: str | None = None
    reset_at_documents: bool = False
    mode: str | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    seed: int = 0
    dtype: str = "auto"
    eval_every: int = 100
    eval_batches: int = 8
    stop_at: int | None = None
    out: str | None = None
    sample_prompt: str = "def "
    sample_tokens: int = 400
    dist_timeout: float = 600.0

    def model_overrides(self) -> dict:
        fields = ("mode", "dim", "n_layers", "n_heads")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


# What a resumed run must keep: everything that changes its arithmetic. The
# other options (where it runs, how often it reports, where it stops) may change.
FIXED_ON_RESUME = (
    "preset",
    "data",
    "reset_at_documents",
    "mode",
    "dim",
    "n_layers",
    "n_heads",
    "steps",
    "batch_size",
    "seq_len",
    "final_steps",
    "final_seq_len",
    "lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "seed",
)

HELP = {
    "preset": "model size: tiny, small or base (docs/design.md)",
    "data": "training text: a text file, a JSONL file (field 'text') or a folder of text files; "
    "default: the Python standard library's source. The last 5% of the bytes are the validation split",
    "reset_at_documents": "read each document of a window from an empty state (the model's memories reset at "
    "every document's first byte), in training and validation; default: the state runs on across documents",
    "mode": "recurrence: 'exact' (gate reads the state) or 'parallel' (gate reads the input); default: the preset's",
    "dim": "model width D; default: the preset's",
    "n_layers": "number of blocks; default: the preset's",
    "n_heads": "heads H (D must be a multiple of H); default: the preset's",
    "steps": "optimizer steps of the whole run; the learning rate's cosine ends here",
    "batch_size": "global batch: windows per step, shared among torchrun processes (a multiple of their number)",
    "seq_len": "bytes per window; each window starts from a fresh model state",
    **FINAL_PHASE_HELP,
    "lr": "peak learning rate of AdamW",
    "warmup": "steps of linear warmup; default: steps / 20",
    "weight_decay": "AdamW weight decay, applied to matrices only",
    "grad_clip": "largest gradient norm; larger gradients are scaled down to it",
    "seed": "seed of the initial weights and of the training windows",
    "device": "auto (CUDA when available), cpu or cuda",
    "dtype": "auto (bfloat16 autocast on a GPU that supports it, else float32), float32 or bfloat16",
    "compile": "train through torch.compile(model)",
    "eval_every": "steps between validations (each one also writes the checkpoint and loss.png)",
    "eval_batches": "validation batches (of --batch-size windows, fixed for the corpus)",
    "log_every": "steps between lines of training loss in metrics.jsonl",
    "stop_at": "stop at this step (checkpointed) before --steps; continue later with --resume",
    "out": "run folder; default: runs/<preset>-<date>-<time>, or the resumed checkpoint's folder",
    "sample_prompt": "text that the sample written at the end continues",
    "sample_tokens": "bytes of the sample written at the end",
    "dist_timeout": "seconds a torchrun process waits for the others (at start and in each collective) "
    "before it stops the run with an error, e.g. when one of them hangs",
}


def build_parser() -> argparse.ArgumentParser:
    # Defaults are left out of the namespace (SUPPRESS) so that a resumed run
    # can tell the options given on its command line from the saved ones.
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fields = {field.name: field for field in dataclasses.fields(PretrainSettings)}
    for field in (fields[name] for name in HELP):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        help_text = HELP[field.name] + ("" if default is None else f" (default: {default})")
        if field.type == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = {"int | None": int, "int": int, "float": float}.get(field.type, str)
            parser.add_argument(flag, type=kind, metavar=field.name.upper(), help=help_text.replace("%", "%%"))
    parser.add_argument("--resume", metavar="PATH", help="continue the run of this checkpoint file or run folder")
    return parser


# --- checking the command line before anything is written -------------------


def build_trainer(model_config, config: PretrainSettings, device, autocast_dtype, checkpoint: dict | None) -> Trainer:
    """The model, its optimizer and schedule: new from the seed, or the checkpoint's run."""
    torch.manual_seed(config.seed)
    if checkpoint:
        model = model_from_checkpoint(checkpoint, device, "--resume").train()
    else:
        model = MMRecModel(model_config).to(device)
    trainer = Trainer(model, config, autocast_dtype)
    if checkpoint:
        trainer.restore(checkpoint, "--resume")
    return trainer


@dataclass
class Run:
    """Everything a run needs, checked: nothing is written before it exists."""

    config: PretrainSettings
    model_config: MMRecConfig
    corpus: Corpus
    out: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    checkpoint: dict | None
    world_size: int
    rank: int
    trainer: Trainer
    checkpoint_stamp: tuple | None  # the identity of out's checkpoint file when the run was prepared

    @property
    def start_step(self) -> int:
        return self.checkpoint["step"] if self.checkpoint else 0

    @property
    def stop_step(self) -> int:
        return self.config.steps if self.config.stop_at is None else self.config.stop_at


def resolved_data(data: str | None) -> str | None:
    """--data as an absolute path (a resumed run compares it); one that cannot be
    resolved (a loop of symbolic links) stays as given, for load_corpus to explain."""
    if data is None:
        return None
    try:
        return str(Path(data).resolve())
    except (OSError, RuntimeError):  # Python before 3.13 raises RuntimeError for a loop
        return data


def resumed_config(given: dict, checkpoint: dict) -> PretrainSettings:
    """The checkpoint's settings, with the options given that a resumed run may change."""
    problem = fields_problem(PretrainSettings, checkpoint["train_config"], "train_config")
    if problem:
        raise CheckpointError(f"--resume: not a usable checkpoint: {problem}")
    saved = PretrainSettings(**checkpoint["train_config"])
    changed = [name for name in FIXED_ON_RESUME if name in given and given[name] != getattr(saved, name)]
    if changed:
        listing = ", ".join(f"--{n.replace('_', '-')} {given[n]} (saved: {getattr(saved, n)})" for n in changed)
        raise UsageError(f"a resumed run keeps its settings, but the command line changes {listing}")
    # Where this invocation stops and writes are its own, never the saved ones.
    this_invocation = {"stop_at": None, "out": None}
    changeable = {k: v for k, v in given.items() if k not in FIXED_ON_RESUME}
    return dataclasses.replace(saved, **{**this_invocation, **changeable})


def check_sizes(config: PretrainSettings, world_size: int, start_step: int) -> None:
    config.check()
    for name in ("eval_every", "eval_batches", "sample_tokens"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(config, name)}")
    if not config.dist_timeout > 0:
        raise UsageError(f"--dist-timeout: expected a positive number, got {config.dist_timeout}")
    if not config.sample_prompt:
        raise UsageError("--sample-prompt: expected at least one character for the sample to continue")
    if config.batch_size % world_size:
        raise UsageError(
            f"--batch-size {config.batch_size}: expected a multiple of the number of processes ({world_size})"
        )
    final_windows = config.step_windows(config.steps - 1)[0]
    if config.final_steps and final_windows % world_size:
        raise UsageError(
            f"--final-seq-len {config.final_seq_len}: the final phase's {final_windows} windows a step must be a "
            f"multiple of the number of processes ({world_size})"
        )
    if start_step >= config.steps:
        raise UsageError(
            f"nothing to train: the checkpoint is at step {start_step}, the end of the run (--steps {config.steps})"
        )
    if config.stop_at is not None and not start_step < config.stop_at <= config.steps:
        raise UsageError(
            f"--stop-at {config.stop_at}: expected a step in ({start_step}, {config.steps}] "
            "(after the checkpoint, at most --steps)"
        )


def pick_autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype; None means plain float32.

    'auto' is bf16 on GPUs that support it. On CPUs it stays float32, the
    safe choice: bf16 was faster on a Xeon with native bf16 instructions
    (`tiny` on 2 cores: 14.8k against 11.8k tokens/s) but processors without
    them must emulate it; `--dtype bfloat16` asks for it.
    """
    if name not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"--dtype: expected auto, float32 or bfloat16, got {name!r}")
    if name == "auto":
        return default_autocast_dtype(device)
    return torch.bfloat16 if name == "bfloat16" else None


def pick_out(config: PretrainSettings, resume: str | None) -> Path:
    if config.out is not None:
        return Path(config.out)
    if resume is not None:
        return checkpoint_path(resume).parent
    return Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out(out: Path, resume: str | None) -> None:
    """Never write over a run that is not the one being continued, nor ask for a folder where a file is."""
    existing = out / CHECKPOINT_NAME
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    file_above = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if file_above is not None:
        raise UsageError(f"--out {out}: {file_above} is a file, not a folder")
    if existing.exists() and (resume is None or existing.resolve() != checkpoint_path(resume).resolve()):
        raise UsageError(
            f"--out {out}: already holds a run's {CHECKPOINT_NAME}; "
            f"continue it with --resume {out} or choose another --out"
        )


def build_model_config(config: PretrainSettings, checkpoint: dict | None):
    try:
        if checkpoint is not None:
            return MMRecConfig(**checkpoint["model_config"])
        return MMRecConfig.preset(config.preset, **config.model_overrides())
    except (TypeError, ValueError) as err:
        where = "the checkpoint's model_config" if checkpoint is not None else f"--preset {config.preset}"
        raise UsageError(f"{where}: {err}") from None


def prepare(argv: list[str] | None) -> Run:
    """Parses and checks the command line, reads the data and any checkpoint; writes nothing."""
    given = vars(build_parser().parse_args(argv))
    resume = given.pop("resume", None)
    if "data" in given:
        given["data"] = resolved_data(given["data"])
    checkpoint = load_checkpoint(resume) if resume is not None else None
    config = resumed_config(given, checkpoint) if checkpoint else PretrainSettings(**given)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    start_step = checkpoint["step"] if checkpoint else 0
    check_sizes(config, world_size, start_step)
    model_config = build_model_config(config, checkpoint)
    device = pick_device(config.device, int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0)
    autocast_dtype = pick_autocast_dtype(config.dtype, device)
    out = pick_out(config, resume)
    check_out(out, resume)
    checkpoint_stamp = file_stamp(out / CHECKPOINT_NAME)
    corpus = load_corpus(config.data)
    check_window_fits(corpus, config.seq_len)
    check_final_windows_fit(corpus, config.final_steps, config.final_seq_len)
    if checkpoint and checkpoint["data"]["sha256"] != corpus.sha256:
        saved = checkpoint["data"]["source"]
        raise UsageError(f"--resume: the checkpoint was trained on other data ({saved}) than {corpus.source}")
    trainer = build_trainer(model_config, config, device, autocast_dtype, checkpoint)
    rank = int(os.environ.get("RANK", "0"))
    return Run(
        config,
        model_config,
        corpus,
        out,
        device,
        autocast_dtype,
        checkpoint,
        world_size,
        rank,
        trainer,
        checkpoint_stamp,
    )


# --- training -------------------------------------------------------------------


def validation_loss(run: Run) -> float:
    """Mean validation loss (nats per byte) over the fixed validation windows, shared among ranks."""
    config = run.config
    offsets = validation_offsets(run.corpus, config.eval_batches * config.batch_size, config.seq_len)
    return evaluate(
        run.trainer.model,
        run.corpus.val,
        offsets,
        config.seq_len,
        config.batch_size,
        run.autocast_dtype,
        run.rank,
        run.world_size,
        run.corpus.split_starts("val") if config.reset_at_documents else None,
    )


def step_batch(run: Run, step: int) -> tuple[torch.Tensor, ...]:
    """This rank's share of step `step`'s global batch (of the final phase's windows in its
    last steps): inputs, targets, and with --reset-at-documents their documents' starts."""
    config = run.config
    where = (run.corpus, step, config.seed, *config.step_windows(step), run.rank, run.world_size)
    if not config.reset_at_documents:
        return train_batch(*where)
    return (*train_batch(*where), train_starts(*where))


def checkpoint_dict(run: Run) -> dict:
    return run.trainer.checkpoint(
        model_config=dataclasses.asdict(run.model_config),
        train_config=dataclasses.asdict(run.config),
        data={"sha256": run.corpus.sha256, "source": run.corpus.source},
    )


def make_run_folder(run: Run) -> RunFolder:
    config = {"train": dataclasses.asdict(run.config), "model": dataclasses.asdict(run.model_config)}
    return RunFolder(run.out, run.checkpoint_stamp, run.start_step, config)


def setup_distributed(run: Run) -> None:
    if run.world_size > 1:
        if run.device.type == "cuda":
            torch.cuda.set_device(run.device)
        timeout = datetime.timedelta(seconds=run.config.dist_timeout)
        torch.distributed.init_process_group("nccl" if run.device.type == "cuda" else "gloo", timeout=timeout)


def training_module(run: Run) -> torch.nn.Module:
    """The module that training steps call: the model, in DDP across processes, compiled if asked."""
    net = run.trainer.model
    if run.world_size > 1:
        ids = [run.device.index] if run.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    return torch.compile(net) if run.config.compile else net


def progress_bar(run: Run):
    return tqdm(
        total=run.stop_step,
        initial=run.start_step,
        disable=run.rank != 0,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.5,
        desc="pretrain",
    )


def describe(run: Run) -> str:
    mc, config = run.model_config, run.config
    n_params = sum(p.numel() for p in run.trainer.model.parameters())
    precision = " with bf16 autocast" if run.autocast_dtype else ""
    return (
        f"{PROG}: {run.corpus.describe()}\n"
        f"{PROG}: model {config.preset} (D={mc.dim}, {mc.n_layers} layers, {mc.n_heads} heads, {mc.mode} mode; "
        f"{n_params:,} parameters) on {run.device}{precision}, {run.world_size} process(es); run folder {run.out}"
    )


def write_sample(run: Run) -> None:
    config = run.config
    prompt, length = config.sample_prompt, config.sample_tokens
    sample = generate_text(run.trainer.model, prompt, length, Sampling(seed=config.seed))
    atomic_write(run.out / "sample.txt", lambda f: f.write(sample.encode("utf-8")))
    print(f"\n--- sample (prompt {config.sample_prompt!r}, {config.sample_tokens} bytes) ---\n{sample}\n---")
    finished = run.stop_step == config.steps
    print(
        f"{PROG}: {'finished' if finished else 'stopped'} at step {run.stop_step}; in {run.out}: "
        f"{CHECKPOINT_NAME}, {METRICS_NAME}, loss.png, sample.txt, config.json"
    )
    if not finished:
        print(f"{PROG}: continue with: python -m mmrec_model.pretrain --resume {run.out}")
    print(f"{PROG}: more samples: python -m mmrec_model.generate --checkpoint {run.out} --prompt 'import '")


def check_finite(run: Run, step: int, saved_step: int, loss: float, what: str, weights: bool = False) -> None:
    """Stops the run (Diverged) when `loss` (the `what`) or, with `weights`, the model's
    weights are not finite: nothing is saved after that, so the last checkpoint
    stays the last finite one."""
    non_finite = non_finite_entries(run.trainer.model.state_dict()) if weights else []
    problem = None
    if not math.isfinite(loss):
        problem = f"the {what} is {loss}"
    elif non_finite:
        problem = f"the weights hold NaN or Inf ({', '.join(non_finite[:3])})"
    if problem is not None:
        raise Diverged(
            f"step {step}: {problem}; the run stopped, and {run.out / CHECKPOINT_NAME} keeps step {saved_step}. "
            "The run diverged: start it again with a lower --lr or a longer --warmup"
        )


def train(run: Run, folder: RunFolder | None) -> None:
    """The training loop (the Trainer's) with this command's hooks: the loss of each step
    read and checked, logged every --log-every steps; validation + checkpoint + plot every
    --eval-every steps; a sample at the end. `folder`: the run folder on rank 0, None on the others."""
    config, trainer, is_writer = run.config, run.trainer, run.rank == 0
    net = training_module(run)
    if is_writer:
        print(describe(run), flush=True)
    bar = progress_bar(run)
    saved_step = run.start_step

    def validate_and_save(step: int) -> None:
        nonlocal saved_step
        val_loss = validation_loss(run)
        check_finite(run, step, saved_step, val_loss, "validation loss", weights=True)
        if is_writer:
            folder.log({"step": step, "split": "val", "loss": val_loss, "bpb": bits_per_byte(val_loss)})
            folder.sync()
            save_checkpoint(run.out / CHECKPOINT_NAME, checkpoint_dict(run))
            folder.plot()
            bar.write(f"step {step:>6}: val loss {val_loss:.4f}, val bits/byte {bits_per_byte(val_loss):.3f}")
        saved_step = step

    def log_step(done: int, step_loss: torch.Tensor) -> None:
        loss = all_reduce_sum(step_loss.double(), run.world_size).item() / run.world_size
        check_finite(run, done, saved_step, loss, "training loss")
        rate = trainer.tokens_per_s()
        tok_s = "-" if rate is None else f"{rate:,.0f}"
        bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{bits_per_byte(loss):.2f}", tok_s=tok_s, refresh=False)
        bar.update()
        if is_writer and (done % config.log_every == 0 or done == run.stop_step):
            lr = trainer.scheduler.get_last_lr()[0]
            record = {"step": done, "split": "train", "loss": loss, "bpb": bits_per_byte(loss), "lr": lr}
            folder.log({**record, "tokens_per_s": rate})

    if run.start_step == 0:
        validate_and_save(0)
    batches = functools.partial(step_batch, run)
    trainer.train(batches, run.stop_step, net, log_step, validate_and_save, config.eval_every)
    bar.close()
    if is_writer:
        write_sample(run)


def fail(message) -> int:
    """Reports a fatal error of the command in one line; returns its exit status, 1."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def write_failure(err: OSError) -> str:
    where = f"{err.filename}" if err.filename else "the run folder"
    return f"cannot write {where} ({err.strerror or err})"


def what_stopped_run_keeps(run: Run) -> str:
    """What a run stopped by a failed write leaves in its folder to resume from."""
    path = run.out / CHECKPOINT_NAME
    if path.exists():
        return f"the run stopped, {path} keeps its last checkpoint"
    return f"the run stopped before its first checkpoint: no {path} was written"


def is_peer_timeout(err: RuntimeError, world_size: int) -> bool:
    """Whether `err` is a collective that waited past --dist-timeout for another process.
    gloo raises it as a plain RuntimeError (from DDP's backward too), known by its words."""
    return world_size > 1 and re.search(r"timed out|timeout", str(err), re.IGNORECASE) is not None


def main(argv: list[str] | None = None) -> int:
    try:
        run = prepare(argv)
        folder = make_run_folder(run) if run.rank == 0 else None
    except (UsageError, SettingsError, DataError, CheckpointError, DeviceError, RunFolderError) as err:
        return fail(err)
    except OSError as err:  # the run folder cannot be made or written (read-only, full, ...)
        return fail(write_failure(err))
    try:
        setup_distributed(run)
        train(run, folder)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; continue from the last checkpoint with --resume {run.out}", file=sys.stderr)
        return 130
    except Diverged as err:
        return fail(err)
    except OSError as err:  # the checkpoint or the metrics could not be written: the previous checkpoint stays
        return fail(f"{write_failure(err)}; {what_stopped_run_keeps(run)}")
    except RuntimeError as err:
        if not is_peer_timeout(err, run.world_size):
            raise
        return fail(
            f"rank {run.rank}: another process did not answer within --dist-timeout {run.config.dist_timeout:g} "
            "seconds (it hung or died); the run stopped at its last checkpoint"
        )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
