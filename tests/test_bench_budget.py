"""The quality bench trained for a wall-clock budget (--time-budget): the steps it allows, a
warm-up that trains nothing, a row that is the row of those steps, continued exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench.quality.budget import steps_within, time_phases
from bench.quality.run import build_model
from bench.quality.settings import SMOKE, check_settings, model_config
from mmrec_model.training import Corpus
from tests.quality_cli import finished, refused, run_quality

pytestmark = pytest.mark.bench


def test_the_budget_holds_the_final_phase_then_as_many_steps_as_fit():
    assert steps_within(10.0, 1.0, None, 0) == 10
    assert steps_within(10.5, 1.0, 2.0, 3) == 3 + 4  # 3 final steps of 2 s, then 4 of 1 s
    with pytest.raises(ValueError, match="--time-budget 0.5: leaves no time for a step of 1 s; expected"):
        steps_within(0.5, 1.0, None, 0)
    with pytest.raises(ValueError, match="of 1 s after the final phase's 3 steps \\(6 s\\)"):
        steps_within(6.5, 1.0, 2.0, 3)


def test_a_budget_may_hold_a_final_phase_longer_than_the_default_steps():
    """Before the budget sets the steps, only the final phase bounds them (not --steps' default)."""
    settings = dataclasses.replace(SMOKE, final_steps=50, final_seq_len=256)
    with pytest.raises(ValueError, match="--final-steps: expected 0 to --steps"):
        check_settings(settings)
    check_settings(dataclasses.replace(settings, time_budget=600.0))


@pytest.mark.parametrize("final_steps", [0, 2])
def test_the_timed_warm_up_trains_nothing(final_steps):
    settings = dataclasses.replace(SMOKE, steps=6, seq_len=16, final_steps=final_steps, final_seq_len=32)
    stream = torch.randint(0, 256, (4000,), dtype=torch.uint8)
    corpus = Corpus(train=stream[:3000], val=stream[3000:], source="random bytes", sha256="")
    model = build_model(model_config("mmrec", settings), 0, torch.device("cpu"))
    before, generator = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    step_s, final_step_s = time_phases(model, corpus, settings, 0, None)
    assert step_s > 0 and (final_step_s is None) == (final_steps == 0) and (final_step_s or 1) > 0
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), generator)


@pytest.mark.parametrize(
    "options, expected",
    [
        (("--time-budget", "0"), "--time-budget: expected a positive number of seconds, got 0.0"),
        (("--time-budget", "5", "--steps", "8"), "--time-budget: sets the steps itself; expected --time-budget or"),
        (("--time-budget", "1e-9"), "--time-budget 1e-09: leaves no time for a step of"),
    ],
)
def test_quality_refuses_a_budget_it_cannot_train(tmp_path, options, expected):
    line = refused(run_quality("run", "--smoke", "--arch", "mmrec", "--seed", "0", "--out", str(tmp_path), *options))
    assert line.startswith(f"bench.quality run: error: {expected}")
    assert not tmp_path.exists() or not list(tmp_path.iterdir())


def test_a_budget_row_is_the_row_of_its_steps_and_continues_exactly(tmp_path):
    budgeted, counted = tmp_path / "budgeted", tmp_path / "counted"
    # A step of the smoke's model takes milliseconds: 3 s hold many, and the row stops before its end.
    row = ("run", "--smoke", "--arch", "mmrec", "--seed", "2", "--time-budget", "3", "--out", str(budgeted))
    stopped = finished(run_quality(*row, "--checkpoint-every", "2", "--stop-at", "1"))
    assert "stopped at step 1" in stopped and (budgeted / "mmrec+budget3s-seed2.ckpt.pt").exists()
    finished(run_quality(*row, "--checkpoint-every", "2"))  # continues with the steps the budget allowed
    one = json.loads((budgeted / "mmrec+budget3s-seed2.json").read_text())
    steps, budget = one["settings"]["steps"], one["time_budget"]
    assert budget["steps"] == steps > 1 and one["settings"]["time_budget"] == budget["seconds"] == 3
    assert budget["step_s"] > 0 and budget["final_step_s"] is None and budget["timed_steps"] == 10
    assert one["tokens"] == steps * 2 * 128 and one["curve"]["step"][-1] == steps and one["device"]
    counted_row = ("run", "--smoke", "--arch", "mmrec", "--seed", "2", "--steps", str(steps), "--out", str(counted))
    finished(run_quality(*counted_row))
    other = json.loads((counted / "mmrec-seed2.json").read_text())
    for key in ("curve", "val_bpb", "long_context", "recall", "passkey"):
        assert one[key] == other[key], key
    table = finished(run_quality("report", str(budgeted)))
    assert f"| mmrec+budget3s | 1 | 0.04M | {steps} |" in table
    assert "wall-clock budget of S seconds (3 s) on CPU" in table
