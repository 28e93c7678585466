"""The quality bench's archs, its settings and their checks, each arch's model
configuration, and the labels that name a row by its arch and settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from bench.transformer import TransformerConfig
from mmrec_model import MMRecConfig
from mmrec_model.training import TrainSettings
from mmrec_model.training.settings import FINAL_PHASE_HELP

# Each ablation: the full model with one memory taken out (MMRecConfig overrides).
ABLATIONS = {
    "mmrec-no-window": ({"window": 0}, "working memory"),
    "mmrec-no-longterm": ({"top_k": 0}, "long-term memory"),
    "mmrec-no-recurrence": ({"mode": "none"}, "short-term recurrence"),
}
MMREC_ARCHS = {"mmrec": {}, **{arch: overrides for arch, (overrides, _) in ABLATIONS.items()}}
ARCHS = (*MMREC_ARCHS, "transformer", "transformer-window")
# The recall probe's distances (default: those whose copy --long-len holds) and the passkey's
# contexts (those up to --passkey-max-len), in bytes.
PROBE_DISTANCES = (512, 2048, 4096, 8192, 16384, 32768, 65536)
PASSKEY_CONTEXTS = (512, 1024, 4096, 16384, 65536, 262144)


@dataclass
class Settings(TrainSettings):
    """What a row trains and measures, the `run` command's options: the training
    (TrainSettings, with this bench's defaults), the model (the preset, its sizes, window
    and --config overrides), a final phase of long windows, and the measurements."""

    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 2048
    lr: float = 1e-3
    log_every: int = 20
    device: str = "cuda"
    preset: str = "small"
    sizes: dict = field(default_factory=dict)  # MMRecConfig overrides of the preset's sizes (--smoke's)
    window: int | None = None  # None: the preset's
    config: dict = field(default_factory=dict)  # MMRecConfig overrides of every MM-Rec arch (--config)
    val_windows: int = 64
    long_len: int = 32768
    long_docs: int = 8
    chunk_size: int = 4096
    probe_len: int = 256
    probe_distances: tuple[int, ...] | None = None  # None: those of PROBE_DISTANCES that long_len holds
    probe_passages: int = 8
    passkey_max_len: int = 65536
    passkey_trials: int = 20
    time_budget: float | None = None  # seconds of steady training; sets the steps (bench.quality.budget)


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
    passkey_max_len=1024,
    passkey_trials=2,
    device="cpu",
)

OPTIONS = {  # option: (type, help)
    "preset": (str, "MMRecConfig preset whose width, depth, heads (and window) every arch takes"),
    "window": (int, "the working memory's window of mmrec, its ablations and transformer-window (None: the preset's)"),
    "steps": (int, "optimizer steps"),
    "time_budget": (
        float,
        "SECONDS of steady training instead of --steps: a timed warm-up of a few steps of each phase "
        "(after the one that compiles) sets the steps that fit, and the schedule with them; compiling "
        "and the warm-up are not counted",
    ),
    "batch_size": (int, "windows per step"),
    "seq_len": (int, "bytes per training and validation window"),
    "final_steps": (int, FINAL_PHASE_HELP["final_steps"]),
    "final_seq_len": (int, FINAL_PHASE_HELP["final_seq_len"]),
    "lr": (float, "peak learning rate"),
    "log_every": (int, "steps per point of the training curve"),
    "val_windows": (int, "validation windows"),
    "long_len": (int, "bytes of each long-context window"),
    "long_docs": (int, "most long documents measured"),
    "chunk_size": (int, "MM-Rec's chunk on the long-context windows"),
    "probe_len": (int, "bytes of the recalled passage"),
    "probe_distances": (
        int,
        "bytes from a passage to its copy, one or more (None: those of "
        f"{' '.join(map(str, PROBE_DISTANCES))} whose copy --long-len holds)",
    ),
    "probe_passages": (int, "recalled passages per long document"),
    "passkey_max_len": (
        int,
        f"the passkey test's longest context: those of {' '.join(map(str, PASSKEY_CONTEXTS))} bytes up to it",
    ),
    "passkey_trials": (int, "passkey trials per context (keys and depths the same for every row)"),
}


def check_settings(settings: Settings) -> None:
    """A ValueError naming the first option that cannot train or measure. With a time
    budget the steps are not known yet, only that they outnumber the final phase's."""
    steps = settings.steps if settings.time_budget is None else max(settings.steps, settings.final_steps + 1)
    dataclasses.replace(settings, steps=steps).check()
    for name in ("val_windows", "long_len", "long_docs", "chunk_size", "probe_len", "probe_passages", "passkey_trials"):
        if getattr(settings, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(settings, name)}")
    check_probe_distances(settings)
    if settings.time_budget is not None and not settings.time_budget > 0:
        raise ValueError(f"--time-budget: expected a positive number of seconds, got {settings.time_budget}")
    if settings.passkey_max_len < PASSKEY_CONTEXTS[0]:
        raise ValueError(
            f"--passkey-max-len: expected at least the shortest context ({PASSKEY_CONTEXTS[0]}), "
            f"got {settings.passkey_max_len}"
        )
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (--device cpu, or --smoke)")


def copy_fits(settings: Settings, distance: int) -> bool:
    """Whether a passage and its copy `distance` bytes later fit a long window (the first
    passage starts at --probe-len): 2 x --probe-len + distance <= --long-len + 1."""
    return 2 * settings.probe_len + distance <= settings.long_len + 1


def probe_distances(settings: Settings) -> tuple[int, ...]:
    """--probe-distances, or those of PROBE_DISTANCES whose copy --long-len holds."""
    if settings.probe_distances is not None:
        return settings.probe_distances
    return tuple(distance for distance in PROBE_DISTANCES if copy_fits(settings, distance))


def check_probe_distances(settings: Settings) -> None:
    distances = probe_distances(settings)
    if settings.probe_distances is None and not distances:
        raise ValueError(
            f"--long-len {settings.long_len}: holds no copy of the probe's default distances (2 x --probe-len + "
            f"{PROBE_DISTANCES[0]} bytes at least); give --probe-distances"
        )
    if min(distances) < settings.probe_len or not copy_fits(settings, max(distances)):
        raise ValueError(
            f"--probe-distances: expected each at least --probe-len ({settings.probe_len}) and "
            f"2 x --probe-len + the largest at most --long-len + 1 ({settings.long_len + 1}), "
            f"got {list(distances)}"
        )


def passkey_contexts(settings: Settings) -> tuple[int, ...]:
    """The passkey test's contexts: those of PASSKEY_CONTEXTS up to --passkey-max-len."""
    return tuple(context for context in PASSKEY_CONTEXTS if context <= settings.passkey_max_len)


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


def row_label(row: dict) -> str:
    """The row's arch, with the --config overrides an MM-Rec arch ran with, +window=W for an
    arch with a window trained with --window W, then +carryK for a recorded row trained on K
    consecutive chunks with the state carried (a variant no longer trained), +finalLxN for
    one whose last N steps read windows of L bytes and +budgetSs for one trained for a time
    budget of S seconds: 'mmrec+level_slots=128', 'mmrec+window=256', 'transformer+carry8',
    'mmrec+final16384x500', 'transformer+budget600s'.
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
    label += f"+final{row['settings']['final_seq_len']}x{final}" if final else ""
    budget = row["settings"].get("time_budget")
    return label + (f"+budget{budget:g}s" if budget is not None else "")


def row_stem(row: dict) -> str:
    return f"{row_label(row)}-seed{row['seed']}"
