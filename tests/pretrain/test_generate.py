"""`python -m mmrec_model.generate`: samples from a checkpoint, reproducibly; refuses bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch

from mmrec_model.generate import Sampling, decode, encode, generate_text, print_stream
from mmrec_model.training import load_model
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
    text = generate_text(model, "import ", 12, Sampling(temperature=0, top_k=None))
    ids = encode("import ")
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(ids)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert text == decode(ids[0])


def test_top_1_sampling_is_greedy(trained_run):
    model = load_model(str(trained_run), torch.device("cpu"))
    greedy = generate_text(model, "for ", 20, Sampling(temperature=0, top_k=None))
    assert generate_text(model, "for ", 20, Sampling(temperature=0.8, top_k=1, seed=1)) == greedy
    # The nucleus of a tiny p holds the likeliest byte alone.
    assert generate_text(model, "for ", 20, Sampling(temperature=0.8, top_k=None, top_p=1e-6, seed=2)) == greedy


def test_sampling_is_reproducible_and_leaves_the_global_generator_alone(trained_run):
    model = load_model(str(trained_run), torch.device("cpu"))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = generate_text(model, "def ", 30, Sampling(temperature=1.0, top_k=None, seed=4))
    assert torch.equal(torch.get_rng_state(), before)
    assert generate_text(model, "def ", 30, Sampling(temperature=1.0, top_k=None, seed=4)) == first
    assert generate_text(model, "def ", 30, Sampling(temperature=1.0, top_k=None, seed=5)) != first


def test_stream_prints_each_character_once_complete(capsys):
    print_stream("a", iter("é€".encode()))
    assert capsys.readouterr().out == "aé€\n"


def test_command_prints_the_python_api_sample_reproducibly(tmp_path, trained_run):
    args = [
        "--checkpoint",
        trained_run,
        "--prompt",
        "class ",
        "--max-new-tokens",
        40,
        "--temperature",
        0.7,
        "--top-k",
        20,
        "--seed",
        3,
        "--device",
        "cpu",
    ]
    printed = succeeded(generate(args, tmp_path)).stdout
    expected = generate_text(
        load_model(str(trained_run), torch.device("cpu")), "class ", 40, Sampling(0.7, 20, None, 3)
    )
    assert printed == expected + "\n"
    from_file = succeeded(generate([*args, "--checkpoint", trained_run / "checkpoint.pt"], tmp_path)).stdout
    assert from_file == printed


def test_command_generates_samples_as_a_batch_and_reports_its_speed(tmp_path, trained_run):
    args = [
        "--checkpoint",
        trained_run,
        "--prompt",
        "if ",
        "--max-new-tokens",
        16,
        "--temperature",
        0,
        "--num-samples",
        3,
        "--device",
        "cpu",
    ]
    result = succeeded(generate(args, tmp_path))
    greedy = generate_text(load_model(str(trained_run), torch.device("cpu")), "if ", 16, Sampling(temperature=0))
    samples = [f"--- sample {i} of 3 ---\n{greedy}\n" for i in (1, 2, 3)]
    assert result.stdout == "".join(samples)
    assert re.fullmatch(
        r"mmrec-generate: 48 bytes in [\d.]+ s, [\d,]+ bytes/s \(prompt included\) on cpu\n", result.stderr
    )


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
        pytest.param(
            ["--temperature", "nan"], "--temperature: expected a finite number, got nan", id="nan_temperature"
        ),
        pytest.param(["--top-p", "inf"], "--top-p: expected a finite number, got inf", id="infinite_top_p"),
        pytest.param(["--top-k", "300"], r"--top-k: expected 0 \.\. 256", id="top_k_too_large"),
        pytest.param(["--top-p", "0"], r"--top-p: expected a number in \(0, 1\]", id="top_p_zero"),
        pytest.param(["--num-samples", "0"], "--num-samples: expected a positive integer", id="no_samples"),
    ],
)
def test_bad_input_exits_1_with_a_clear_message(tmp_path, trained_run, extra, message):
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    args = ["--checkpoint", trained_run, "--prompt", "x", *[str(a).format(tmp=tmp_path) for a in extra]]
    result = generate(args, tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("mmrec-generate: error: ") and "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
