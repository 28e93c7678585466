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
down to lr / 10 at `steps`. Validation reports the same loss on fixed
windows of the held-out split, and bits per byte = loss / ln 2 (a token is a byte).
The loss, schedule, optimizer, step and evaluation are `mmrec_model.training`'s;
this module is the command line, the run folder, checkpoints and torchrun around them.

The run folder (`--out`) receives, from rank 0 only: checkpoint.pt (atomic),
metrics.jsonl, loss.png, config.json and sample.txt, and .lock, which the run
holds (fcntl.flock) while it writes the folder, so that a second run is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fcntl
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CheckpointError,
    atomic_write,
    checkpoint_path,
    is_temporary_name,
    load_checkpoint,
    model_from_checkpoint,
    non_finite_entries,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from .config import MMRecConfig
from .data import Corpus, DataError, check_window_fits, load_corpus, train_batch, validation_offsets
from .generate import Sampling, generate_text
from .model import MMRecModel
from .training import (
    DeviceError,
    all_reduce_sum,
    bits_per_byte,
    default_autocast_dtype,
    evaluate,
    make_optimizer,
    make_scheduler,
    pick_device,
    train_step,
)

PROG = "mmrec-pretrain"
METRICS_NAME = "metrics.jsonl"
# The lock a run holds on its folder while it runs (fcntl.flock, released when the process ends).
LOCK_NAME = ".lock"


class UsageError(ValueError):
    """A command line that cannot run, with the message to show."""


class Diverged(Exception):
    """The training loss or the weights are no longer finite, with the message to show."""


@dataclass
class TrainConfig:
    """Settings of a pretraining run (the command line's options, one field each).

    The defaults are the README's demo: `tiny` on 2 CPU cores in about five
    minutes (1200 steps of 8 x 256 bytes; among the learning rates, batch
    shapes and modes tried, this gave the lowest validation loss in that time).
    """

    preset: str = "tiny"
    data: str | None = None
    mode: str | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 5e-3
    warmup: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    stop_at: int | None = None
    out: str | None = None
    sample_prompt: str = "def "
    sample_tokens: int = 400
    dist_timeout: float = 600.0

    @property
    def warmup_steps(self) -> int:
        return self.steps // 20 if self.warmup is None else self.warmup

    def model_overrides(self) -> dict:
        fields = ("mode", "dim", "n_layers", "n_heads")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


# What a resumed run must keep: everything that changes its arithmetic. The
# other options (where it runs, how often it reports, where it stops) may change.
FIXED_ON_RESUME = (
    "preset",
    "data",
    "mode",
    "dim",
    "n_layers",
    "n_heads",
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "seed",
)

HELP = {
    "preset": "model size: tiny, small or base (DESIGN 2.3)",
    "data": "training text: a text file, a JSONL file (field 'text') or a folder of text files; "
    "default: the Python standard library's source. The last 5% of the bytes are the validation split",
    "mode": "recurrence: 'exact' (gate reads the state) or 'parallel' (gate reads the input); default: the preset's",
    "dim": "model width D; default: the preset's",
    "n_layers": "number of blocks; default: the preset's",
    "n_heads": "heads H (D must be a multiple of H); default: the preset's",
    "steps": "optimizer steps of the whole run; the learning rate's cosine ends here",
    "batch_size": "global batch: windows per step, shared among torchrun processes (a multiple of their number)",
    "seq_len": "bytes per window; each window starts from a fresh model state",
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
    for field in dataclasses.fields(TrainConfig):
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


@dataclass
class Training:
    """What an optimizer step changes, and a checkpoint holds."""

    model: torch.nn.Module
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR


def build_training(model_config, config: TrainConfig, device: torch.device, checkpoint: dict | None) -> Training:
    """Model, optimizer and scheduler: new from the seed, or restored from the checkpoint."""
    torch.manual_seed(config.seed)
    if checkpoint:
        model = model_from_checkpoint(checkpoint, device, "--resume").train()
    else:
        model = MMRecModel(model_config).to(device)
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.warmup_steps, config.steps)
    if checkpoint:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        except (KeyError, RuntimeError, ValueError) as err:
            reason = str(err).strip().splitlines()[0]
            raise CheckpointError(f"--resume: the checkpoint's states do not fit its model_config ({reason})") from None
    return Training(model, optimizer, scheduler)


@dataclass
class Run:
    """Everything a run needs, checked: nothing is written before it exists."""

    config: TrainConfig
    model_config: object
    corpus: Corpus
    out: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    checkpoint: dict | None
    world_size: int
    rank: int
    training: Training
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


def resumed_config(given: dict, checkpoint: dict) -> TrainConfig:
    """The checkpoint's settings, with the options given that a resumed run may change."""
    try:
        saved = TrainConfig(**checkpoint["train_config"])
    except TypeError as err:
        raise CheckpointError(f"--resume: the checkpoint's train_config does not fit this version ({err})") from None
    changed = [name for name in FIXED_ON_RESUME if name in given and given[name] != getattr(saved, name)]
    if changed:
        listing = ", ".join(f"--{n.replace('_', '-')} {given[n]} (saved: {getattr(saved, n)})" for n in changed)
        raise UsageError(f"a resumed run keeps its settings, but the command line changes {listing}")
    # Where this invocation stops and writes are its own, never the saved ones.
    this_invocation = {"stop_at": None, "out": None}
    changeable = {k: v for k, v in given.items() if k not in FIXED_ON_RESUME}
    return dataclasses.replace(saved, **{**this_invocation, **changeable})


