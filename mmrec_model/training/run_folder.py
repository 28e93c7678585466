"""A training run's folder: its lock, metrics.jsonl, config.json and loss.png beside the
checkpoint (`pretrain`'s --out).

The run holds the folder's lock (.lock, fcntl.flock) while it writes the folder, so that
a second run is refused; every file is written atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from matplotlib.figure import Figure

from .checkpoint import CHECKPOINT_NAME, atomic_write, is_temporary_name

METRICS_NAME = "metrics.jsonl"
# The lock a run holds on its folder while it runs (fcntl.flock, released when the process ends).
LOCK_NAME = ".lock"


class RunFolderError(ValueError):
    """A run folder that cannot be written now, with the message for the command line."""


def file_stamp(path: Path) -> tuple | None:
    """The identity of the file at `path` (an atomic write makes a new one); None when there is none."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


class RunFolder:
    """The files of a run folder `out`; only rank 0 makes one.

    It holds the folder's lock from its creation to the end of the process, so that no
    other run writes the folder meanwhile, and checks under the lock that the folder's
    checkpoint is still the one of `checkpoint_stamp` (file_stamp's, when the run was
    prepared). It keeps the metrics up to `start_step` and writes `config` to config.json.
    """

    def __init__(self, out: Path, checkpoint_stamp: tuple | None, start_step: int, config: dict):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = lock_folder(self.out)
        if file_stamp(self.out / CHECKPOINT_NAME) != checkpoint_stamp:
            raise RunFolderError(
                f"--out {self.out}: another run wrote its {CHECKPOINT_NAME} while this one started; run the command again"
            )
        self.remove_leftovers()
        self.metrics = self.out / METRICS_NAME
        self.records = self.kept_records(start_step)
        atomic_write(self.metrics, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in self.records))
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
                raise RunFolderError(
                    f"--resume: {self.metrics}: line {number} is not a metrics record; mend or delete it"
                )
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
    """The run folder's lock file, locked; refuses (RunFolderError) when another process holds it.

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
        raise RunFolderError(
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
