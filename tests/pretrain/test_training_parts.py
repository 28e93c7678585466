"""The learning-rate schedule, the optimizer's groups, a training step, the training loop
(its checkpoints and exact resume), and atomic checkpoint files."""

from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import math
import os
import re

import pytest
import torch

from mmrec_model import MMRecConfig, MMRecModel
from mmrec_model.pretrain import PretrainSettings, UsageError, check_sizes, resumed_config
from mmrec_model.training import SettingsError, Trainer, TrainSettings, make_optimizer, make_scheduler, train_step
from mmrec_model.training import checkpoint as C
from mmrec_model.training.optim import MIN_LR_RATIO, lr_factor, window_logits

pytestmark = pytest.mark.pretrain


@pytest.mark.parametrize("warmup, steps", [(0, 1), (1, 2), (10, 97), (50, 50)])
def test_schedule_warms_up_linearly_then_falls_by_cosine_to_a_tenth(warmup, steps):
    factors = [lr_factor(s, warmup, steps) for s in range(steps)]
    assert factors[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    if warmup < steps:
        assert factors[warmup] == pytest.approx(1.0)
        cosine = factors[warmup:]
        assert all(a >= b for a, b in zip(cosine, cosine[1:]))
        progress = (steps - 1 - warmup) / (steps - warmup)
        expected = MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
        assert factors[-1] == pytest.approx(expected)
        assert lr_factor(steps, warmup, steps) == pytest.approx(MIN_LR_RATIO)


def test_weight_decay_applies_to_matrices_only():
    model = torch.nn.Sequential(torch.nn.Embedding(7, 5), torch.nn.Linear(5, 3), torch.nn.LayerNorm(3))
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.25)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.25 and plain["weight_decay"] == 0.0
    assert {p.dim() for p in decayed["params"]} == {2}
    assert {p.dim() for p in plain["params"]} == {1}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def still_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and schedule of training at learning rate 0: the weights stay as they are."""
    optimizer = make_optimizer(model, lr=0.0, weight_decay=0.0)
    return optimizer, make_scheduler(optimizer, warmup=0, steps=2)


def test_a_model_of_logits_alone_trains():
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    ids = torch.randint(0, 256, (2, 9))
    loss = train_step(model, ids[:, :-1], ids[:, 1:], *still_optimizer(model), grad_clip=1.0)
    assert loss.shape == () and loss.grad_fn is None


def bigram_trainer(steps: int) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256))
    return Trainer(model, TrainSettings(steps=steps, batch_size=2, seq_len=8, lr=1e-2))


def random_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(step))
    return ids[:, :-1], ids[:, 1:]


def test_the_loop_saves_every_n_steps_and_at_its_stop():
    trainer, saved = bigram_trainer(steps=12), []
    trainer.train(random_batch, 9, save=saved.append, save_every=6)
    assert saved == [6, 9] and trainer.step == 9 and len(trainer.progress.losses) == 9
    trainer.train(random_batch, 12, save=saved.append, save_every=4)
    assert saved == [6, 9, 12] and len(trainer.progress.losses) == 12


def test_the_loop_resumed_from_its_checkpoint_continues_exactly():
    straight = bigram_trainer(steps=6)
    straight.train(random_batch, 6)
    first = bigram_trainer(steps=6)
    first.train(random_batch, 3)
    resumed = bigram_trainer(steps=6)
    resumed.restore(first.checkpoint(), "test")
    resumed.train(random_batch, 6)
    torch.testing.assert_close(resumed.model.state_dict(), straight.model.state_dict(), rtol=0, atol=0)
    assert torch.equal(resumed.progress.losses, straight.progress.losses)
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()


def test_the_final_phase_reads_its_long_windows_in_the_last_steps_the_same_bytes_a_step():
    settings = TrainSettings(steps=5, batch_size=4, seq_len=16, final_steps=2, final_seq_len=32)
    assert [settings.step_windows(step) for step in range(5)] == [(4, 16)] * 3 + [(2, 32)] * 2
    assert [TrainSettings(steps=5, batch_size=4, seq_len=16).step_windows(step) for step in (4, 7)] == [(4, 16)] * 2


@pytest.mark.parametrize(
    "final, message",
    [
        (dict(final_steps=7, final_seq_len=64), r"--final-steps: expected 0 to --steps \(6\), got 7"),
        (dict(final_steps=-1), r"--final-steps: expected 0 to --steps \(6\), got -1"),
        (dict(final_steps=2), r"--final-seq-len: expected a divisor of --batch-size x --seq-len \(64\) .* got None"),
        (dict(final_steps=2, final_seq_len=24), r"--final-seq-len: expected a divisor .* got 24"),
        (dict(final_steps=2, final_seq_len=0), r"--final-seq-len: expected a divisor .* got 0"),
    ],
)
def test_a_final_phase_that_cannot_train_is_refused_by_its_option(final, message):
    TrainSettings(steps=6, batch_size=4, seq_len=16, final_steps=6, final_seq_len=64).check()
    with pytest.raises(SettingsError, match=message):
        TrainSettings(steps=6, batch_size=4, seq_len=16, **final).check()


def test_the_loop_resumed_in_the_final_phase_continues_exactly():
    settings = TrainSettings(steps=6, batch_size=2, seq_len=8, lr=1e-2, final_steps=3, final_seq_len=16)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        return Trainer(torch.nn.Sequential(torch.nn.Embedding(256, 8), torch.nn.Linear(8, 256)), settings)

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        windows, length = settings.step_windows(step)
        ids = torch.randint(0, 256, (windows, length + 1), generator=torch.Generator().manual_seed(step))
        return ids[:, :-1], ids[:, 1:]

    straight = trainer()
    straight.train(batch, 6)
    assert straight.progress.steady_steps == 4  # the first step and the phase's first compile
    for stop in (2, 4):  # before the phase's first step (3), and inside the phase
        first = trainer()
        first.train(batch, stop)
        resumed = trainer()
        resumed.restore(first.checkpoint(), "test")
        resumed.train(batch, 6)
        torch.testing.assert_close(resumed.model.state_dict(), straight.model.state_dict(), rtol=0, atol=0)
        assert torch.equal(resumed.progress.losses, straight.progress.losses)


def test_the_final_phase_shares_its_windows_among_the_processes():
    settings = PretrainSettings(steps=6, batch_size=6, seq_len=16, final_steps=2, final_seq_len=48)
    check_sizes(settings, world_size=2, start_step=0)  # 2 windows of 48 bytes a step
    with pytest.raises(UsageError, match="--final-seq-len 48: the final phase's 2 windows .* processes \\(3\\)"):
        check_sizes(settings, world_size=3, start_step=0)


def edited(checkpoint: dict, path: tuple, change) -> dict:
    """A copy of checkpoint with the entry at `path` (keys into nested dicts and lists)
    replaced by change(entry)."""
    checkpoint = copy.deepcopy(checkpoint)
    *parents, last = path
    holder = functools.reduce(lambda entry, key: entry[key], parents, checkpoint)
    holder[last] = change(holder[last])
    return checkpoint


STATE_EDITS = [
    pytest.param(
        ("optimizer", "state", 0, "exp_avg"),
        lambda moment: moment[:1],
        r"optimizer.state\[0\].exp_avg: expected a torch.float32 tensor of the parameter's shape \[256, 8\]",
        id="moment_shape",
    ),
    pytest.param(
        ("optimizer", "state", 1, "exp_avg_sq"),
        lambda moment: moment.double(),
        r"optimizer.state\[1\].exp_avg_sq: expected a torch.float32 tensor",
        id="moment_dtype",
    ),
    pytest.param(
        ("optimizer", "state", 0, "step"),
        lambda step: torch.zeros(2),
        r"optimizer.state\[0\].step: expected a float tensor of one element",
        id="step_of_two",
    ),
    pytest.param(
        ("optimizer", "state", 0),
        lambda state: {"exp_avg": state["exp_avg"]},
        "optimizer.state\\[0\\]: expected AdamW's step, exp_avg, exp_avg_sq",
        id="moments_missing",
    ),
    pytest.param(
        ("optimizer", "state"),
        lambda states: {**states, 7: states[0]},
        r"optimizer.state\[7\]: no such parameter \(the model has 3\)",
        id="unknown_parameter",
    ),
    pytest.param(
        ("optimizer", "param_groups", 0, "lr"),
        lambda lr: "x",
        r"optimizer.param_groups\[0\].lr: expected a number, got 'x'",
        id="group_lr_text",
    ),
    pytest.param(
        ("optimizer", "param_groups", 0, "params"),
        lambda params: params[:1],
        r"optimizer.param_groups\[0\].params: expected a list of 2, got 1",
        id="group_params",
    ),
    pytest.param(("scheduler", "base_lrs"), lambda lrs: "x", r"scheduler.base_lrs: expected a list, got 'x'", id="lrs"),
    pytest.param(("progress", "train_s"), lambda s: "1s", r"progress.train_s: expected a number, got '1s'", id="clock"),
    pytest.param(("progress",), lambda p: {**p, "bogus": 1}, "progress: unknown entries 'bogus'", id="progress_key"),
]


@pytest.mark.parametrize("path, change, message", STATE_EDITS)
def test_a_resumed_trainer_refuses_states_that_do_not_fit_before_loading_any(path, change, message):
    """AdamW would fail at its next step (a moment of the wrong shape) or the run at its
    first report (a clock as text); the trainer refuses at restore, its weights untouched."""
    first = bigram_trainer(steps=6)
    first.train(random_batch, 3)
    resumed = bigram_trainer(steps=6)
    weights = copy.deepcopy(resumed.model.state_dict())
    with pytest.raises(C.CheckpointError, match=f"^test: not a usable checkpoint: {message}"):
        resumed.restore(edited(first.checkpoint(), path, change), "test")
    torch.testing.assert_close(resumed.model.state_dict(), weights, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("batch_size", "8", "train_config.batch_size: expected an integer, got '8'"),
        ("batch_size", True, "train_config.batch_size: expected an integer, got True"),
        ("lr", "abc", "train_config.lr: expected a number, got 'abc'"),
        ("warmup", 2.5, "train_config.warmup: expected an integer or None, got 2.5"),
        ("compile", 1, "train_config.compile: expected a boolean, got 1"),
        ("tokenizer", "bpe", "train_config: unknown entries 'tokenizer'"),
    ],
)
def test_a_resumed_run_refuses_settings_of_the_wrong_type(name, value, message):
    checkpoint = {"train_config": {**vars(PretrainSettings()), name: value}}
    with pytest.raises(C.CheckpointError, match=f"^--resume: not a usable checkpoint: {re.escape(message)}$"):
        resumed_config({}, checkpoint)


FLOAT_OPTIONS = [field.name for field in dataclasses.fields(PretrainSettings) if "float" in str(field.type)]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("name", FLOAT_OPTIONS)
def test_every_float_option_refuses_nan_and_inf_by_name(name, value):
    option = "--" + name.replace("_", "-")
    with pytest.raises(SettingsError, match=f"^{option}: expected a finite number, got {value}$"):
        dataclasses.replace(PretrainSettings(), **{name: value}).check()


def test_resumed_run_keeps_its_settings_and_takes_where_to_run():
    saved = PretrainSettings(lr=1e-3, steps=40, eval_every=5)
    checkpoint = {"train_config": vars(saved)}
    resumed = resumed_config({"lr": 1e-3, "eval_every": 7, "device": "cpu", "stop_at": 30}, checkpoint)
    assert (resumed.lr, resumed.steps, resumed.eval_every, resumed.device, resumed.stop_at) == (1e-3, 40, 7, "cpu", 30)
    with pytest.raises(UsageError, match=r"--lr 0.01 \(saved: 0.001\)"):
        resumed_config({"lr": 1e-2}, checkpoint)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    C.atomic_write(path, lambda f: f.write(b"old"))

    def crash(file):
        file.write(b"partial new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        C.atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    C.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"


def test_atomic_write_names_its_temporary_file_per_writer_and_removes_it_on_failure(tmp_path):
    path = tmp_path / "file.bin"
    names = set()

    def record_name(file):
        names.add(file.name)
        file.write(b"data")

    C.atomic_write(path, record_name)
    C.atomic_write(path, record_name)
    assert len(names) == 2 and all(f".{os.getpid()}." in name for name in names)

    def disk_full(file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left on device"):
        C.atomic_write(path, disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    assert path.read_bytes() == b"data"


def make_checkpoint() -> dict:
    return {
        "format": C.CHECKPOINT_FORMAT,
        "step": 3,
        "model": {"w": torch.randn(2, 3)},
        "model_config": {},
        "train_config": {},
        "optimizer": {},
        "scheduler": {"last_epoch": 3},
        "rng": C.rng_states(),
        "data": {"sha256": "0" * 64, "source": "test data"},
    }


def test_checkpoint_round_trip_from_file_or_folder(tmp_path):
    checkpoint = make_checkpoint()
    C.save_checkpoint(tmp_path / C.CHECKPOINT_NAME, checkpoint)
    for where in (tmp_path, tmp_path / C.CHECKPOINT_NAME):
        loaded = C.load_checkpoint(where)
        assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], checkpoint["model"]["w"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_checkpoint", "missing"])
def test_unusable_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / C.CHECKPOINT_NAME
    C.save_checkpoint(path, make_checkpoint())
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "not_a_checkpoint":
        torch.save({"weights": torch.ones(2)}, path)
    else:
        path.unlink()
    with pytest.raises(C.CheckpointError, match=str(tmp_path)):
        C.load_checkpoint(path)


class SystemCall:
    """Pickles as a call of os.system, which torch's weights_only unpickler blocks by module."""

    def __reduce__(self):
        return (os.system, ("exit 3",))


