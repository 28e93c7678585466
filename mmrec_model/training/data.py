"""Byte-level text data for pretraining: the embedded corpus, `--data`, the split, batches.

A corpus is one stream of bytes (token id = byte value, vocabulary 256): its
documents concatenated in a fixed order with DOC_SEPARATOR between them. The
last VAL_FRACTION of the stream is the validation split, the rest is the
training split.

Batches are windows of seq_len + 1 bytes at random offsets; input = window[:-1],
target = window[1:]; and, for training that resets at documents, the window's starts
(``window_starts``: True at each document's first byte, MMRecModel.forward's starts). The offsets of training step s are drawn from a generator
seeded by (seed, s) alone, so the data position of a run is its step count:
resuming needs no sampler state, and the global batch of a step is the same
whatever the number of processes that share it (each takes its slice).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

DOC_SEPARATOR = b"\n\n"
VAL_FRACTION = 0.05
# Folders of the standard library that are not its source proper: installed
# packages, and test suites (full of deliberately odd encodings and data blobs).
STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Git's rule for binary files: a NUL byte among the first 8000.
BINARY_SNIFF_BYTES = 8000
VALIDATION_SEED = 20240229


class DataError(ValueError):
    """Data that cannot be used, with a message for the command line."""


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split for training.

    train, val: uint8 tensors [N_train], [N_val]; source: where it came from;
    sha256: fingerprint of the whole stream (a resumed run checks it); document_starts:
    int64 [n], sorted, the stream positions where a document other than the first begins
    (empty: one document).
    """

    train: torch.Tensor
    val: torch.Tensor
    source: str
    sha256: str
    document_starts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def split_starts(self, split: str) -> torch.Tensor:
        """int64 [n]: where a document begins in the split 'train' or 'val' (its positions)."""
        starts, n_train = self.document_starts, len(self.train)
        return starts[starts < n_train] if split == "train" else starts[starts >= n_train] - n_train

    def describe(self) -> str:
        return f"{self.source}: {len(self.train):,} training bytes, {len(self.val):,} validation bytes"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """The standard library's .py files under `root`, sorted, without tests and installed packages."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in STDLIB_SKIPPED_DIRS]
        found.extend(Path(folder, name) for name in files if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(root).as_posix())


def is_binary_file(path: Path) -> bool:
    """Git's rule: a NUL byte among the first BINARY_SNIFF_BYTES bytes."""
    with path.open("rb") as file:
        return b"\0" in file.read(BINARY_SNIFF_BYTES)


def jsonl_texts(path: Path) -> list[bytes]:
    """The `text` field of every record of a JSONL file, UTF-8 encoded."""
    texts = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"--data {path}: line {number} is not UTF-8 (byte {err.start + 1}: {err.reason})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"--data {path}: line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"--data {path}: line {number} has no string field 'text'")
            texts.append(record["text"].encode("utf-8"))
    return texts


def file_documents(path: Path) -> list[bytes]:
    """A .jsonl file gives one document per record; any other file is one document, its bytes."""
    if path.suffix == ".jsonl":
        return jsonl_texts(path)
    return [path.read_bytes()]


def folder_documents(folder: Path) -> list[bytes]:
    """Every non-hidden, non-binary file under `folder`, in sorted path order."""
    paths = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    documents = []
    for path in paths:
        if not is_binary_file(path):
            documents.extend(file_documents(path))
    return documents


