"""`python -m mmrec_model.generate`: samples from a checkpoint, reproducibly; refuses bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mmrec_model.generate import decode, encode, generate_text, load_model
from tests.pretrain.cli import generate, succeeded

pytestmark = pytest.mark.pretrain


def test_prompt_round_trips_through_bytes():
    text = "déf f(x):\n\treturn x  # ünïcode"
    ids = encode(text)
    assert ids.shape == (1, len(text.encode("utf-8"))) and ids.dtype == torch.long
    assert decode(ids[0]) == text


def test_greedy_continuation_equals_argmax_of_the_model(trained_run):
    """Temperature 0 appends, byte by byte, the most likely byte given everything before it."""
    model = load_model(str(trained_run), torch.device("cpu"))
    text = generate_text(model, "import ", 12, temperature=0, top_k=None, seed=0)
    ids = encode("import ")
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert text == decode(ids[0])


def test_top_1_sampling_is_greedy(trained_run):
    model = load_model(str(trained_run), torch.device("cpu"))
    greedy = generate_text(model, "for ", 20, temperature=0, top_k=None, seed=0)
    assert generate_text(model, "for ", 20, temperature=0.8, top_k=1, seed=1) == greedy


def test_command_prints_the_python_api_sample_reproducibly(tmp_path, trained_run):
    args = ["--checkpoint", trained_run, "--prompt", "class ", "--max-new-tokens", 40, "--temperature", 0.7,
            "--top-k", 20, "--seed", 3, "--device", "cpu"]  # fmt: skip
    printed = succeeded(generate(args, tmp_path)).stdout
    expected = generate_text(load_model(str(trained_run), torch.device("cpu")), "class ", 40, 0.7, 20, seed=3)
    assert printed == expected + "\n"
    from_file = succeeded(generate([*args, "--checkpoint", trained_run / "checkpoint.pt"], tmp_path)).stdout
    assert from_file == printed


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, trained_run):
    checkpoint = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name].view(-1)[0] = math.nan
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    result = generate(["--checkpoint", tmp_path, "--prompt", "x"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == (
        f"mmrec-generate: error: {tmp_path}: the checkpoint's model has NaN or Inf weights ({name}): "
        "it comes from a run that diverged\n"
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--checkpoint", "{tmp}/nowhere"], "no checkpoint there", id="missing_checkpoint"),
        pytest.param(["--checkpoint", "{tmp}/garbage.pt"], "not a readable checkpoint", id="corrupt_checkpoint"),
        pytest.param(["--prompt", ""], "--prompt: expected at least one character", id="empty_prompt"),
        pytest.param(["--temperature", "-1"], "--temperature: expected >= 0", id="negative_temperature"),
        pytest.param(["--top-k", "300"], r"--top-k: expected 0 \.\. 256", id="top_k_too_large"),
    ],
)
def test_bad_input_exits_1_with_a_clear_message(tmp_path, trained_run, extra, message):
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    args = ["--checkpoint", trained_run, "--prompt", "x", *[str(a).format(tmp=tmp_path) for a in extra]]
    result = generate(args, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("mmrec-generate: error: ") and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