@pytest.mark.parametrize(
    "code, name",
    [(print, "print"), (SystemCall(), re.escape(os.system.__module__) + r"\.system")],
    ids=["print", "system"],
)
def test_checkpoint_with_pickled_code_is_refused(tmp_path, code, name):
    path = tmp_path / C.CHECKPOINT_NAME
    torch.save({**make_checkpoint(), "hook": code}, path)  # weights_only=False would import and call
    with pytest.raises(C.CheckpointError, match=f"not a readable checkpoint \\(it pickles {name}, ") as refusal:
        C.load_checkpoint(path)
    message = str(refusal.value)
    assert "weights_only" not in message and "\n" not in message  # never torch's advice to load it anyway


HAND_EDITS = [
    pytest.param({"step": "3"}, r"step: expected an integer >= 0, got '3'", id="step_as_text"),
    pytest.param({"step": -1}, r"step: expected an integer >= 0, got -1", id="negative_step"),
    pytest.param({"step": 4}, r"scheduler: expected last_epoch 4 \(the step\), got 3", id="step_not_the_schedulers"),
    pytest.param({"data": {}}, "data: expected the corpus' 'sha256' and 'source'", id="empty_data"),
    pytest.param({"model": [1, 2]}, "model: expected a dict, got list", id="model_a_list"),
    pytest.param(
        {"model": {"w": 1.0}}, r"model: expected a state_dict \(parameter names to tensors\)", id="model_of_floats"
    ),
    pytest.param(
        {"rng": {"torch": torch.zeros(7, dtype=torch.uint8), "cuda": []}},
        "rng: expected 'torch', the CPU generator's state of 5056 bytes",
        id="rng_wrong_size",
    ),
    pytest.param(
        {"rng": {"torch": torch.get_rng_state(), "cuda": None}}, "rng: expected 'cuda'", id="rng_cuda_missing"
    ),
    pytest.param({"optimizer": "adamw"}, "optimizer: expected a dict, got str", id="optimizer_a_string"),
]


