"""How good the model is: MM-Rec, its ablations and Transformers trained alike, one row per
(arch, seed), then one report over the rows.

    python bench/quality.py run --arch mmrec --seed 0 --out runs/quality --compile
    python bench/quality.py run --arch transformer --seed 0 --out runs/quality --compile
    python bench/quality.py report runs/quality --out bench/results/quality_small_h100
    python bench/quality.py run --smoke --arch mmrec --seed 0 --out /tmp/quality   # tiny, CPU, seconds

Rows are independent: run them in any order, in separate calls or side by side in
parallel processes (processes that share a GPU share its throughput, so their tokens/s
are not the model's alone), then report the folder. A row longer than one sitting:
--checkpoint-every N writes its training checkpoint every N steps and --stop-at K stops at
step K; the same command then continues from the checkpoint, to the same row.

Archs, all with the preset's width, depth and heads:
  mmrec                the preset's MM-Rec
  mmrec-no-window      window = 0: without the working memory
  mmrec-no-longterm    n_levels = 0: without the long-term memory
  mmrec-no-recurrence  mode = "none": without the short-term recurrence
  transformer          bench/transformer.py's GPT, full causal attention
  transformer-window   the same GPT attending to the last `window` tokens (the preset's)

A row: torch.manual_seed(seed), the model, then --steps optimizer steps through
mmrec_model.training (AdamW, weight decay on matrices, clipping, linear warmup then
cosine; fused AdamW and bf16 autocast on CUDA; --compile compiles each block) on the
batches train_batch(corpus, step, seed) of the embedded corpus (the standard library's
source): every arch of one seed sees the same batches and schedule. With --final-steps N --final-seq-len L, the last N steps
read windows of L bytes instead, batch_size * seq_len / L of them (the same bytes a step),
as long-context pretraining ends on long windows: what a memory beyond the working memory
can learn to keep, it learns where the windows are long. Then, eagerly:
  - validation bits per byte on the fixed windows validation_offsets(corpus, val_windows, seq_len);
  - long-context bits per byte by position: the first L + 1 bytes (L = --long-len) of each
    validation document that has them (at most --long-docs, in corpus order), batch 1;
    the loss at each position, averaged over the documents and over the bands
    [0, L/16), [L/16, L/4), [L/4, L) (0-2K, 2K-8K, 8K-32K at L = 32K). MM-Rec reads the
    window in chunks of --chunk-size with its state carried, the Transformers in one call
    (the full one, trained at seq_len, is expected to degrade beyond it);
  - recall: in each long document, --probe-passages passages of --probe-len bytes P, at
    offsets o evenly spaced from P on (so that the farthest copy fits in --long-len), are each
    copied to start D bytes after them (the document's first o + D bytes, then the copy),
    for each D of --probe-distances; bits per byte on the copies against those on the
    passages' first occurrences. What a model recalls from beyond its window shows as
    copies cheaper than a model without that memory reads them at D > window.
It is written (atomically) to DIR/<label>-seed<S>.json, the label being the arch, for an
MM-Rec arch its --config overrides, +window=W with --window for an arch that has one, and
+finalLxN with a final phase (mmrec+level_slots=128, mmrec+window=256,
mmrec+final16384x500): settings, model configuration,
parameters, training bytes, time and tokens/s, the training curve (mean bits per byte of
every --log-every steps), the measurements, device, versions and date.

The report reads every DIR/*-seed*.json and gives, per label, the mean over seeds with
the range [min, max]; each ablation against the full model of the same seed, --config
overrides and final phase (so that one folder can hold a study of configurations), in
validation, past the first position band (2K-32K: issue 17's measure), in the farthest
band and on the farthest copy; bits per byte by position. It writes STEM.md, STEM.json
(rows and summary) and STEM.png (training curves and bits per byte by position, means over
seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import compile_blocks, markdown_table, model_logits, synchronize, versions  # noqa: E402
from bench.transformer import Transformer, TransformerConfig  # noqa: E402
from mmrec_model import MMRecConfig, MMRecModel  # noqa: E402
from mmrec_model.checkpoint import atomic_write  # noqa: E402
from mmrec_model.data import (  # noqa: E402
    Corpus,
    check_window_fits,
    corpus_from_documents,
    read_documents,
    train_batch,
    validation_documents,
    validation_offsets,
)
from mmrec_model.training import (  # noqa: E402
    autocast,
    bits_per_byte,
    default_autocast_dtype,
    evaluate,
    make_optimizer,
    make_scheduler,
    token_losses,
    train_step,
)

# Each ablation: the full model with one memory taken out (MMRecConfig overrides).
ABLATIONS = {
    "mmrec-no-window": ({"window": 0}, "working memory"),
    "mmrec-no-longterm": ({"n_levels": 0}, "long-term memory"),
    "mmrec-no-recurrence": ({"mode": "none"}, "short-term recurrence"),
}
MMREC_ARCHS = {"mmrec": {}, **{arch: overrides for arch, (overrides, _) in ABLATIONS.items()}}
ARCHS = (*MMREC_ARCHS, "transformer", "transformer-window")
ROW_GLOB = "*-seed*.json"
MIN_LONG_DOCS = 2  # fewer documents than this measure one text, not long context


@dataclass
class Settings:
    """What a row trains and measures: the `run` command's options."""

    preset: str = "small"
    sizes: dict = field(default_factory=dict)  # MMRecConfig overrides of the preset's sizes (--smoke's)
    window: int | None = None  # None: the preset's
    config: dict = field(default_factory=dict)  # MMRecConfig overrides of every MM-Rec arch (--config)
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 2048
    final_steps: int = 0
    final_seq_len: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 20
    val_windows: int = 64
    long_len: int = 32768
    long_docs: int = 8
    chunk_size: int = 4096
    probe_len: int = 256
    probe_distances: tuple[int, ...] = (512, 2048, 4096, 8192, 16384)
    probe_passages: int = 8
    compile: bool = False
    device: str = "cuda"

    @property
    def warmup_steps(self) -> int:
        return self.steps // 20


