"""Checkpoints: written atomically, read back with `weights_only=True`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (what
`torch.load(weights_only=True)` accepts, so loading one runs no pickled code):

    format         CHECKPOINT_FORMAT
    step           optimizer steps taken (the data position: see data.py)
    model          the model's state_dict
    model_config   dataclasses.asdict(MMRecConfig)
    train_config   dataclasses.asdict(TrainConfig)
    optimizer      AdamW state_dict
    scheduler      LambdaLR state_dict
    rng            {"torch": ByteTensor, "cuda": [ByteTensor per device]}
    data           {"sha256": corpus fingerprint, "source": description}
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format", "step", "model", "model_config", "train_config", "optimizer", "scheduler", "rng", "data")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message for the command line."""


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the run folder holding one, as the checkpoint file's path."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def fsync_folder(folder: Path) -> None:
    """Makes a rename inside `folder` durable (the entry lives in the folder's own data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Calls write(file) on a temporary file next to `path`, then renames it over `path`.

    A crash at any moment leaves either the old file or the new one, never a
    mix: the rename is atomic and comes only after the data reached the disk.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    assert not missing, f"checkpoint lacks {missing}"
    atomic_write(path, lambda file: torch.save(checkpoint, file))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Loads a checkpoint file (or a run folder's checkpoint) on the CPU, checking its format."""
    file = checkpoint_path(path)
    if not file.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint there (expected a {CHECKPOINT_NAME} file or a run folder holding one)"
        )
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{file}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file}: not an MM-Rec checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{file}: checkpoint lacks {', '.join(missing)}")
    return checkpoint


def rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        # A run may resume on a machine with fewer or more GPUs than it started on.
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
