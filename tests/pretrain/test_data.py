"""mmrec_model.training.data: the embedded corpus, --data sources, the split and the batches."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mmrec_model.training import data as D

pytestmark = pytest.mark.pretrain


@pytest.fixture(scope="module")
def stdlib_corpus() -> D.Corpus:
    return D.load_corpus(None)


def test_stdlib_corpus_is_python_source_split_5_percent(stdlib_corpus):
    total = len(stdlib_corpus.train) + len(stdlib_corpus.val)
    assert total > 1_000_000  # the standard library is megabytes of source
    assert len(stdlib_corpus.val) == int(total * D.VAL_FRACTION)
    assert stdlib_corpus.train.dtype == torch.uint8
    text = bytes(stdlib_corpus.train[:200_000].tolist()).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text


def test_stdlib_files_skip_tests_and_installed_packages_in_sorted_order():
    root = D.stdlib_root()
    files = D.stdlib_files(root)
    relative = [f.relative_to(root).as_posix() for f in files]
    assert relative == sorted(relative)
    assert "os.py" in relative and "json/decoder.py" in relative
    assert not any(set(r.split("/")[:-1]) & D.STDLIB_SKIPPED_DIRS for r in relative)


def test_stdlib_corpus_is_the_same_on_every_load(stdlib_corpus):
    again = D.load_corpus(None)
    assert again.sha256 == stdlib_corpus.sha256
    assert torch.equal(again.val, stdlib_corpus.val)


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(1, 256)) * 8)
    corpus = D.load_corpus(str(path))
    assert bytes(torch.cat([corpus.train, corpus.val]).tolist()) == path.read_bytes()


def test_folder_reads_text_files_in_path_order_skipping_hidden_and_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\0\0\0data")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    corpus = D.load_corpus(str(tmp_path))
    stream = bytes(torch.cat([corpus.train, corpus.val]).tolist())
    assert stream == D.DOC_SEPARATOR.join([b"first", b"second", b"third"])


def test_jsonl_takes_the_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join([json.dumps({"text": "héllo", "id": 1}), "", json.dumps({"text": "world"})]) + "\n")
    corpus = D.load_corpus(str(path))
    assert bytes(torch.cat([corpus.train, corpus.val]).tolist()) == "héllo".encode() + D.DOC_SEPARATOR + b"world"


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param('{"text": "ok"}\n{oops\n', "line 2 is not valid JSON", id="not_json"),
        pytest.param('{"body": "x"}\n', "line 1 has no string field 'text'", id="no_text_field"),
        pytest.param('{"text": 3}\n', "line 1 has no string field 'text'", id="text_not_a_string"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(D.DataError, match=message):
        D.load_corpus(str(path))


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b'\n{"text": "caf\xe9"}\n')
    with pytest.raises(D.DataError, match=r"docs.jsonl: line 2 is not UTF-8 \(byte 14: invalid continuation byte\)"):
        D.load_corpus(str(path))


def test_binary_file_is_refused_as_a_folder_skips_it(tmp_path):
    path = tmp_path / "program"
    path.write_bytes(b"\x7fELF\x02\x01\x01\0\0\0" + b"code" * 100)
    with pytest.raises(D.DataError, match=r"program: a binary file \(a NUL byte among its first 8000 bytes\)"):
        D.load_corpus(str(path))


@pytest.mark.parametrize(
    "make, message",
    [
        pytest.param(lambda p: p.symlink_to(p), "a loop of symbolic links", id="symlink_loop"),
        pytest.param(lambda p: os.mkfifo(p), "a named pipe, not a text file or a folder of them", id="fifo"),
    ],
)
def test_data_that_is_neither_file_nor_folder_says_what_it_is(tmp_path, make, message):
    path = tmp_path / "data"
    make(path)
    with pytest.raises(D.DataError, match=f"--data {path}: {message}"):
        D.load_corpus(str(path))


def test_null_device_is_a_character_device():
    with pytest.raises(D.DataError, match=f"--data {os.devnull}: a character device, not a text file"):
        D.load_corpus(os.devnull)


def test_missing_data_is_an_error(tmp_path):
    with pytest.raises(D.DataError, match="no such file or folder"):
        D.load_corpus(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("kind", ["empty_file", "empty_folder", "jsonl_of_empty_texts"])
def test_empty_data_is_an_error(tmp_path, kind):
    if kind == "empty_file":
        path = tmp_path / "empty.txt"
        path.write_bytes(b"")
    elif kind == "empty_folder":
        path = tmp_path / "folder"
        path.mkdir()
    else:
        path = tmp_path / "empty.jsonl"
        path.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(D.DataError, match="holds no text"):
        D.load_corpus(str(path))


def test_window_must_fit_in_both_splits(tmp_path):
    path = tmp_path / "small.txt"
    path.write_bytes(b"x" * 1000)  # 50 validation bytes
    corpus = D.load_corpus(str(path))
    D.check_window_fits(corpus, 49)
    with pytest.raises(D.DataError, match="--seq-len 50 .* validation split .* only 50 bytes"):
        D.check_window_fits(corpus, 50)


def test_final_windows_must_fit_in_the_training_split():
    stream = torch.zeros(300, dtype=torch.uint8)
    corpus = D.Corpus(train=stream[:200], val=stream[200:], source="zeros", sha256="")
    D.check_final_windows_fit(corpus, 2, 199)
    D.check_final_windows_fit(corpus, 0, 4096)  # no final phase: its length is not read
    with pytest.raises(
        D.DataError,
        match="--final-seq-len 256 needs windows of 257 bytes, but the training split of zeros holds only 200 bytes",
    ):
        D.check_final_windows_fit(corpus, 2, 256)


@pytest.mark.parametrize("sizes", [[30, 0, 45, 7, 12, 9, 3], [400, 5, 6], [1, 1]])
def test_validation_documents_are_the_documents_wholly_in_the_split(sizes):
    documents = [bytes([65 + i]) * size for i, size in enumerate(sizes)]  # each of its own letter
    corpus = D.corpus_from_documents(documents, "letters")
    found = D.validation_documents(documents)
    kept = [doc for doc in documents if doc]
    wholly_inside = kept[len(kept) - len(found) :]
    assert [bytes(corpus.val[start : start + size].tolist()) for start, size in found] == wholly_inside
    # The document before the first found one begins before the split.
    first_start = found[0][0] if found else len(corpus.val) + len(D.DOC_SEPARATOR)
    if len(found) < len(kept):
        assert first_start - len(D.DOC_SEPARATOR) - len(kept[-len(found) - 1]) < 0


def synthetic_corpus(n: int = 5003) -> D.Corpus:
    stream = torch.arange(n) % 251  # distinct neighbours: windows are recognisable
    train, val = stream[: n - 300].to(torch.uint8), stream[n - 300 :].to(torch.uint8)
    return D.Corpus(train=train, val=val, source="synthetic", sha256="")


@pytest.mark.parametrize("seq_len", [1, 17, 64])
def test_targets_are_inputs_shifted_by_one_byte(fresh_seed, seq_len):
    corpus = synthetic_corpus()
    inputs, targets = D.train_batch(corpus, step=3, seed=fresh_seed, batch_size=5, seq_len=seq_len)
    assert inputs.shape == targets.shape == (5, seq_len)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(targets[:, -1], (inputs[:, -1] + 1) % 251)


def test_batches_depend_on_seed_and_step_only(fresh_seed):
    corpus = synthetic_corpus()
    first = D.train_batch(corpus, step=7, seed=fresh_seed, batch_size=6, seq_len=9)[0]
    assert torch.equal(first, D.train_batch(corpus, step=7, seed=fresh_seed, batch_size=6, seq_len=9)[0])
    assert not torch.equal(first, D.train_batch(corpus, step=8, seed=fresh_seed, batch_size=6, seq_len=9)[0])
    assert not torch.equal(first, D.train_batch(corpus, step=7, seed=fresh_seed + 1, batch_size=6, seq_len=9)[0])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_the_global_batch(fresh_seed, world_size):
    corpus = synthetic_corpus()
    whole = D.train_batch(corpus, step=2, seed=fresh_seed, batch_size=6, seq_len=11)[0]
    shares = [D.train_batch(corpus, 2, fresh_seed, 6, 11, rank, world_size)[0] for rank in range(world_size)]
    assert torch.equal(torch.cat(shares), whole)


@pytest.mark.parametrize("seq_len", [19, 4])
def test_windows_reach_the_last_byte_and_never_beyond(seq_len):
    corpus = synthetic_corpus(n=300 + seq_len + 1)  # windows as long as the split: one offset only
    inputs, targets = D.train_batch(corpus, step=0, seed=0, batch_size=3, seq_len=seq_len)
    assert torch.equal(inputs[:, 0], torch.zeros(3, dtype=torch.long))
    assert torch.equal(targets[:, -1], torch.full((3,), seq_len))


def test_every_step_draws_fresh_windows_from_its_own_generator(fresh_seed):
    corpus = synthetic_corpus()
    for step in range(3):
        offsets = D.random_offsets(corpus.train, 6, 9, D.step_generator(fresh_seed, step))
        expected = D.windows(corpus.train, offsets, 9)
        assert all(torch.equal(a, b) for a, b in zip(D.train_batch(corpus, step, fresh_seed, 6, 9), expected))


def test_validation_windows_are_fixed_whatever_the_seed(fresh_seed):
    corpus = synthetic_corpus()
    torch.manual_seed(fresh_seed)
    first = D.validation_offsets(corpus, 8, 13)
    torch.manual_seed(fresh_seed + 1)
    assert torch.equal(first, D.validation_offsets(corpus, 8, 13))
    assert int(first.max()) <= len(corpus.val) - 14


@pytest.mark.parametrize("sizes", [[30, 0, 45, 7, 12, 9, 3], [400, 5, 6]])
def test_window_starts_mark_each_documents_first_byte(fresh_seed, sizes):
    """Each document of its own letter: a byte begins a document iff the byte before it
    is the separator's last (or it is the stream's first, which no window's start marks
    but the first document's)."""
    documents = [bytes([65 + i]) * size for i, size in enumerate(sizes)]
    corpus = D.corpus_from_documents(documents, "letters")
    stream = torch.cat([corpus.train, corpus.val]).long()
    begins = torch.zeros_like(stream, dtype=torch.bool)
    begins[1:] = (stream[1:] != 10) & (stream[:-1] == 10)
    for split, start in (("train", 0), ("val", len(corpus.train))):
        expected = begins[start : start + len(getattr(corpus, split))]
        offsets = torch.arange(len(expected) - 4)
        starts = D.window_starts(corpus.split_starts(split), offsets, 4)
        assert torch.equal(starts, expected[offsets[:, None] + torch.arange(4)])
    inputs = D.train_batch(corpus, 2, fresh_seed, 6, 9)[0]
    starts = D.train_starts(corpus, 2, fresh_seed, 6, 9)
    assert torch.equal(starts[:, 1:], (inputs[:, 1:] != 10) & (inputs[:, :-1] == 10))