@pytest.mark.parametrize("edit, message", HAND_EDITS)
def test_hand_edited_checkpoint_is_refused_with_one_line(tmp_path, edit, message):
    path = tmp_path / C.CHECKPOINT_NAME
    torch.save({**make_checkpoint(), **edit}, path)
    with pytest.raises(C.CheckpointError, match=f"{path}: not a usable checkpoint: {message}") as refusal:
        C.load_checkpoint(path)
    assert "\n" not in str(refusal.value)


def test_non_finite_entries_names_the_tensors_holding_nan_or_inf():
    state = {
        "a": torch.ones(3),
        "b": torch.tensor([1.0, math.nan]),
        "c": torch.tensor([math.inf]),
        "n": torch.ones(2, dtype=torch.long),
    }
    assert C.non_finite_entries(state) == ["b", "c"]


def older_checkpoint(**retired) -> dict:
    """A checkpoint of the `tiny` model as an older version wrote it: its model_config with
    the retired fields."""
    config = MMRecConfig.preset("tiny")
    fields = {**dataclasses.asdict(config), **retired}
    return {**make_checkpoint(), "model": MMRecModel(config).state_dict(), "model_config": fields}


def test_an_older_checkpoint_of_the_model_as_it_reads_now_loads():
    checkpoint = older_checkpoint(memory_read="joint", entry_summary="mean")
    model = C.model_from_checkpoint(checkpoint, torch.device("cpu"), "old.pt")
    assert model.config == MMRecConfig.preset("tiny")