SMOKE = Settings(
    preset="tiny",
    sizes=dict(dim=32, n_layers=2, n_heads=2),
    steps=6,
    batch_size=2,
    seq_len=128,
    lr=3e-3,
    log_every=2,
    val_windows=4,
    long_len=1024,
    long_docs=2,
    chunk_size=256,
    probe_len=32,
    probe_distances=(64, 512),
    probe_passages=2,
    device="cpu",
)

OPTIONS = {  # option: (type, help)
    "preset": (str, "MMRecConfig preset whose width, depth, heads (and window) every arch takes"),
    "window": (int, "the working memory's window of mmrec, its ablations and transformer-window (None: the preset's)"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "windows per step"),
    "seq_len": (int, "bytes per training and validation window"),
    "final_steps": (
        int,
        "N: the last N steps read windows of --final-seq-len bytes (a long-window phase at the "
        "end, as long-context pretraining ends), the same bytes a step; 0: none",
    ),
    "final_seq_len": (
        int,
        "bytes per training window of the last --final-steps steps (a divisor of batch_size x seq_len)",
    ),
    "lr": (float, "peak learning rate"),
    "log_every": (int, "steps per point of the training curve"),
    "val_windows": (int, "validation windows"),
    "long_len": (int, "bytes of each long-context window"),
    "long_docs": (int, "most long documents measured"),
    "chunk_size": (int, "MM-Rec's chunk on the long-context windows"),
    "probe_len": (int, "bytes of the recalled passage"),
    "probe_distances": (int, "bytes from a passage to its copy (one or more)"),
    "probe_passages": (int, "recalled passages per long document"),
}


# --- a row ---------------------------------------------------------------------------------


def check_settings(settings: Settings) -> None:
    positive = (
        "steps",
        "batch_size",
        "seq_len",
        "log_every",
        "val_windows",
        "long_len",
        "long_docs",
        "chunk_size",
        "probe_len",
        "probe_passages",
    )
    for name in positive:
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(settings, name)}")
    longest = 2 * settings.probe_len + max(settings.probe_distances)
    if min(settings.probe_distances) < settings.probe_len or longest > settings.long_len + 1:
        raise ValueError(
            f"--probe-distances: expected each at least --probe-len ({settings.probe_len}) and "
            f"2 x --probe-len + the largest at most --long-len + 1 ({settings.long_len + 1}), "
            f"got {list(settings.probe_distances)}"
        )
    if not settings.lr > 0:
        raise ValueError(f"--lr: expected a positive number, got {settings.lr}")
    check_final_phase(settings)
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (--device cpu, or --smoke)")


def check_final_phase(settings: Settings) -> None:
    if not 0 <= settings.final_steps <= settings.steps:
        raise ValueError(f"--final-steps: expected 0 to --steps ({settings.steps}), got {settings.final_steps}")
    if not settings.final_steps:
        return
    step_bytes = settings.batch_size * settings.seq_len
    if settings.final_seq_len is None or settings.final_seq_len < 1 or step_bytes % settings.final_seq_len:
        raise ValueError(
            f"--final-seq-len: expected a divisor of --batch-size x --seq-len ({step_bytes}) with "
            f"--final-steps, got {settings.final_seq_len}"
        )


def check_final_windows_fit(corpus: Corpus, settings: Settings) -> None:
    length = settings.final_seq_len
    if settings.final_steps and len(corpus.train) < length + 1:
        raise ValueError(
            f"--final-seq-len {length} needs windows of {length + 1} bytes, but the training split of "
            f"{corpus.source} holds only {len(corpus.train)} bytes"
        )


def step_windows(settings: Settings, step: int) -> tuple[int, int]:
    """(windows, bytes a window) that step `step` trains on: batch_size x seq_len, or in the
    last final_steps steps batch_size x seq_len / final_seq_len windows of final_seq_len."""
    if step < settings.steps - settings.final_steps:
        return settings.batch_size, settings.seq_len
    return settings.batch_size * settings.seq_len // settings.final_seq_len, settings.final_seq_len


def model_config(arch: str, settings: Settings) -> MMRecConfig | TransformerConfig:
    """The preset (with settings.sizes) and the arch's overrides; a Transformer takes the
    preset's width, depth, heads and FFN width, and transformer-window its window."""
    window = {} if settings.window is None else {"window": settings.window}
    overrides = {**settings.sizes, **window, **settings.config, **MMREC_ARCHS.get(arch, {})}
    preset = MMRecConfig.preset(settings.preset, **overrides)
    if arch in MMREC_ARCHS:
        return preset
    window = preset.window if arch == "transformer-window" else None
    return TransformerConfig(
        dim=preset.dim, n_layers=preset.n_layers, n_heads=preset.n_heads, ffn_mult=preset.ffn_mult, window=window
    )


