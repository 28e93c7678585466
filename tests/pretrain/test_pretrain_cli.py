"""`python -m mmrec_model.pretrain` in fresh processes: it learns, writes its run folder,
resumes exactly, survives a kill during a checkpoint write and refuses bad input."""

from __future__ import annotations

import fcntl
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmrec_model.pretrain import HELP
from tests.pretrain.cli import REPO, SMALL, environment, load, metrics, pretrain, run_module, snapshot, succeeded

pytestmark = pytest.mark.pretrain


def test_learns_on_the_embedded_corpus_and_writes_its_run_folder(tmp_path, fresh_seed):
    out = tmp_path / "run"
    args = [
        "--dim",
        "64",
        "--n-heads",
        "4",
        "--n-layers",
        "2",
        "--seq-len",
        "72",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--steps",
        40,
        "--eval-every",
        20,
        "--eval-batches",
        2,
        "--seed",
        fresh_seed,
        "--out",
        out,
        "--device",
        "cpu",
    ]
    result = succeeded(pretrain(args, tmp_path))
    val = metrics(out, "val")
    assert [r["step"] for r in val] == [0, 20, 40]
    # Untrained, the model predicts bytes about uniformly: ln 256 = 5.55 nats. Byte
    # frequencies alone bring Python source to about 3.1 nats (measured: 2.98 after
    # these 40 steps, seed 11); a model that does not learn stays near 5.5.
    assert val[0]["loss"] == pytest.approx(math.log(256), abs=0.3)
    assert val[-1]["loss"] < val[0]["loss"] - 1.5, val
    assert all(r["bpb"] == pytest.approx(r["loss"] / math.log(2)) for r in val)
    assert [r["step"] for r in metrics(out, "train")] == [10, 20, 30, 40]
    assert "standard library" in result.stdout and "val bits/byte" in result.stdout
    assert "40/40" in result.stderr and "tok_s=" in result.stderr  # the progress bar
    checkpoint = load(out)
    assert checkpoint["step"] == 40 and checkpoint["model_config"]["dim"] == 64
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    sample = (out / "sample.txt").read_text()
    assert sample.startswith("def ") and sample in result.stdout


def run_args(corpus_file, seed, out, eval_every):
    return [
        *SMALL,
        "--data",
        corpus_file,
        "--steps",
        8,
        "--eval-every",
        eval_every,
        "--log-every",
        1,
        "--seed",
        seed,
        "--out",
        out,
    ]


