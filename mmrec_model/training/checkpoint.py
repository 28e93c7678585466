"""Checkpoints: written atomically, read back with `weights_only=True`.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (what
`torch.load(weights_only=True)` accepts, so loading one runs no pickled code):

    format         CHECKPOINT_FORMAT
    step           optimizer steps taken (the data position: see data.py)
    model          the model's state_dict
    model_config   dataclasses.asdict of the model's configuration
    train_config   dataclasses.asdict of the run's settings (a TrainSettings)
    optimizer      AdamW state_dict
    scheduler      LambdaLR state_dict
    rng            {"torch": ByteTensor, "cuda": [ByteTensor per device]}
    data           {"sha256": corpus fingerprint, "source": description}
    progress       (optional) dataclasses.asdict(loop.Progress): the losses and clocks so far

`loop.Trainer.checkpoint` makes one; a caller may add entries of its own.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
from pathlib import Path

import torch

from mmrec_model import MMRecConfig, MMRecModel

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
TEMPORARY_SUFFIX = ".tmp"
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


def temporary_name(path: Path) -> Path:
    """A name next to `path` that no other writer uses: `.<name>.<pid>.<random>.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


def is_temporary_name(name: str) -> bool:
    """Whether `name` is one that temporary_name gives (a writer killed mid-write leaves one)."""
    return re.fullmatch(rf"\..+\.\d+\.[0-9a-f]{{8}}{re.escape(TEMPORARY_SUFFIX)}", name) is not None


class WriteRecorder:
    """A binary file that keeps the OSError of a failed write. torch.save reports
    one as a RuntimeError about zip positions, which would hide a full disk."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def atomic_write(path: Path, write) -> None:
    """Calls write(file) on a temporary file next to `path`, then renames it over `path`.

    A crash at any moment leaves either the old file or the new one, never a
    mix: the rename is atomic and comes only after the data reached the disk.
    If writing fails, the temporary file is removed and `path` keeps its old
    content; a failure of the file system (a full disk, a read-only folder)
    is raised as the OSError of its errno, naming `path`.
    """
    tmp = temporary_name(path)
    recorder = None
    try:
        with open(tmp, "xb") as file:
            recorder = WriteRecorder(file)
            write(recorder)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else getattr(recorder, "error", None)
        if cause is None or cause.errno is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from err
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
        raise CheckpointError(f"{file}: not a readable checkpoint ({load_failure(err)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file}: not an MM-Rec checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{file}: checkpoint lacks {', '.join(missing)}")
    problem = structure_problem(checkpoint)
    if problem:
        raise CheckpointError(f"{file}: not a usable checkpoint: {problem}")
    return checkpoint


def load_failure(err: Exception) -> str:
    """Why torch.load refused a file, in one line: the global it found pickled when that
    is why. Never torch's advice to load it with weights_only=False: that would run
    whatever code the file pickled."""
    text = str(err)
    # torch words it "Unsupported global: GLOBAL m.f" or, for a module it blocks (os,
    # posix, subprocess...), "unsupported GLOBAL m.f whose module m is blocked".
    refused_global = re.search(r"GLOBAL ([\w.]+)", text)
    if refused_global:
        return f"it pickles {refused_global.group(1)}, and a checkpoint holds only tensors and plain data"
    unpickler_error = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if unpickler_error:
        return f"not a pickle of tensors and plain data: {unpickler_error.group(1).strip()}"
    if "weights_only" in text:
        return "not a pickle of tensors and plain data"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def is_byte_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def structure_problem(checkpoint: dict) -> str | None:
    """What in a checkpoint's entries has the wrong type or value (a hand-edited or
    foreign file), or None: a checkpoint is used only whole and well-formed."""
    step = checkpoint["step"]
    if type(step) is not int or step < 0:
        return f"step: expected an integer >= 0, got {step!r}"
    for key in ("model", "model_config", "train_config", "optimizer", "scheduler", "rng", "data"):
        if not isinstance(checkpoint[key], dict):
            return f"{key}: expected a dict, got {type(checkpoint[key]).__name__}"
    if not checkpoint["model"] or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in checkpoint["model"].items()
    ):
        return "model: expected a state_dict (parameter names to tensors)"
    # The scheduler steps once per optimizer step.
    if checkpoint["scheduler"].get("last_epoch") != step:
        return f"scheduler: expected last_epoch {step} (the step), got {checkpoint['scheduler'].get('last_epoch')!r}"
    rng = checkpoint["rng"]
    cpu_state_bytes = torch.get_rng_state().numel()
    if not is_byte_tensor(rng.get("torch")) or rng["torch"].numel() != cpu_state_bytes:
        return f"rng: expected 'torch', the CPU generator's state of {cpu_state_bytes} bytes (a uint8 tensor)"
    if not isinstance(rng.get("cuda"), list) or not all(is_byte_tensor(state) for state in rng["cuda"]):
        return "rng: expected 'cuda', a list of CUDA generator states (uint8 tensors)"
    data = checkpoint["data"]
    if not all(isinstance(data.get(key), str) and data[key] for key in ("sha256", "source")):
        return "data: expected the corpus' 'sha256' and 'source' (strings)"
    return None


def kind(value) -> str:
    """What a state's value is, for comparing a saved state with a fresh one: an int and
    a float are both numbers, a bool is not one."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a dict"
    if isinstance(value, torch.Tensor):
        return "a tensor"
    return type(value).__name__


def shown(value) -> str:
    """A value in an error message: its repr when short and plain, else its kind."""
    text = repr(value)
    return text if isinstance(value, (bool, int, float, str)) and len(text) <= 40 else kind(value)


def state_difference(saved, fresh, where: str) -> str | None:
    """Where `saved`, a state read from a checkpoint (a scheduler's, an optimizer's
    param_groups), differs from `fresh`, the same state as this version makes it, or
    None: the kind of a value (number, boolean, string, list, dict, tensor), a list's
    length, a tensor's shape and dtype. Only keys present in both are compared, so that
    a key another torch adds or drops is no difference."""
    if kind(saved) != kind(fresh):
        return f"{where}: expected {kind(fresh)}, got {shown(saved)}"
    if isinstance(fresh, dict):
        shared = (key for key in fresh if key in saved)
        return next(filter(None, (state_difference(saved[k], fresh[k], f"{where}.{k}") for k in shared)), None)
    if isinstance(fresh, (list, tuple)):
        if len(saved) != len(fresh):
            return f"{where}: expected a list of {len(fresh)}, got {len(saved)}"
        parts = (state_difference(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(saved, fresh)))
        return next(filter(None, parts), None)
    if isinstance(fresh, torch.Tensor) and (saved.shape != fresh.shape or saved.dtype != fresh.dtype):
        return (
            f"{where}: expected a {fresh.dtype} tensor of shape {list(fresh.shape)}, "
            f"got {saved.dtype} of shape {list(saved.shape)}"
        )
    return None


# The values of a dataclass field's annotation, by name (annotations are strings here).
ANNOTATED_TYPES = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "str": "a string",
    "Tensor": "a tensor",
}


def is_of(value, annotation: str) -> bool:
    """Whether `value` fits the annotation (e.g. "int | None"); a bool is no number. An
    annotation naming other types (none of the settings has one) is not checked."""
    checks = {
        "int": lambda v: type(v) is int,
        "float": lambda v: type(v) in (int, float),
        "bool": lambda v: type(v) is bool,
        "str": lambda v: isinstance(v, str),
        "None": lambda v: v is None,
        "Tensor": lambda v: isinstance(v, torch.Tensor),
    }
    names = [name.strip() for name in annotation.split("|")]
    return any(checks[name](value) for name in names if name in checks) or not all(name in checks for name in names)


def fields_problem(cls, values: dict, where: str) -> str | None:
    """What keeps the checkpoint's `values` from making a `cls` (a dataclass): a key that
    is none of its fields, or a value not of its field's type; or None. A field left out
    takes its default (a checkpoint of a version that lacked it)."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = [key for key in values if key not in fields]
    if unknown:
        return f"{where}: unknown entries {', '.join(map(repr, unknown))}"
    for name, value in values.items():
        annotation = str(fields[name].type)
        if not is_of(value, annotation):
            expected = " or ".join(ANNOTATED_TYPES.get(n.strip(), n.strip()) for n in annotation.split("|"))
            return f"{where}.{name}: expected {expected}, got {shown(value)}"
    return None


def non_finite_entries(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors of `state_dict` that hold NaN or Inf."""
    return [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all()
    ]


# Fields of older checkpoints' model_config, each with the one value the model still has
# (its only reading now); any other value names a variant that was removed.
RETIRED_FIELDS = {"memory_read": "joint", "entry_summary": "mean"}
RETIRED_VALUES = {"read_kernel": "flex"}


def long_term_of(fields: dict, source: str | os.PathLike) -> dict:
    """An older checkpoint's summary long-term memory (n_levels, level_slots): none at all
    (n_levels=0) is top_k=0 now; a summary memory was replaced by retrieval, which such a
    model never learned to read (a CheckpointError)."""
    if "n_levels" not in fields:
        return fields
    n_levels = fields.pop("n_levels")
    fields.pop("level_slots", None)
    if n_levels:
        raise CheckpointError(
            f"{source}: the checkpoint's model has the summary long-term memory (n_levels={n_levels!r}), "
            "which this version replaced by retrieval; train it again"
        )
    return {**fields, "top_k": 0}


def model_config_of(fields: dict, source: str | os.PathLike) -> MMRecConfig:
    """The MMRecConfig of a checkpoint's ``model_config``, an older checkpoint's too: a
    retired field at the value the model still has is dropped; a removed variant is a
    CheckpointError naming it (bench/results/decisions.md says why it was removed)."""
    fields = dict(fields)
    for name, kept in RETIRED_FIELDS.items():
        value = fields.pop(name, kept)
        if value != kept:
            raise CheckpointError(
                f"{source}: the checkpoint's model uses {name}={value!r}, a variant this version removed"
            )
    fields = long_term_of(fields, source)
    for name, removed in RETIRED_VALUES.items():
        if fields.get(name) == removed:
            raise CheckpointError(
                f"{source}: the checkpoint's model uses {name}={removed!r}, a variant this version removed"
            )
    return MMRecConfig(**fields)


def model_from_checkpoint(checkpoint: dict, device: torch.device, source: str | os.PathLike) -> torch.nn.Module:
    """The checkpoint's model (its ``model_config`` and weights) on ``device``, in eval
    mode: the one way ``generate``, ``pretrain --resume`` and the benches load a model.
    A CheckpointError naming ``source`` if its weights hold NaN or Inf (a diverged run's)
    or do not fit its configuration."""
    non_finite = non_finite_entries(checkpoint["model"])
    if non_finite:
        raise CheckpointError(
            f"{source}: the checkpoint's model has NaN or Inf weights ({', '.join(non_finite[:3])}"
            f"{', ...' if len(non_finite) > 3 else ''}): it comes from a run that diverged"
        )
    try:
        model = MMRecModel(model_config_of(checkpoint["model_config"], source))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{source}: the checkpoint's model does not load ({reason})") from None
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device: torch.device) -> torch.nn.Module:
    """The model of a checkpoint file (or run folder), in eval mode on ``device``."""
    return model_from_checkpoint(load_checkpoint(path), device, path)


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