def build_model(config: MMRecConfig | TransformerConfig, seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MMRecModel(config) if isinstance(config, MMRecConfig) else Transformer(config)
    return model.to(device)


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The batch on `device`; to a GPU through pinned memory, so that the host does not wait
    for the GPU's queue (a pageable copy would)."""
    if device.type != "cuda":
        return batch
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


def loss_curve(losses: torch.Tensor, every: int) -> dict:
    """Mean training bits per byte over each `every` steps of the per-step losses [steps]:
    {"every", "step": the last step of each span (1-based), "bpb"}."""
    spans = losses.double().split(every)
    return {
        "every": every,
        "step": [min((i + 1) * every, len(losses)) for i in range(len(spans))],
        "bpb": [bits_per_byte(span.mean().item()) for span in spans],
    }


ROW_CHECKPOINT_FORMAT = "mmrec-quality-row-1"


@dataclasses.dataclass
class Resume:
    """A row's training checkpoint: written to `path` every `every` steps (0: never) and at
    `stop_at` (where training then stops), with the row's `identity` (arch, seed and settings); `saved`, the checkpoint found at `path` when
    the row started (read_row_checkpoint), from which it continues, exactly."""

    path: Path
    identity: dict
    every: int = 0
    stop_at: int | None = None
    saved: dict | None = None

    def due(self, done: int, settings: Settings) -> bool:
        if done >= settings.steps:
            return False
        return done == self.stop_at or bool(self.every and done % self.every == 0)


@dataclasses.dataclass
class Progress:
    """Where training stands: steps done, their losses (CPU) and the clocks. `steady_s` is the
    time of the steps after each run's first (which compiles), `steady_steps` their count."""

    done: int = 0
    losses: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))
    train_s: float = 0.0
    first_step_s: float | None = None
    steady_s: float = 0.0
    steady_steps: int = 0


def read_row_checkpoint(path: Path, identity: dict) -> dict | None:
    """The row checkpoint at path (None when there is none yet); a ValueError that says why
    for a file that is not one, or one of another row than `identity`."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"{path}: not a readable row checkpoint ({type(err).__name__}); delete it to start the row again"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != ROW_CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a row checkpoint of format {ROW_CHECKPOINT_FORMAT}")
    if saved["identity"] != identity:
        differ = sorted(
            k for k in identity["settings"] if saved["identity"]["settings"].get(k) != identity["settings"][k]
        )
        raise ValueError(
            f"{path}: the checkpoint is of another row (it differs in "
            f"{', '.join(differ) or 'arch or seed'}); delete it or use another --out"
        )
    return saved


def load_progress(resume: Resume, model, optimizer, scheduler) -> Progress:
    """The progress of resume.saved, its states loaded into model, optimizer and scheduler
    (a fresh Progress when the row had no checkpoint)."""
    if resume.saved is None:
        return Progress()
    model.load_state_dict(resume.saved["model"])
    optimizer.load_state_dict(resume.saved["optimizer"])
    scheduler.load_state_dict(resume.saved["scheduler"])
    return Progress(**resume.saved["progress"])


def save_progress(resume: Resume, progress: Progress, model, optimizer, scheduler) -> None:
    checkpoint = {
        "format": ROW_CHECKPOINT_FORMAT,
        "identity": resume.identity,
        "progress": dataclasses.asdict(progress),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    resume.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(resume.path, lambda file: torch.save(checkpoint, file))


def train(
    model: torch.nn.Module, corpus: Corpus, settings: Settings, seed: int, autocast_dtype, resume: Resume | None = None
) -> dict | None:
    """settings.steps steps on the batches of `seed`; times and the training curve (None when
    stopped at resume.stop_at). The loop reads nothing back from the GPU but at checkpoints;
    the steps that compile (each run's first, and the first of the final phase, which starts
    its own static graph) are left out of the steady clock."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, settings.lr, settings.weight_decay, fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, settings.warmup_steps, settings.steps)
    progress = load_progress(resume, model, optimizer, scheduler) if resume else Progress()
    if progress.done:
        print(f"quality: continuing from step {progress.done} ({resume.path})", file=sys.stderr, flush=True)
    losses, first = [], progress.done
    final_from = settings.steps - settings.final_steps
    compiling = {first, final_from} if settings.final_steps else {first}
    clock = steady_clock = time.perf_counter()
    steady_from = first + 1  # the first step of a run compiles: the steady clock starts after it

    def hold_steady_clock(step: int) -> float:
        """Adds the steady steps before `step` and their time; returns the time now."""
        synchronize(device.type)
        now = time.perf_counter()
        progress.steady_s += now - steady_clock
        progress.steady_steps += step - steady_from
        return now

    def take_stock() -> None:
        nonlocal losses, clock, steady_clock, steady_from
        now = hold_steady_clock(progress.done)
        progress.train_s += now - clock
        progress.losses = torch.cat([progress.losses, torch.stack(losses).cpu().float()])
        losses, clock, steady_clock, steady_from = [], now, now, progress.done

    for step in tqdm(range(first, settings.steps), desc="train", unit="step", mininterval=10, file=sys.stderr):
        if step in compiling and step != first:
            hold_steady_clock(step)
            if settings.compile:
                torch._dynamo.reset()  # a static graph for the new shape, not a dynamic one for both
        windows, seq_len = step_windows(settings, step)
        inputs, targets = to_device(train_batch(corpus, step, seed, windows, seq_len), device)
        loss = train_step(model, inputs, targets, optimizer, scheduler, settings.grad_clip, autocast_dtype)
        losses.append(loss)
        if step in compiling:
            synchronize(device.type)
            steady_clock, steady_from = time.perf_counter(), step + 1
            if progress.first_step_s is None:
                progress.first_step_s = steady_clock - clock
        if resume and resume.due(step + 1, settings):
            progress.done = step + 1
            take_stock()
            save_progress(resume, progress, model, optimizer, scheduler)
            if progress.done == resume.stop_at:
                return None
    progress.done = settings.steps
    take_stock()
    step_tokens = settings.batch_size * settings.seq_len
    return {
        "train_s": progress.train_s,
        "first_step_s": progress.first_step_s,
        "tokens_per_s": progress.steady_steps * step_tokens / progress.steady_s if progress.steady_steps else None,
        "curve": loss_curve(progress.losses, settings.log_every),
    }