@pytest.mark.parametrize(
    "retired", [{"memory_read": "gated"}, {"entry_summary": "best"}, {"read_kernel": "flex"}], ids=str
)
def test_an_older_checkpoint_of_a_removed_variant_is_refused_by_name(retired):
    ((name, value),) = retired.items()
    with pytest.raises(C.CheckpointError, match=f"old.pt: .*{name}='{value}', a variant this version removed"):
        C.model_from_checkpoint(older_checkpoint(**retired), torch.device("cpu"), "old.pt")


def test_an_older_checkpoint_without_a_long_term_memory_loads_without_one():
    checkpoint = older_checkpoint(n_levels=0, level_slots=32)
    checkpoint["model_config"].pop("memory_tokens"), checkpoint["model_config"].pop("top_k")
    model = C.model_from_checkpoint(checkpoint, torch.device("cpu"), "old.pt")
    assert model.config == MMRecConfig.preset("tiny", top_k=0)


def test_an_older_checkpoint_of_the_summary_long_term_memory_is_refused():
    checkpoint = older_checkpoint(n_levels=3, level_slots=32)
    with pytest.raises(C.CheckpointError, match=r"old.pt: .*summary long-term memory \(n_levels=3\).*retrieval"):
        C.model_from_checkpoint(checkpoint, torch.device("cpu"), "old.pt")


def test_starts_need_an_mmrec_model():
    """The Transformer baseline (any model but MMRecModel) cannot read documents from an empty state."""
    linear = torch.nn.Embedding(256, 256)
    ids = torch.zeros(1, 4, dtype=torch.int64)
    assert window_logits(linear, ids).shape == (1, 4, 256)
    with pytest.raises(ValueError, match="starts .* needs an MMRecModel, got a Embedding"):
        window_logits(linear, ids, torch.ones(1, 4, dtype=torch.bool))
