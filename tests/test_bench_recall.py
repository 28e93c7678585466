"""The quality bench's recall measures: the copy probe's distances as --long-len allows them,
and the passkey test (its trials, every arch's greedy continuation from what it read, the
accuracy and the report's pairing of an ablation with its full model)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.common import model_logits
from bench.quality import passkey as P
from bench.quality.report import paired_passkey
from bench.quality.run import build_model
from bench.quality.settings import SMOKE, Settings, check_settings, model_config, passkey_contexts, probe_distances
from mmrec_model.training import Corpus
from tests.quality_cli import refused, run_quality

pytestmark = pytest.mark.bench


def text_corpus(val_bytes: int = 3000) -> Corpus:
    """Random printable bytes, no line of them a key's statement."""
    stream = torch.randint(32, 127, (val_bytes + 1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Corpus(train=stream[:1000], val=stream[1000:], source="printable bytes", sha256="")


@pytest.mark.parametrize(
    "long_len, largest",
    [(32768, 16384), (66046, 32768), (66047, 65536), (1023, 512)],
)
def test_the_default_probe_distances_are_those_whose_copy_the_long_windows_hold(long_len, largest):
    settings = Settings(long_len=long_len)
    assert probe_distances(settings) == tuple(d for d in (512, 2048, 4096, 8192, 16384, 32768, 65536) if d <= largest)
    check_settings(dataclasses.replace(settings, device="cpu"))
    assert probe_distances(dataclasses.replace(settings, probe_distances=(700,))) == (700,)


def test_long_windows_that_hold_no_default_copy_are_refused():
    settings = dataclasses.replace(SMOKE, probe_distances=None, long_len=1000, probe_len=256)
    with pytest.raises(ValueError, match="--long-len 1000: holds no copy of the probe's default distances"):
        check_settings(settings)
    check_settings(dataclasses.replace(settings, probe_distances=(300,)))


@pytest.mark.parametrize(
    "options, expected",
    [
        (("--passkey-max-len", "500"), "--passkey-max-len: expected at least the shortest context (512), got 500"),
        (("--passkey-trials", "0"), "--passkey-trials: expected a positive integer, got 0"),
    ],
)
def test_quality_refuses_a_passkey_test_it_cannot_make(tmp_path, options, expected):
    line = refused(run_quality("run", "--smoke", "--arch", "mmrec", "--seed", "0", "--out", str(tmp_path), *options))
    assert line == f"bench.quality run: error: {expected}" and not list(tmp_path.iterdir())


def test_passkey_contexts_reach_the_longest_setting():
    assert passkey_contexts(Settings()) == (512, 1024, 4096, 16384, 65536)
    assert passkey_contexts(Settings(passkey_max_len=300000)) == (512, 1024, 4096, 16384, 65536, 262144)
    assert passkey_contexts(SMOKE) == (512, 1024)


def test_a_passkey_trial_states_its_key_once_at_depths_spread_over_the_context():
    val = text_corpus().val
    prompts, digits, offsets = P.passkey_trials(val, 512, 4)
    assert prompts.shape == (4, 512) and prompts.dtype == torch.int64 and digits.shape == (4, 5)
    filler = P.filler_len(512)
    assert offsets == [(2 * i + 1) * filler // 8 for i in range(4)]
    for row, key, offset in zip(prompts, digits, offsets):
        text, key = bytes(row.tolist()), bytes(key.tolist())
        assert key.isdigit() and key[0] != ord("0")
        statement = b"\n# pass key: " + key + b"\n"
        assert text[offset : offset + len(statement)] == statement and text.endswith(b"\n# pass key: ")
        assert text.count(b"# pass key: ") == 2
        # around the statement, one stretch of the validation split
        filler_text = text[:offset] + text[offset + len(statement) : -len(b"\n# pass key: ")]
        assert len(filler_text) == filler and filler_text in bytes(val.tolist())
    again = P.passkey_trials(val, 512, 4)
    assert torch.equal(again[0], prompts) and torch.equal(again[1], digits)  # the same trials for every row
    assert not torch.equal(P.passkey_trials(val, 1024, 4)[1], digits)


def test_passkey_refuses_contexts_longer_than_the_validation_split():
    settings = dataclasses.replace(SMOKE, passkey_max_len=4096)
    P.check_passkey_fits(text_corpus(4096), settings)
    with pytest.raises(ValueError, match="--passkey-max-len 4096: a context of 4096 bytes needs 4064 bytes"):
        P.check_passkey_fits(text_corpus(4000), settings)


@pytest.mark.parametrize("arch", ["mmrec", "mmrec-no-window", "transformer", "transformer-window"])
def test_the_greedy_continuation_from_what_was_read_is_what_full_reads_give(arch):
    settings = dataclasses.replace(SMOKE, window=16)  # prompts longer than the window and a memory segment
    model = build_model(model_config(arch, settings), 0, torch.device("cpu"))
    prompts = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(1))
    decoded = P.greedy_continuation(model, prompts, 5, 64, None)
    assert decoded.shape == (2, 5) and decoded.dtype == torch.int64
    with torch.no_grad():
        for i in range(5):
            ids = torch.cat([prompts, decoded[:, :i]], dim=1)
            assert torch.equal(model_logits(model, ids)[:, -1].argmax(-1), decoded[:, i])


def key_reader(wrong_last: bool):
    """A greedy_continuation stand-in that answers the key stated in each prompt (its last
    digit wrong with `wrong_last`)."""

    def answer(model, prompts, new_bytes, chunk_size, autocast_dtype):
        answers = []
        for row in prompts.tolist():
            text = bytes(row)
            start = text.index(b"# pass key: ") + len(b"# pass key: ")
            answers.append(list(text[start : start + new_bytes - 1]) + [ord("x") if wrong_last else text[start + 4]])
        return torch.tensor(answers)

    return answer


@pytest.mark.parametrize("wrong_last, accuracy, digits", [(False, 1.0, 1.0), (True, 0.0, 0.8)])
def test_passkey_accuracy_needs_every_digit_and_counts_the_digits_right(monkeypatch, wrong_last, accuracy, digits):
    monkeypatch.setattr(P, "greedy_continuation", key_reader(wrong_last))
    monkeypatch.setattr(P, "BATCH_BYTES", 1024)  # 2 trials a forward at 512: batches of 2 and 1
    measured = P.passkey(None, text_corpus(), dataclasses.replace(SMOKE, passkey_trials=3), None)
    assert [c["context"] for c in measured["contexts"]] == [512, 1024] and measured["trials"] == 3
    for context in measured["contexts"]:
        assert context["accuracy"] == accuracy and context["digit_accuracy"] == pytest.approx(digits)
        assert context["digits_right"] == [round(5 * digits)] * 3 and len(context["key_offsets"]) == 3


def passkey_row(accuracies: dict[int, float]) -> dict:
    return {"passkey": {"contexts": [{"context": c, "accuracy": a} for c, a in accuracies.items()]}}


def test_the_report_pairs_passkeys_at_the_longest_context_every_row_measured():
    pairs = [
        (passkey_row({512: 0.5, 1024: 0.25}), passkey_row({512: 1.0, 1024: 0.75, 4096: 0.5})),
        (passkey_row({512: 0.5, 1024: 0.75}), passkey_row({512: 1.0, 1024: 0.25})),
    ]
    paired = paired_passkey(pairs)
    assert paired["context"] == 1024
    assert paired["ablation"]["mean"] == 0.5 and paired["full"]["mean"] == 0.5 and paired["full"]["max"] == 0.75
    assert paired_passkey([(passkey_row({}), passkey_row({512: 1.0}))]) is None
    assert paired_passkey([({}, passkey_row({512: 1.0}))]) is None  # a row from before the passkey test