def position_bands(length: int) -> list[tuple[int, int]]:
    """[0, L/16), [L/16, L/4), [L/4, L): 0-2K, 2K-8K, 8K-32K at L = 32768."""
    return [(0, length // 16), (length // 16, length // 4), (length // 4, length)]


def size_label(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def long_windows(documents: list[bytes], corpus: Corpus, length: int, count: int) -> list[torch.Tensor]:
    """The first length + 1 bytes (int64) of each validation document that has them, at most `count`."""
    starts = [start for start, size in validation_documents(documents) if size >= length + 1][:count]
    return [corpus.val[start : start + length + 1].long() for start in starts]


@torch.no_grad()
def position_losses(model, windows: list[torch.Tensor], chunk_size: int, autocast_dtype) -> torch.Tensor:
    """Next-byte loss at every position of each window (all of length L + 1), [windows, L],
    in one batch."""
    device = next(model.parameters()).device
    model.eval()
    ids = torch.stack(windows).to(device)
    with autocast(device, autocast_dtype):
        logits = model_logits(model, ids[:, :-1], chunk_size)
    return token_losses(logits, ids[:, 1:])


def long_context(model, documents: list[bytes], corpus: Corpus, settings: Settings, autocast_dtype) -> dict:
    """Bits per byte by position band on the long validation documents (or a note why not)."""
    length = settings.long_len
    windows = long_windows(documents, corpus, length, settings.long_docs)
    measured = {"length": length, "documents": len(windows), "bands": []}
    if len(windows) < MIN_LONG_DOCS:
        measured["note"] = (
            f"not measured: {len(windows)} validation document(s) of {corpus.source} hold "
            f"{length + 1} bytes, fewer than {MIN_LONG_DOCS}"
        )
        return measured
    losses = position_losses(model, windows, settings.chunk_size, autocast_dtype)
    for start, end in position_bands(length):
        band = {"band": f"{size_label(start)}-{size_label(end)}", "start": start, "end": end}
        measured["bands"].append({**band, "bpb": bits_per_byte(losses[:, start:end].mean().item())})
    return measured


def recall_sequence(window: torch.Tensor, offset: int, distance: int, passage_len: int) -> torch.Tensor:
    """The window's first offset + distance bytes, then again its bytes [offset, offset + P)
    (P = passage_len): the passage that starts at offset, copied to start `distance` bytes later."""
    return torch.cat([window[: offset + distance], window[offset : offset + passage_len]])


def probe_offsets(settings: Settings) -> list[int]:
    """Where the recalled passages start: --probe-passages offsets evenly spaced from P on,
    the last one leaving room for the passage's copy at the largest distance."""
    P, count = settings.probe_len, settings.probe_passages
    last = settings.long_len + 1 - max(settings.probe_distances) - P
    return [P + (last - P) * i // max(count - 1, 1) for i in range(count)]


def recall(model, documents: list[bytes], corpus: Corpus, settings: Settings, autocast_dtype) -> dict:
    """Bits per byte on a passage's second occurrence, at each distance from its first, and
    on its first occurrence (the same bytes, never seen before), on the long documents."""
    windows = long_windows(documents, corpus, settings.long_len, settings.long_docs)
    P = settings.probe_len
    offsets = probe_offsets(settings)
    measured = {"passage_len": P, "documents": len(windows), "offsets": offsets, "first_bpb": None, "distances": []}
    if len(windows) < MIN_LONG_DOCS:
        measured["note"] = f"not measured: {len(windows)} long validation document(s), fewer than {MIN_LONG_DOCS}"
        return measured
    firsts = []
    for distance in settings.probe_distances:
        copies = []
        for offset in offsets:
            sequences = [recall_sequence(window, offset, distance, P) for window in windows]
            # The loss at i predicts byte i + 1: the passage is bytes [o, o + P), its copy [o + D, o + D + P).
            losses = position_losses(model, sequences, settings.chunk_size, autocast_dtype)
            firsts.append(losses[:, offset - 1 : offset + P - 1])
            copies.append(losses[:, offset + distance - 1 : offset + distance + P - 1])
        measured["distances"].append({"distance": distance, "copy_bpb": bits_per_byte(torch.cat(copies).mean().item())})
    # Each distance reads the same first occurrences (causal: the bytes before them are the same).
    measured["first_bpb"] = bits_per_byte(torch.cat(firsts).mean().item())
    return measured


def measure_row(
    arch: str,
    seed: int,
    settings: Settings,
    config,
    documents: list[bytes],
    corpus: Corpus,
    resume: Resume | None = None,
) -> dict | None:
    """Trains the arch on the batches of `seed`, then measures it: the row's record (None when
    training stopped at resume.stop_at)."""
    device = torch.device(settings.device)
    model = build_model(config, seed, device)
    if settings.compile:
        compile_blocks(model)
    autocast_dtype = default_autocast_dtype(device)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"quality: {arch} seed {seed}: {parameters:,} parameters, {settings.steps} steps of "
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
    return {
        "arch": arch,
        "seed": seed,
        "settings": dataclasses.asdict(settings),
        "model_config": dataclasses.asdict(config),
        "parameters": parameters,
        "tokens": settings.steps * settings.batch_size * settings.seq_len,
        **trained,
        "val_loss": val_loss,
        "val_bpb": bits_per_byte(val_loss),
        "long_context": long,
        "recall": recalled,
        "corpus": corpus.describe(),
        "autocast": str(autocast_dtype).replace("torch.", ""),
        **versions(settings.device),
        "command": "python " + " ".join(sys.argv),
    }


def row_label(row: dict) -> str:
    """The row's arch, with the --config overrides an MM-Rec arch ran with, +window=W for an
    arch with a window trained with --window W, then +carryK for a recorded row trained on K
    consecutive chunks with the state carried (a variant no longer trained) and +finalLxN for
    one whose last N steps read windows of L bytes:
    'mmrec+level_slots=128', 'mmrec+window=256', 'transformer+carry8', 'mmrec+final16384x500'.
    Rows of different settings so get different files in one folder, and the report pairs
    each ablation with the full model of the same settings."""
    label = row["arch"]
    if row["arch"] in MMREC_ARCHS:
        label += "".join(f"+{name}={value}" for name, value in row["settings"].get("config", {}).items())
    window = row["settings"].get("window")
    if window is not None and row["arch"] in (*MMREC_ARCHS, "transformer-window"):
        label += f"+window={window}"
    carry = row["settings"].get("carry_chunks", 1)
    label += f"+carry{carry}" if carry != 1 else ""
    final = row["settings"].get("final_steps", 0)
    return label + (f"+final{row['settings']['final_seq_len']}x{final}" if final else "")


def row_stem(row: dict) -> str:
    return f"{row_label(row)}-seed{row['seed']}"


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
    if stop_at is not None and not 0 < stop_at < settings.steps:
        raise ValueError(
            f"--stop-at: expected a step between 0 and --steps ({settings.steps}), exclusive, got {stop_at}"
        )
    identity = {"arch": args.arch, "seed": args.seed, "settings": dataclasses.asdict(settings)}
    path = args.out / f"{row_stem(identity)}.ckpt.pt"
    return Resume(path, identity, every, stop_at, read_row_checkpoint(path, identity))


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
        check_settings(settings)
        config = model_config(args.arch, settings)
        documents, source = read_documents(None)
        corpus = corpus_from_documents(documents, source)
        check_window_fits(corpus, settings.seq_len)
        check_final_windows_fit(corpus, settings)
        resume = row_resume(args, settings)
    except ValueError as err:
        sys.exit(f"quality.py run: error: {err}")
    row = measure_row(args.arch, args.seed, settings, config, documents, corpus, resume)
    if row is None:
        print(f"{resume.path}: stopped at step {resume.stop_at}; the same command without --stop-at continues")
        return
    path = write_row(row, args.out)
    if resume:
        resume.path.unlink(missing_ok=True)
    bands = ", ".join(f"{b['band']} {b['bpb']:.3f}" for b in row["long_context"]["bands"]) or "-"
    copies = ", ".join(f"{size_label(d['distance'])} {d['copy_bpb']:.3f}" for d in row["recall"]["distances"]) or "-"
    print(
        f"{path}: val bits/byte {row['val_bpb']:.4f}; by position {bands}; recalled passage at {copies}; "
        f"{row['train_s']:.0f} s"
    )


# --- the report ----------------------------------------------------------------------------


def load_rows(folder: Path) -> list[dict]:
    paths = sorted(folder.glob(ROW_GLOB))
    if not paths:
        raise ValueError(f"{folder}: no rows (<label>-seed<S>.json) to report")
    return [json.loads(path.read_text()) for path in paths]


def group_by_label(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows per label (archs in ARCHS' order, then any other), each list in seed order."""
    order = {arch: i for i, arch in enumerate(ARCHS)}
    groups = {}
    for row in sorted(rows, key=lambda r: (order.get(r["arch"], len(order)), row_label(r), r["seed"])):
        groups.setdefault(row_label(row), []).append(row)
    return groups


def stats(values: list[float]) -> dict | None:
    """Mean, min, max and count of `values`; None when there are none."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def mean_curve(rows: list[dict]) -> dict:
    """The training curve averaged over the rows (to the shortest)."""
    n = min(len(r["curve"]["bpb"]) for r in rows)
    bpb = [statistics.fmean(r["curve"]["bpb"][i] for r in rows) for i in range(n)]
    return {"step": rows[0]["curve"]["step"][:n], "bpb": bpb}


def band_bpb(row: dict) -> dict[str, float]:
    return {band["band"]: band["bpb"] for band in row["long_context"]["bands"]}


def farthest_bpb(row: dict) -> float | None:
    """Bits per byte of the last position band (beyond a window's reach); None if not measured."""
    bands = row["long_context"]["bands"]
    return bands[-1]["bpb"] if bands else None


def past_first_band_bpb(row: dict) -> float | None:
    """Bits per byte over every position past the first band (2K-32K at L = 32768: beyond
    the preset's training windows), the bands' figures weighted by their lengths; None if
    not measured."""
    bands = row["long_context"]["bands"][1:]
    if not bands:
        return None
    return sum(b["bpb"] * (b["end"] - b["start"]) for b in bands) / sum(b["end"] - b["start"] for b in bands)


def past_first_band_label(row: dict) -> str | None:
    """'2K-32K' at L = 32768: the positions past_first_band_bpb covers."""
    bands = row["long_context"]["bands"][1:]
    return f"{size_label(bands[0]['start'])}-{size_label(bands[-1]['end'])}" if bands else None


def copy_bpb(row: dict) -> dict[int, float]:
    """Bits per byte on the recalled copy by distance ({} for rows from before the probe)."""
    return {d["distance"]: d["copy_bpb"] for d in row.get("recall", {}).get("distances", [])}


def first_occurrence_bpb(row: dict) -> float | None:
    """Bits per byte on the probe's passages themselves (None for rows from before the probe)."""
    return row.get("recall", {}).get("first_bpb")


def farthest_copy_bpb(row: dict) -> float | None:
    copies = copy_bpb(row)
    return copies[max(copies)] if copies else None


def recall_summary(rows: list[dict]) -> dict:
    copies = [copy_bpb(r) for r in rows]
    distances = sorted({d for c in copies for d in c})
    return {
        "first_bpb": stats([bpb for bpb in map(first_occurrence_bpb, rows) if bpb]),
        "copy_bpb": {str(d): stats([c[d] for c in copies if d in c]) for d in distances},
    }


def arch_summary(rows: list[dict]) -> dict:
    bands = [band_bpb(r) for r in rows]
    labels = list(dict.fromkeys(label for b in bands for label in b))
    return {
        "seeds": [r["seed"] for r in rows],
        "parameters": rows[0]["parameters"],
        "tokens": rows[0]["tokens"],
        "tokens_per_s": stats([r["tokens_per_s"] for r in rows if r["tokens_per_s"]]),
        "val_bpb": stats([r["val_bpb"] for r in rows]),
        "bands": {label: stats([b[label] for b in bands if label in b]) for label in labels},
        "long_context_notes": sorted({r["long_context"]["note"] for r in rows if "note" in r["long_context"]}),
        "recall": recall_summary(rows),
        "curve": mean_curve(rows),
    }


def spread(summary: dict | None) -> float | None:
    """max - min over seeds; None with fewer than two."""
    return summary["max"] - summary["min"] if summary and summary["n"] > 1 else None


def delta_stats(pairs: list[tuple[dict, dict]], measure) -> dict | None:
    """stats of measure(ablation) - measure(full) over the (ablation, full) row pairs where
    both were measured (measure: row -> float or None)."""
    values = [(measure(r), measure(f)) for r, f in pairs]
    return stats([a - b for a, b in values if a is not None and b is not None])


def ablation_summary(groups: dict[str, list[dict]], archs: dict[str, dict]) -> list[dict]:
    """Each ablation minus the full model (mmrec) of the same seed, --config overrides,
    carried chunks and final phase (the rest of its label): validation, the positions past the first band
    (beyond the training windows), the farthest band and the farthest recalled copy."""
    ablations = []
    for full_label, full_rows in groups.items():
        if full_rows[0]["arch"] != "mmrec":
            continue
        overrides = full_label.removeprefix("mmrec")
        full = {r["seed"]: r for r in full_rows}
        full_bands = archs[full_label]["bands"]
        far_band = list(full_bands)[-1] if full_bands else None
        for arch, (_, removes) in ABLATIONS.items():
            pairs = [(r, full[r["seed"]]) for r in groups.get(arch + overrides, []) if r["seed"] in full]
            if not pairs:
                continue
            full_past = [bpb for bpb in map(past_first_band_bpb, full_rows) if bpb is not None]
            ablations.append(
                {
                    "arch": arch + overrides,
                    "full": full_label,
                    "removes": removes,
                    "seeds": [r["seed"] for r, _ in pairs],
                    "val_delta": delta_stats(pairs, lambda row: row["val_bpb"]),
                    "far_band": far_band,
                    "far_delta": delta_stats(pairs, farthest_bpb),
                    "past_band": past_first_band_label(full_rows[0]),
                    "past_delta": delta_stats(pairs, past_first_band_bpb),
                    "full_val_spread": spread(archs[full_label]["val_bpb"]),
                    "full_far_spread": spread(full_bands.get(far_band)),
                    "full_past_spread": spread(stats(full_past)),
                    "recall_delta": delta_stats(pairs, farthest_copy_bpb),
                    "first_delta": delta_stats(pairs, first_occurrence_bpb),
                }
            )
    return ablations


def distinct(rows: list[dict], key: str) -> str:
    return ", ".join(sorted({str(r.get(key) or "-") for r in rows}))


def header_summary(rows: list[dict]) -> dict:
    """Where and with what the rows ran, and the settings that differ between them."""
    settings = [r["settings"] for r in rows]
    # The labels carry each MM-Rec row's --config overrides, --window and each row's carried
    # chunks and final phase.
    labelled = ("config", "window", "carry_chunks", "final_steps", "final_seq_len")
    differing = sorted(
        name for name in settings[0] if name not in labelled and len({json.dumps(s.get(name)) for s in settings}) > 1
    )
    return {
        "rows": len(rows),
        "device": distinct(rows, "device"),
        "torch": distinct(rows, "torch"),
        "triton": distinct(rows, "triton"),
        "dates": distinct(rows, "date"),
        "corpus": distinct(rows, "corpus"),
        "settings": settings[0],
        "differing_settings": differing,
        "carry_chunks": sorted({s.get("carry_chunks", 1) for s in settings}),
        "final_phase": any(s.get("final_steps", 0) for s in settings),
    }


def summarize(rows: list[dict]) -> dict:
    groups = group_by_label(rows)
    archs = {label: arch_summary(label_rows) for label, label_rows in groups.items()}
    ablations = ablation_summary(groups, archs)
    return {"header": header_summary(rows), "archs": archs, "ablations": ablations}


def fmt_stats(summary: dict | None, spec: str = ".4f") -> str:
    """'mean [min, max]' ('mean' alone for one seed; '-' for none)."""
    if summary is None:
        return "-"
    if summary["n"] == 1:
        return format(summary["mean"], spec)
    return f"{summary['mean']:{spec}} [{summary['min']:{spec}}, {summary['max']:{spec}}]"


def beyond(delta: dict | None, full_spread: float | None) -> str:
    """Whether the ablation's mean loss increase exceeds the full model's spread between seeds."""
    if delta is None or full_spread is None:
        return "n/a"
    return "yes" if delta["mean"] > full_spread else "no"


def render(summary: dict) -> str:
    head, archs = summary["header"], summary["archs"]
    s = head["settings"]
    overrides = {**s["sizes"], **({} if s.get("window") is None else {"window": s["window"]})}
    sizes = "".join(f", {name} {value}" for name, value in overrides.items())
    lines = [
        "# Quality: MM-Rec, its ablations and Transformers trained alike",
        "",
        f"{head['rows']} rows (`bench/quality.py run`); {head['device']}; torch {head['torch']}; "
        f"Triton {head['triton']}; dated {head['dates']}.",
        f"Preset {s['preset']}{sizes}; {s['steps']} steps of {s['batch_size']} x {s['seq_len']} bytes, "
        f"lr {s['lr']}, compiled: {s['compile']}; validation: {s['val_windows']} windows of {s['seq_len']} bytes; "
        f"long context: windows of {s['long_len']} bytes. Corpus: {head['corpus']}.",
        "Figures: mean over seeds, with [min, max] over seeds when there are several. Tokens/s are "
        "while training, with rows that ran side by side sharing one GPU: not a model's own speed "
        "(bench/model_gpu.py measures that).",
    ]
    if head["carry_chunks"] != [1]:
        lines.append(
            "Rows labelled +carryK trained on each group of K steps as K consecutive windows of the same "
            "streams, MM-Rec carrying its state (detached) from one to the next; the others, on "
            "independent windows."
        )
    if head.get("final_phase"):
        lines.append(
            "Rows labelled +finalLxN trained their last N steps on windows of L bytes (as many as make "
            "the same bytes a step); validation is on the windows of seq_len bytes for every row."
        )
    if head["differing_settings"]:
        lines.append(f"**The rows differ in settings: {', '.join(head['differing_settings'])}.**")
    lines += ["", "## Validation", ""] + markdown_table(
        ["arch", "seeds", "parameters", "training bytes", "tokens/s", "val bits/byte"],
        [
            [
                arch,
                str(len(a["seeds"])),
                f"{a['parameters'] / 1e6:.2f}M",
                f"{a['tokens'] / 1e6:.1f}M",
                fmt_stats(a["tokens_per_s"], ",.0f"),
                fmt_stats(a["val_bpb"]),
            ]
            for arch, a in archs.items()
        ],
    )
    if summary["ablations"]:
        lines += [
            "",
            "## Ablations: the full model (mmrec) without one memory, seed by seed",
            "",
            "Δ = ablation - full model (bits/byte; > 0: the memory helps). Beyond spread: the mean Δ "
            "exceeds the full model's spread (max - min) between seeds (n/a with one seed). A memory "
            "recalls only as far as its Δ on a copy exceeds its Δ on the passage's first occurrence, "
            "which no memory can help.",
            "",
        ]
        lines += markdown_table(
            [
                "without",
                "arch",
                "seeds",
                "Δ val",
                "Δ past the first band",
                "Δ farthest band",
                "beyond spread (val, past first, far)",
                "Δ recall, farthest copy",
                "Δ first occurrence",
            ],
            [
                [
                    a["removes"],
                    a["arch"],
                    str(len(a["seeds"])),
                    fmt_stats(a["val_delta"], "+.4f"),
                    f"{fmt_stats(a['past_delta'], '+.4f')} ({a['past_band'] or '-'})",
                    f"{fmt_stats(a['far_delta'], '+.4f')} ({a['far_band'] or '-'})",
                    f"{beyond(a['val_delta'], a['full_val_spread'])}, {beyond(a['past_delta'], a['full_past_spread'])}, "
                    f"{beyond(a['far_delta'], a['full_far_spread'])}",
                    fmt_stats(a.get("recall_delta"), "+.4f"),
                    fmt_stats(a.get("first_delta"), "+.4f"),
                ]
                for a in summary["ablations"]
            ],
        )
    labels = list(dict.fromkeys(label for a in archs.values() for label in a["bands"]))
    lines += ["", "## Long context: bits per byte by position", ""]
    if labels:
        band_rows = [[arch, *(fmt_stats(a["bands"].get(label)) for label in labels)] for arch, a in archs.items()]
        lines += markdown_table(["arch", *labels], band_rows)
    lines += [f"{arch}: {note}" for arch, a in archs.items() for note in a["long_context_notes"]]
    distances = sorted({int(d) for a in archs.values() for d in a["recall"]["copy_bpb"]})
    if distances:
        lines += [
            "",
            "## Recall: bits per byte on a passage's copy, D bytes after the passage",
            "",
            f"Passages of {s.get('probe_len')} bytes, {s.get('probe_passages', 1)} per long document; "
            '"first": the passages themselves (never seen before). What a memory recalls shows as copies '
            "cheaper than without it.",
            "",
        ]
        lines += markdown_table(
            ["arch", "first", *(f"D = {size_label(d)}" for d in distances)],
            [
                [
                    arch,
                    fmt_stats(a["recall"]["first_bpb"]),
                    *(fmt_stats(a["recall"]["copy_bpb"].get(str(d))) for d in distances),
                ]
                for arch, a in archs.items()
                if a["recall"]["copy_bpb"]
            ],
        )
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    recalled = any(a["recall"]["copy_bpb"] for a in summary["archs"].values())
    fig = Figure(figsize=(19 if recalled else 13, 4.5))
    ax_curve, ax_bands, *ax_recall = fig.subplots(1, 3 if recalled else 2)
    for arch, a in summary["archs"].items():
        ax_curve.plot(a["curve"]["step"], a["curve"]["bpb"], label=arch)
        if a["bands"]:
            means = [band["mean"] for band in a["bands"].values()]
            ax_bands.plot(range(len(means)), means, "o-", label=arch)
            ax_bands.set_xticks(range(len(means)), list(a["bands"]))
        if a["recall"]["copy_bpb"]:
            distances = [int(d) for d in a["recall"]["copy_bpb"]]
            ax_recall[0].plot(distances, [c["mean"] for c in a["recall"]["copy_bpb"].values()], "o-", label=arch)
    ax_curve.set(title="training loss, mean over seeds", xlabel="step", ylabel="bits per byte")
    ax_bands.set(title="long context: bits per byte by position", xlabel="position band", ylabel="bits per byte")
    for ax in ax_recall:
        ax.set(
            title="recall: bits per byte on a passage's copy",
            xlabel="bytes from the passage to its copy",
            ylabel="bits per byte",
            xscale="log",
        )
    for ax in (ax_curve, ax_bands, *ax_recall):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report_command(args: argparse.Namespace) -> None:
    try:
        rows = load_rows(args.folder)
    except ValueError as err:
        sys.exit(f"quality.py report: error: {err}")
    stem = args.out or args.folder / "report"
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    table = render(summary)
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    plot(summary, stem.with_suffix(".png"))
    print(table)


def config_item(text: str) -> tuple[str, int | float | str]:
    """'FIELD=VALUE' -> (FIELD, VALUE as an int, else a float, else the text)."""
    field_name, sep, value = text.partition("=")
    if not sep or not field_name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return field_name, kind(value)
        except ValueError:
            pass
    return field_name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train and measure one (arch, seed) row")
    run.add_argument("--arch", required=True, choices=ARCHS)
    run.add_argument("--seed", type=int, required=True, help="seeds the initial weights and the training batches")
    run.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder of the rows")
    run.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds: checks the script")
    for name, (kind, help_text) in OPTIONS.items():
        defaults = f"default {getattr(Settings(), name)}, --smoke {getattr(SMOKE, name)}"
        several = "+" if isinstance(getattr(Settings(), name), tuple) else None
        run.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            nargs=several,
            default=argparse.SUPPRESS,
            help=f"{help_text} ({defaults})",
        )
    run.add_argument(
        "--config",
        type=config_item,
        action="append",
        default=argparse.SUPPRESS,
        metavar="FIELD=VALUE",
        help="an MMRecConfig field of every MM-Rec arch (the ablation's own field wins), e.g. "
        "level_slots=128 or n_levels=2; repeatable",
    )
    run.add_argument("--compile", action="store_true", default=argparse.SUPPRESS, help="torch.compile each block")
    run.add_argument("--device", choices=["cuda", "cpu"], default=argparse.SUPPRESS, help="default cuda (--smoke: cpu)")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="write the row's training checkpoint (OUT/<label>-seed<S>.ckpt.pt) every N steps; a run "
        "whose checkpoint exists continues from it, exactly (default 0: never)",
    )
    run.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop training at STEP with a checkpoint, to continue in a later run (rows longer than one sitting)",
    )
    report = commands.add_parser("report", help="tables and plots over the rows of a folder")
    report.add_argument("folder", type=Path, help="folder of the rows (run's --out)")
    report.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="STEM",
        help="writes STEM.md, STEM.json, STEM.png (default: FOLDER/report)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.command == "run":
        run_command(args)
    else:
        report_command(args)


if __name__ == "__main__":
    main()