def check_sizes(config: TrainConfig, world_size: int, start_step: int) -> None:
    positive = ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every", "sample_tokens")
    for name in positive:
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(config, name)}")
    for name in ("lr", "grad_clip", "dist_timeout"):
        if not getattr(config, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive number, got {getattr(config, name)}")
    if not config.sample_prompt:
        raise UsageError("--sample-prompt: expected at least one character for the sample to continue")
    if config.weight_decay < 0:
        raise UsageError(f"--weight-decay: expected a number >= 0, got {config.weight_decay}")
    if not 0 <= config.warmup_steps <= config.steps:
        raise UsageError(f"--warmup: expected 0 .. --steps ({config.steps}), got {config.warmup_steps}")
    if config.batch_size % world_size:
        raise UsageError(
            f"--batch-size {config.batch_size}: expected a multiple of the number of processes ({world_size})"
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


def pick_out(config: TrainConfig, resume: str | None) -> Path:
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


def file_stamp(path: Path) -> tuple | None:
    """The identity of the file at `path` (an atomic write makes a new one); None when there is none."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def build_model_config(config: TrainConfig, checkpoint: dict | None):
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
    config = resumed_config(given, checkpoint) if checkpoint else TrainConfig(**given)
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
    if checkpoint and checkpoint["data"]["sha256"] != corpus.sha256:
        saved = checkpoint["data"]["source"]
        raise UsageError(f"--resume: the checkpoint was trained on other data ({saved}) than {corpus.source}")
    training = build_training(model_config, config, device, checkpoint)
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
        training,
        checkpoint_stamp,
    )


# --- training -------------------------------------------------------------------


def validation_loss(run: Run) -> float:
    """Mean validation loss (nats per byte) over the fixed validation windows, shared among ranks."""
    config = run.config
    offsets = validation_offsets(run.corpus, config.eval_batches * config.batch_size, config.seq_len)
    return evaluate(
        run.training.model,
        run.corpus.val,
        offsets,
        config.seq_len,
        config.batch_size,
        run.autocast_dtype,
        run.rank,
        run.world_size,
    )


def run_step(net: torch.nn.Module, run: Run, step: int) -> float:
    """One optimizer step on this rank's share of step `step`'s global batch; returns the global mean loss."""
    config, training = run.config, run.training
    share = train_batch(run.corpus, step, config.seed, config.batch_size, config.seq_len, run.rank, run.world_size)
    inputs, targets = (t.to(run.device) for t in share)
    loss = train_step(
        net, inputs, targets, training.optimizer, training.scheduler, config.grad_clip, run.autocast_dtype
    )
    return all_reduce_sum(loss.double(), run.world_size).item() / run.world_size


def checkpoint_dict(run: Run, step: int) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": run.training.model.state_dict(),
        "model_config": dataclasses.asdict(run.model_config),
        "train_config": dataclasses.asdict(run.config),
        "optimizer": run.training.optimizer.state_dict(),
        "scheduler": run.training.scheduler.state_dict(),
        "rng": rng_states(),
        "data": {"sha256": run.corpus.sha256, "source": run.corpus.source},
    }


class RunFolder:
    """The files of the run folder; only rank 0 makes one.

    It holds the folder's lock from its creation to the end of the process, so
    that no other run writes the folder meanwhile, and checks under the lock
    that the folder is still as `prepare` found it.
    """

    def __init__(self, run: Run):
        self.out = run.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = lock_folder(self.out)
        if file_stamp(self.out / CHECKPOINT_NAME) != run.checkpoint_stamp:
            raise UsageError(
                f"--out {self.out}: another run wrote its {CHECKPOINT_NAME} while this one started; run the command again"
            )
        self.remove_leftovers()
        self.metrics = self.out / METRICS_NAME
        self.records = self.kept_records(run.start_step)
        atomic_write(self.metrics, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in self.records))
        config = {"train": dataclasses.asdict(run.config), "model": dataclasses.asdict(run.model_config)}
        atomic_write(self.out / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))

    def remove_leftovers(self) -> None:
        """Removes the temporary files of writers killed mid-write: under the lock no other writer is active."""
        for path in self.out.iterdir():
            if is_temporary_name(path.name):
                path.unlink()

    def kept_records(self, start_step: int) -> list[dict]:
        """A resumed run keeps the metrics up to its checkpoint and drops any logged after it,
        and a last line cut short (by a crash or a full disk): the file is rewritten without it."""
        if start_step == 0 or not self.metrics.exists():
            return []
        lines = self.metrics.read_text(errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            record = parse_record(line)
            if record is not None:
                records.append(record)
            elif number < len(lines) and line.strip():
                raise UsageError(f"--resume: {self.metrics}: line {number} is not a metrics record; mend or delete it")
        return [r for r in records if r["step"] <= start_step]

    def log(self, record: dict) -> None:
        self.records.append(record)
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Makes the metrics logged so far durable, before a checkpoint that follows them."""
        with self.metrics.open("a") as f:
            os.fsync(f.fileno())

    def plot(self) -> None:
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        for split, style in (("train", "-"), ("val", "o-")):
            points = [(r["step"], r["bpb"]) for r in self.records if r["split"] == split]
            if points:
                ax.plot(*zip(*points), style, label=f"{split}", markersize=4)
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.set_title(f"MM-Rec pretraining: {self.out.name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.out / "loss.png", lambda f: fig.savefig(f, format="png", dpi=100))


def lock_folder(out: Path):
    """The run folder's lock file, locked; refuses (UsageError) when another process holds it.

    The lock (fcntl.flock) lasts while the returned file stays open, and ends
    with the process, however it ends.
    """
    lock = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UsageError(
            f"--out {out}: another run (process {holder}) is writing this folder; "
            "wait until it ends or choose another --out"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def parse_record(line: str) -> dict | None:
    """The metrics record of a line of metrics.jsonl, or None if it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def setup_distributed(run: Run) -> None:
    if run.world_size > 1:
        if run.device.type == "cuda":
            torch.cuda.set_device(run.device)
        timeout = datetime.timedelta(seconds=run.config.dist_timeout)
        torch.distributed.init_process_group("nccl" if run.device.type == "cuda" else "gloo", timeout=timeout)


def training_module(run: Run) -> torch.nn.Module:
    """The module that training steps call: the model, in DDP across processes, compiled if asked."""
    net = run.training.model
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
    n_params = sum(p.numel() for p in run.training.model.parameters())
    precision = " with bf16 autocast" if run.autocast_dtype else ""
    return (
        f"{PROG}: {run.corpus.describe()}\n"
        f"{PROG}: model {config.preset} (D={mc.dim}, {mc.n_layers} layers, {mc.n_heads} heads, {mc.mode} mode; "
        f"{n_params:,} parameters) on {run.device}{precision}, {run.world_size} process(es); run folder {run.out}"
    )


def write_sample(run: Run) -> None:
    config = run.config
    prompt, length = config.sample_prompt, config.sample_tokens
    sample = generate_text(run.training.model, prompt, length, Sampling(seed=config.seed))
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
    non_finite = non_finite_entries(run.training.model.state_dict()) if weights else []
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
    """The training loop: steps, periodic validation + checkpoint + plot, a sample at the end.
    `folder`: the run folder on rank 0, None on the others."""
    config, is_writer = run.config, run.rank == 0
    if run.checkpoint:
        restore_rng_states(run.checkpoint["rng"])
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
            save_checkpoint(run.out / CHECKPOINT_NAME, checkpoint_dict(run, step))
            folder.plot()
            bar.write(f"step {step:>6}: val loss {val_loss:.4f}, val bits/byte {bits_per_byte(val_loss):.3f}")
        saved_step = step

    if run.start_step == 0:
        validate_and_save(0)
    tokens_per_step, rate = config.batch_size * config.seq_len, None
    for step in range(run.start_step, run.stop_step):
        started = time.perf_counter()
        loss = run_step(net, run, step)
        check_finite(run, step + 1, saved_step, loss, "training loss")
        seconds = time.perf_counter() - started
        # The first step of a process pays for warm-up (and compilation): it is not a rate.
        if step > run.start_step:
            rate = tokens_per_step / seconds if rate is None else 0.9 * rate + 0.1 * tokens_per_step / seconds
        done = step + 1
        tok_s = "-" if rate is None else f"{rate:,.0f}"
        bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{bits_per_byte(loss):.2f}", tok_s=tok_s, refresh=False)
        bar.update()
        if is_writer and (done % config.log_every == 0 or done == run.stop_step):
            lr = run.training.scheduler.get_last_lr()[0]
            record = {"step": done, "split": "train", "loss": loss, "bpb": bits_per_byte(loss), "lr": lr}
            folder.log({**record, "tokens_per_s": rate})
        if done % config.eval_every == 0 or done == run.stop_step:
            validate_and_save(done)
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


def is_peer_timeout(err: RuntimeError, world_size: int) -> bool:
    """Whether `err` is a collective that waited past --dist-timeout for another process.
    gloo raises it as a plain RuntimeError (from DDP's backward too), known by its words."""
    return world_size > 1 and re.search(r"timed out|timeout", str(err), re.IGNORECASE) is not None


def main(argv: list[str] | None = None) -> int:
    try:
        run = prepare(argv)
        folder = RunFolder(run) if run.rank == 0 else None
    except (UsageError, DataError, CheckpointError, DeviceError) as err:
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
        return fail(f"{write_failure(err)}; the run stopped, {run.out / CHECKPOINT_NAME} keeps its last checkpoint")
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