def untimed(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def test_resume_continues_exactly(tmp_path, corpus_file, fresh_seed):
    straight, split = tmp_path / "straight", tmp_path / "split"
    succeeded(pretrain(run_args(corpus_file, fresh_seed, straight, eval_every=4), tmp_path))
    first = succeeded(pretrain([*run_args(corpus_file, fresh_seed, split, eval_every=4), "--stop-at", 4], tmp_path))
    assert f"--resume {split}" in first.stdout
    assert load(split)["step"] == 4
    succeeded(pretrain(["--resume", split], tmp_path))
    for split_name in ("train", "val"):  # every loss, to the last bit (timings aside)
        assert untimed(metrics(split, split_name)) == untimed(metrics(straight, split_name))
    assert len(metrics(split, "train")) == 8
    a, b = load(straight), load(split)
    assert a["step"] == b["step"] == 8
    for key in ("model", "optimizer", "scheduler"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_the_final_phase_trains_the_last_steps_on_long_windows_and_resumes_exactly(tmp_path, corpus_file, fresh_seed):
    final = ["--final-steps", 3, "--final-seq-len", 160]  # steps 5-7: 2 windows of 160 bytes for 4 of 80
    plain, straight, split = tmp_path / "plain", tmp_path / "straight", tmp_path / "split"
    succeeded(pretrain(run_args(corpus_file, fresh_seed, plain, eval_every=4), tmp_path))
    succeeded(pretrain([*run_args(corpus_file, fresh_seed, straight, eval_every=4), *final], tmp_path))
    succeeded(pretrain([*run_args(corpus_file, fresh_seed, split, eval_every=4), *final, "--stop-at", 4], tmp_path))
    succeeded(pretrain(["--resume", split], tmp_path))
    for split_name in ("train", "val"):  # across the phase's start, every loss to the last bit
        assert untimed(metrics(split, split_name)) == untimed(metrics(straight, split_name))
    losses, plain_losses = ([r["loss"] for r in metrics(run, "train")] for run in (straight, plain))
    assert losses[:5] == plain_losses[:5] and all(a != b for a, b in zip(losses[5:], plain_losses[5:]))
    a, b = load(straight), load(split)
    assert a["train_config"]["final_steps"] == 3 and a["train_config"]["final_seq_len"] == 160
    for key in ("model", "optimizer", "scheduler"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


# Runs the command with torch.save replaced: its n-th call writes part of a
# checkpoint and the process is killed (SIGKILL, as by the OOM killer) mid-file.
KILL_DURING_SAVE = """
import os, signal, sys, torch
from mmrec_model.pretrain import main
real_save, calls = torch.save, 0
def save_then_die(obj, file, *args, **kwargs):
    global calls
    calls += 1
    if calls < int(os.environ["KILL_AT_SAVE"]):
        return real_save(obj, file, *args, **kwargs)
    file.write(b"PK\\x03\\x04 first bytes of a checkpoint")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, corpus_file, fresh_seed):
    out = tmp_path / "run"
    args = run_args(corpus_file, fresh_seed, out, eval_every=3)
    command = [sys.executable, "-c", KILL_DURING_SAVE, *map(str, args)]
    # Saves happen at steps 0, 3, 6, 8: the third is killed.
    env = environment(KILL_AT_SAVE="3")
    killed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert load(out)["step"] == 3
    assert len(list(out.glob(".checkpoint.pt.*.tmp"))) == 1  # the killed writer's
    succeeded(pretrain(["--resume", out], tmp_path))
    assert load(out)["step"] == 8
    assert [r["step"] for r in metrics(out, "val")] == [0, 3, 6, 8]
    assert not list(out.glob("*.tmp")), "the resumed run, holding the folder's lock, removes the leftover"


def write_garbage_checkpoint(folder: Path) -> None:
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"\x00garbage, not a zip archive")


BAD_INPUT = [
    pytest.param(["--data", "{tmp}/missing.txt"], "--data .*missing.txt: no such file or folder", id="missing_data"),
    pytest.param(["--data", "{tmp}/empty.txt"], "holds no text", id="empty_data"),
    pytest.param(["--data", "{tmp}/loop"], "--data .*loop: a loop of symbolic links", id="symlink_loop_data"),
    pytest.param(["--data", sys.executable], "--data .*: a binary file", id="executable_data"),
    pytest.param(["--data", os.devnull], f"--data {os.devnull}: a character device", id="null_device_data"),
    pytest.param(["--data", "{tmp}/latin1.jsonl"], "latin1.jsonl: line 1 is not UTF-8", id="non_utf8_jsonl"),
    pytest.param(["--preset", "huge"], "--preset huge: .*expected name in", id="unknown_preset"),
    pytest.param(["--seq-len", "5000"], "--seq-len 5000 needs windows of 5001 bytes", id="window_longer_than_split"),
    pytest.param(["--dim", "30", "--n-heads", "4"], "multiple of n_heads", id="dim_not_multiple_of_heads"),
    pytest.param(["--steps", "0"], "--steps: expected a positive integer, got 0", id="zero_steps"),
    pytest.param(["--batch-size", "-2"], "--batch-size: expected a positive integer", id="negative_batch"),
    pytest.param(["--lr", "0"], "--lr: expected a positive number", id="zero_lr"),
    pytest.param(["--final-steps", "2"], "--final-seq-len: expected a divisor of", id="final_phase_without_length"),
    pytest.param(["--weight-decay", "nan"], "--weight-decay: expected a finite number, got nan", id="nan_decay"),
    pytest.param(["--dist-timeout", "inf"], "--dist-timeout: expected a finite number, got inf", id="inf_timeout"),
    pytest.param(["--stop-at", "50"], r"--stop-at 50: expected a step in \(0, 6\]", id="stop_after_end"),
    pytest.param(["--sample-prompt", ""], "--sample-prompt: expected at least one character", id="empty_prompt"),
    pytest.param(["--device", "tpu"], "--device: expected auto, cpu or cuda", id="unknown_device"),
    pytest.param(
        ["--out", "{tmp}/out/notes.txt/run"], "--out .*: .*notes.txt is a file, not a folder", id="out_under_a_file"
    ),
    pytest.param(["--resume", "{tmp}/corrupt"], "not a readable checkpoint", id="corrupt_checkpoint"),
    pytest.param(["--resume", "{tmp}/nowhere"], "no checkpoint there", id="missing_checkpoint"),
]


@pytest.mark.parametrize("extra, message", BAD_INPUT)
def test_bad_input_exits_1_with_a_clear_message_and_writes_nothing(tmp_path, corpus_file, trained_run, extra, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    write_garbage_checkpoint(tmp_path / "corrupt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a file of the user's")
    before = snapshot(tmp_path)
    args = [*SMALL, "--data", corpus_file, "--steps", 6, "--out", out, *[str(a).format(tmp=tmp_path) for a in extra]]
    result = pretrain(args, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("mmrec-pretrain: error: ")
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert snapshot(tmp_path) == before


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--lr", "0.5"], r"keeps its settings, .* --lr 0.5 \(saved: 0.005\)", id="changed_lr"),
        pytest.param(["--data", "{tmp}/other.txt"], "--data .* \\(saved: ", id="changed_data"),
        pytest.param(
            ["--final-steps", "2", "--final-seq-len", "160"], r"--final-steps 2 \(saved: 0\)", id="changed_final_phase"
        ),
        pytest.param([], r"nothing to train: the checkpoint is at step 6, the end of the run", id="already_finished"),
    ],
)
def test_resume_refuses_a_different_run_and_writes_nothing(tmp_path, trained_run, extra, message):
    run = copy_run(trained_run, tmp_path)
    (tmp_path / "other.txt").write_text("other text " * 500)
    before = snapshot(tmp_path)
    result = pretrain(["--resume", run, *[str(a).format(tmp=tmp_path) for a in extra]], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert snapshot(tmp_path) == before


def test_a_run_folder_is_never_reused_without_resume(tmp_path, corpus_file, trained_run):
    run = copy_run(trained_run, tmp_path)
    before = snapshot(tmp_path)
    result = pretrain([*SMALL, "--data", corpus_file, "--steps", 6, "--out", run], tmp_path)
    assert result.returncode == 1
    assert f"already holds a run's checkpoint.pt; continue it with --resume {run}" in result.stderr
    assert snapshot(tmp_path) == before


def test_help_explains_every_option():
    result = succeeded(pretrain(["--help"], REPO))
    for name in HELP:
        assert f"--{name.replace('_', '-')}" in result.stdout
    for text in ("--resume", "standard library", "bfloat16", "torch.compile", "cosine"):
        assert text in result.stdout


# An editable install's import hook would still find mmrec_ops._C in the
# working tree for the copied package; this drops it (as tests/test_packaging.py does).
DROP_EDITABLE_FINDER = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
"""


@pytest.mark.parametrize("module", ["mmrec_model.pretrain", "mmrec_model.generate"])
def test_missing_compiled_library_stops_the_command_with_the_build_commands(tmp_path, module):
    """mmrec_model imports mmrec_ops at the top, so the library's own ImportError
    is what the command ends with: it says what is missing and how to build it."""
    for package in ("mmrec_ops", "mmrec_model"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (tmp_path / "sitecustomize.py").write_text(DROP_EDITABLE_FINDER)
    result = run_module(module, ["--help"], tmp_path, env=environment(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stderr[result.stderr.index("ImportError: ") :]
    assert "mmrec_ops._C) could not be loaded" in message and "python setup.py build_ext --inplace" in message


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, corpus_file, fresh_seed):
    out = tmp_path / "run"
    args = [
        *SMALL,
        "--data",
        corpus_file,
        "--steps",
        6,
        "--eval-every",
        3,
        "--lr",
        "1e6",
        "--warmup",
        0,
        "--seed",
        fresh_seed,
        "--out",
        out,
    ]
    result = pretrain(args, tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(
        rf"mmrec-pretrain: error: step \d: the (training|validation) loss is (nan|inf)|the weights hold NaN or Inf; "
        rf"the run stopped, and {re.escape(str(out))}/checkpoint.pt keeps step (0|3)\. The run diverged",
        result.stderr,
    ), result.stderr
    checkpoint = load(out)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    assert not (out / "sample.txt").exists()


def hold_lock(folder: Path):
    """Holds `folder`'s run lock as a running run does (with its process id in the file)."""
    lock = open(folder / ".lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.truncate(0)
    lock.write("4242\n")
    lock.flush()
    return lock


def test_a_folder_that_another_run_writes_is_refused(tmp_path, corpus_file, fresh_seed):
    busy, run = tmp_path / "busy", tmp_path / "run"
    busy.mkdir()
    succeeded(pretrain([*run_args(corpus_file, fresh_seed, run, eval_every=4), "--stop-at", 4], tmp_path))
    with hold_lock(busy), hold_lock(run):
        before = snapshot(tmp_path)
        for args in ([*SMALL, "--data", corpus_file, "--steps", 6, "--out", busy], ["--resume", run]):
            result = pretrain(args, tmp_path)
            assert result.returncode == 1, result.stdout + result.stderr
            assert re.fullmatch(
                r"mmrec-pretrain: error: --out .*: another run \(process 4242\) is writing this folder; "
                r"wait until it ends or choose another --out\n",
                result.stderr,
            ), result.stderr
        assert snapshot(tmp_path) == before


# Runs the command with a disk that fills up during the n-th checkpoint write:
# the checkpoint's temporary file takes 1000 bytes, then its writes fail with ENOSPC.
FULL_DISK_AT_SAVE = """
import builtins, errno, os, sys
from mmrec_model.training import checkpoint
from mmrec_model.pretrain import main
class FullDisk:
    def __init__(self, file):
        self.file, self.room = file, 1000
    def write(self, data):
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.file.close()
    def __getattr__(self, name):
        return getattr(self.file, name)
opened = 0
def open_on_a_full_disk(path, *args, **kwargs):
    global opened
    file = builtins.open(path, *args, **kwargs)
    opened += ".checkpoint.pt." in str(path)
    return FullDisk(file) if opened >= int(os.environ["FULL_AT_SAVE"]) else file
checkpoint.open = open_on_a_full_disk
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint(tmp_path, corpus_file, fresh_seed):
    out = tmp_path / "run"
    command = [sys.executable, "-c", FULL_DISK_AT_SAVE, *map(str, run_args(corpus_file, fresh_seed, out, eval_every=3))]
    result = subprocess.run(
        command, cwd=tmp_path, env=environment(FULL_AT_SAVE="3"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.endswith(
        f"mmrec-pretrain: error: cannot write {out}/checkpoint.pt (No space left on device); "
        f"the run stopped, {out}/checkpoint.pt keeps its last checkpoint\n"
    ), result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "checkpoint.pt",
        "config.json",
        "loss.png",
        "metrics.jsonl",
    ]
    assert load(out)["step"] == 3
    succeeded(pretrain(["--resume", out], tmp_path))
    assert [r["step"] for r in metrics(out, "val")] == [0, 3, 6, 8]


def test_a_disk_full_before_the_first_checkpoint_says_that_none_was_written(tmp_path, corpus_file, fresh_seed):
    out = tmp_path / "run"
    command = [sys.executable, "-c", FULL_DISK_AT_SAVE, *map(str, run_args(corpus_file, fresh_seed, out, eval_every=3))]
    result = subprocess.run(
        command, cwd=tmp_path, env=environment(FULL_AT_SAVE="1"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.endswith(
        f"mmrec-pretrain: error: cannot write {out}/checkpoint.pt (No space left on device); "
        f"the run stopped before its first checkpoint: no {out}/checkpoint.pt was written\n"
    ), result.stderr
    assert not (out / "checkpoint.pt").exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write: a read-only tmpfs for root (whom permissions do not stop), else mode 555."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    ).returncode:
        pytest.skip("running as root without the right to mount a read-only tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_folder_is_one_line(tmp_path, corpus_file, read_only_folder):
    out = read_only_folder / "run"
    result = pretrain([*SMALL, "--data", corpus_file, "--steps", 6, "--out", out], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(
        rf"mmrec-pretrain: error: cannot write {re.escape(str(out))} \((Read-only file system|Permission denied)\)\n",
        result.stderr,
    ), result.stderr


def test_resume_drops_a_last_metrics_line_cut_short_and_refuses_a_damaged_one(tmp_path, corpus_file, fresh_seed):
    out = tmp_path / "run"
    succeeded(pretrain([*run_args(corpus_file, fresh_seed, out, eval_every=4), "--stop-at", 4], tmp_path))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join([*lines[:2], "not json\n", *lines[2:]]))
    result = pretrain(["--resume", out], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (
        result.stderr
        == f"mmrec-pretrain: error: --resume: {out}/metrics.jsonl: line 3 is not a metrics record; mend or delete it\n"
    )
    (out / "metrics.jsonl").write_text("".join(lines) + '{"step": 5, "split": "tr')  # a crash mid-append
    succeeded(pretrain(["--resume", out], tmp_path))
    assert [r["step"] for r in metrics(out, "train")] == list(range(1, 9))


@pytest.mark.parametrize(
    "edit, message",
    [
        pytest.param({"step": "3"}, r"step: expected an integer >= 0, got '3'", id="step_as_text"),
        pytest.param(
            {"rng": {"torch": torch.zeros(9, dtype=torch.uint8), "cuda": []}}, "rng: expected 'torch'", id="rng"
        ),
        pytest.param({"hook": print}, "not a readable checkpoint .*it pickles print", id="pickled_code"),
    ],
)
def test_a_hand_edited_checkpoint_is_refused_in_one_line(tmp_path, trained_run, edit, message):
    torch.save({**load(trained_run), **edit}, tmp_path / "checkpoint.pt")
    for result in (
        pretrain(["--resume", tmp_path], tmp_path),
        run_module("mmrec_model.generate", ["--checkpoint", tmp_path, "--prompt", "x"], tmp_path),
    ):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "weights_only" not in result.stderr
        assert re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize(
    "path, value, message",
    [
        pytest.param(
            ("optimizer", "state", 0, "exp_avg"),
            torch.zeros(1),
            r"optimizer.state\[0\].exp_avg: expected a torch.float32 tensor of the parameter's shape \[256, 32\]",
            id="moment_shape",
        ),
        pytest.param(
            ("train_config", "batch_size"),
            "8",
            "train_config.batch_size: expected an integer, got '8'",
            id="batch_text",
        ),
        pytest.param(("train_config", "lr"), "abc", "train_config.lr: expected a number, got 'abc'", id="lr_text"),
    ],
)
def test_a_hand_edited_training_state_is_refused_before_anything_is_written(
    tmp_path, corpus_file, fresh_seed, path, value, message
):
    """What only a resumed run reads (the settings, the optimizer's state) is checked
    before the run takes its folder: one line, the folder as it was."""
    out = tmp_path / "run"
    succeeded(pretrain([*run_args(corpus_file, fresh_seed, out, eval_every=2), "--stop-at", 2], tmp_path))
    checkpoint = load(out)
    *parents, last = path
    holder = checkpoint
    for key in parents:
        holder = holder[key]
    holder[last] = value
    torch.save(checkpoint, out / "checkpoint.pt")
    before = snapshot(tmp_path)
    result = pretrain(["--resume", out], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.fullmatch(rf"mmrec-pretrain: error: --resume: not a usable checkpoint: {message}\n", result.stderr)
    assert snapshot(tmp_path) == before


HANG_AT_STEP_2 = """
import sys, time
from mmrec_model import pretrain
real_step_batch = pretrain.step_batch
def hang_on_rank_1(run, step):
    if run.rank == 1 and step == 2:
        time.sleep(3600)  # hung, not dead: its socket stays open
    return real_step_batch(run, step)
pretrain.step_batch = hang_on_rank_1
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_a_hung_process_stops_the_others_after_the_dist_timeout(tmp_path, corpus_file):
    script = tmp_path / "hang.py"
    script.write_text(HANG_AT_STEP_2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    args = [*SMALL, "--data", corpus_file, "--steps", 6, "--out", tmp_path / "run", "--dist-timeout", 5]
    started = time.monotonic()
    result = subprocess.run(
        [*torchrun, str(script), *map(str, args)],
        cwd=tmp_path,
        env=environment(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and time.monotonic() - started < 120
    assert (
        "mmrec-pretrain: error: rank 0: another process did not answer within --dist-timeout 5 seconds "
        "(it hung or died); the run stopped at its last checkpoint\n" in result.stderr
    ), result.stderr
    assert "[rank0]: Traceback" not in result.stderr


def test_reset_at_documents_reads_each_document_from_an_empty_state(tmp_path, corpus_file, fresh_seed):
    """The same run with and without the flag on a folder of documents (pieces of 50
    bytes, so that every window of 80 holds a document's start after its first byte): the
    same windows and initial weights, other losses from the first validation on."""
    folder = tmp_path / "documents"
    folder.mkdir()
    text = corpus_file.read_bytes()[:20000]
    for i in range(0, len(text), 50):
        (folder / f"{i:06d}.txt").write_bytes(text[i : i + 50])
    runs = {}
    for flag in ([], ["--reset-at-documents"]):
        out = tmp_path / f"run{len(flag)}"
        args = [*SMALL, "--data", folder, "--steps", 1, "--eval-every", 1, "--seed", fresh_seed, "--out", out]
        succeeded(pretrain([*args, *flag], tmp_path))
        runs[bool(flag)] = out
    assert load(runs[True])["train_config"]["reset_at_documents"] is True
    for split in ("train", "val"):
        assert metrics(runs[True], split)[0]["loss"] != metrics(runs[False], split)[0]["loss"]