# What stat says a path is, for one that is neither a regular file nor a folder.
SPECIAL_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def data_path_kind(path: Path) -> str:
    """'file' or 'folder'; anything else is a DataError that says what `path` is."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        reason = {errno.ENOENT: "no such file or folder", errno.ELOOP: "a loop of symbolic links"}
        raise DataError(f"--data {path}: {reason.get(err.errno, err.strerror)}") from None
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    kind = next((name for test, name in SPECIAL_FILE_KINDS if test(mode)), "not a regular file")
    raise DataError(f"--data {path}: {kind}, not a text file or a folder of them")


def user_documents(path: Path) -> list[bytes]:
    """The documents of `--data path`: a text or JSONL file, or a folder of text files."""
    if data_path_kind(path) == "folder":
        return folder_documents(path)
    if is_binary_file(path):
        raise DataError(
            f"--data {path}: a binary file (a NUL byte among its first {BINARY_SNIFF_BYTES} bytes), not text"
        )
    return file_documents(path)


def read_documents(data: str | None) -> tuple[list[bytes], str]:
    """The documents of `--data` (the standard library's source when None) and a description."""
    if data is None:
        root = stdlib_root()
        description = f"Python {sysconfig.get_python_version()} standard library ({root})"
        return [path.read_bytes() for path in stdlib_files(root)], description
    try:
        return user_documents(Path(data)), data
    except OSError as err:  # a file that cannot be read (permissions, an I/O error)
        raise DataError(f"--data {data}: cannot read {err.filename or data} ({err.strerror})") from None


def validation_size(stream_bytes: int) -> int:
    """Bytes of the validation split of a stream of `stream_bytes` bytes (its end)."""
    return max(1, int(stream_bytes * VAL_FRACTION))


def corpus_from_documents(documents: list[bytes], source: str) -> Corpus:
    """The corpus of `documents` (empty ones left out) joined by DOC_SEPARATOR, split."""
    kept = [doc for doc in documents if doc]
    stream = DOC_SEPARATOR.join(kept)
    if not stream:
        raise DataError(f"--data {source}: holds no text")
    n_val = validation_size(len(stream))
    tensor = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    sizes = torch.tensor([len(doc) + len(DOC_SEPARATOR) for doc in kept[:-1]], dtype=torch.int64)
    return Corpus(
        train=tensor[:-n_val],
        val=tensor[-n_val:],
        source=source,
        sha256=hashlib.sha256(stream).hexdigest(),
        document_starts=sizes.cumsum(0),
    )


def load_corpus(data: str | None = None) -> Corpus:
    """Reads and splits a corpus: the standard library's source when `data` is None,
    else a text file, a JSONL file (field `text`) or a folder of text files."""
    return corpus_from_documents(*read_documents(data))


def validation_documents(documents: list[bytes]) -> list[tuple[int, int]]:
    """(start, length) in corpus.val of each document lying wholly inside the validation
    split of corpus_from_documents(documents), in corpus order.

    Document i (empty ones left out) starts at byte s_i = sum_{j<i} (n_j + len(DOC_SEPARATOR))
    of the stream of N bytes; the split starts at v = N - validation_size(N); document i is
    in it iff s_i >= v, at corpus.val[s_i - v : s_i - v + n_i].
    """
    sizes = [len(doc) for doc in documents if doc]
    stream_bytes = sum(sizes) + len(DOC_SEPARATOR) * max(0, len(sizes) - 1)
    split_start = stream_bytes - validation_size(stream_bytes)
    found, start = [], 0
    for size in sizes:
        if start >= split_start:
            found.append((start - split_start, size))
        start += size + len(DOC_SEPARATOR)
    return found


def check_window_fits(corpus: Corpus, seq_len: int) -> None:
    """Both splits must hold at least one window of seq_len + 1 bytes."""
    for name, split in (("training", corpus.train), ("validation", corpus.val)):
        if len(split) < seq_len + 1:
            raise DataError(
                f"--seq-len {seq_len} needs windows of {seq_len + 1} bytes, but the {name} split of "
                f"{corpus.source} holds only {len(split)} bytes; use more data or a smaller --seq-len"
            )


def check_final_windows_fit(corpus: Corpus, final_steps: int, final_seq_len: int | None) -> None:
    """With a final phase (final_steps > 0), the training split must hold one of its windows
    (final_seq_len + 1 bytes); validation keeps the windows of seq_len."""
    if final_steps and len(corpus.train) < final_seq_len + 1:
        raise DataError(
            f"--final-seq-len {final_seq_len} needs windows of {final_seq_len + 1} bytes, but the training split "
            f"of {corpus.source} holds only {len(corpus.train)} bytes"
        )


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator that depends on (seed, step) only: the data position is the step."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def windows(split: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [len(offsets), seq_len] (int64) of the windows starting at `offsets`."""
    rows = split[offsets[:, None] + torch.arange(seq_len + 1)].long()
    return rows[:, :-1], rows[:, 1:]


def window_starts(starts: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """bool [len(offsets), seq_len]: which inputs of the windows at `offsets` begin a
    document, given the split's sorted document starts `starts` (``Corpus.split_starts``)."""
    positions = offsets[:, None] + torch.arange(seq_len)
    if len(starts) == 0:
        return torch.zeros_like(positions, dtype=torch.bool)
    return starts[torch.searchsorted(starts, positions).clamp(max=len(starts) - 1)] == positions


def random_offsets(split: torch.Tensor, count: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, len(split) - seq_len, (count,), generator=generator)


def train_batch(
    corpus: Corpus,
    step: int,
    seed: int,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the global training batch of `step`: the windows of
    seq_len + 1 bytes at the batch_size offsets drawn from the generator of (seed, step).

    All processes draw the same `batch_size` offsets; rank r takes windows
    [r * b, (r + 1) * b), b = batch_size / world_size. Returns inputs and
    targets [b, seq_len].
    """
    return windows(corpus.train, train_offsets(corpus, step, seed, batch_size, seq_len, rank, world_size), seq_len)


def train_offsets(
    corpus: Corpus, step: int, seed: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """The offsets of `train_batch`'s windows (this process's share)."""
    offsets = random_offsets(corpus.train, batch_size, seq_len, step_generator(seed, step))
    share = batch_size // world_size
    return offsets[rank * share : (rank + 1) * share]


def train_starts(
    corpus: Corpus, step: int, seed: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """bool [b, seq_len]: the document starts (``window_starts``) of `train_batch`'s inputs."""
    offsets = train_offsets(corpus, step, seed, batch_size, seq_len, rank, world_size)
    return window_starts(corpus.split_starts("train"), offsets, seq_len)


def validation_offsets(corpus: Corpus, count: int, seq_len: int) -> torch.Tensor:
    """Fixed validation windows: the same for every run on this corpus, whatever its seed."""
    return random_offsets(corpus.val, count, seq_len, torch.Generator().manual_seed(VALIDATION_SEED))
