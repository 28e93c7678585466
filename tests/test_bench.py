"""The benchmarks (GPU model, training-step breakdown, the read, decoding, quality) run end to end
on tiny shapes on the CPU (--smoke), so the scripts cannot rot between GPU sessions; the
Transformer baseline's KV-cache decoding gives the logits of a full forward, and its
windowed variant sees the last `window` tokens only."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.quality.measure import probe_offsets, recall_sequence
from bench.quality.report import past_first_band_bpb, past_first_band_label
from bench.quality.run import build_model, train
from bench.quality.settings import SMOKE, Settings, model_config, row_label
from bench.transformer import KVCache, StaticDecoder, Transformer, TransformerConfig
from mmrec_model.training import Corpus, train_step
from tests.helpers import FLOAT32_ACCUMULATION, assert_close_rel
from tests.quality_cli import finished, run_quality

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent


def test_model_gpu_smoke(tmp_path):
    out = tmp_path / "model"
    args = ["--smoke", "--device", "cpu", "--seq-lens", "128", "--contexts", "64", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "bench.model_gpu", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    archs = {"transformer", "mmrec-parallel", "mmrec-exact"}
    assert {r["arch"] for r in results["train"]} == archs
    assert all(r["tokens_per_s"] > 0 for r in results["train"])
    # MM-Rec's state has the same size whatever the context; it is what generation reads.
    assert all(r["ms_per_token"] > 0 and r["state_bytes"] > 0 for r in results["generate"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| mmrec-parallel |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("op, shape", [("scan", ["2", "16", "2", "8"]), ("recurrence", ["2", "8", "2", "8"])])
def test_op_benchmark_smoke(tmp_path, op, shape):
    """bench.scan and bench.recurrence on a tiny shape: every CPU row, and
    the ratio of forward+backward through autograd to the ops called directly."""
    out = tmp_path / op
    args = ["--shape", *shape, "--repeats", "2", "--skip-slow", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{op}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    through_autograd = [r for r in report["results"] if "eager through autograd" in r["name"]]
    assert through_autograd and all(r["fwdbwd_ms"] > 0 for r in through_autograd)
    for pair in report["info"]["autograd_over_direct"]:
        assert pair["autograd_ms"] > 0 and pair["direct_ms"] > 0 and pair["ratio"] > 0
    assert "through autograd / " in out.with_suffix(".md").read_text()


def test_transformer_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=32, n_layers=2, n_heads=4)).eval()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected = model(ids)
        cache = KVCache(model.config, 2, 11, "cpu", torch.float32)
        steps = [model(ids[:, :5], cache)] + [model(ids[:, t : t + 1], cache) for t in range(5, 11)]
    assert_close_rel(torch.cat(steps, dim=1), expected, FLOAT32_ACCUMULATION)
    assert cache.nbytes() == 2 * 2 * 2 * 11 * 32 * 4  # layers x (k, v) x batch x tokens x width x float32


def test_transformer_static_decoder_matches_full_forward():
    """The compiled counterpart's step (whole cache read under a mask, position a tensor)."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dim=32, n_layers=2, n_heads=4)).eval()
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        expected = model(ids)
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        model(ids[:, :5], cache)
        decoder, position = StaticDecoder(model, cache), torch.tensor([5])
        steps = []
        for t in range(5, 11):
            steps.append(decoder(ids[:, t : t + 1], position))
            position += 1
    assert_close_rel(torch.stack(steps, dim=1), expected[:, 5:], FLOAT32_ACCUMULATION)


def test_quality_smoke_rows_in_parallel_then_report(tmp_path):
    rows = tmp_path / "rows"
    runs = [
        run_quality("run", "--smoke", "--arch", arch, "--seed", "3", "--out", str(rows), "--window", "8")
        for arch in ("mmrec", "transformer")
    ]
    for process in runs:
        finished(process)
    row = json.loads((rows / "mmrec+window=8-seed3.json").read_text())
    assert 0 < row["val_bpb"] < 9 and row["tokens"] == 6 * 2 * 128 and row["parameters"] > 0
    assert row["model_config"]["window"] == 8 and row["settings"]["window"] == 8
    assert [b["band"] for b in row["long_context"]["bands"]] == ["0-64", "64-256", "256-1K"]
    assert row["curve"]["step"] == [2, 4, 6] and row["torch"] == torch.__version__
    assert [d["distance"] for d in row["recall"]["distances"]] == [64, 512] and row["recall"]["documents"] == 2
    assert row["recall"]["offsets"] == [32, 1025 - 512 - 32]
    assert all(0 < d["copy_bpb"] < 9 for d in row["recall"]["distances"]) and 0 < row["recall"]["first_bpb"] < 9
    keys = row["passkey"]
    assert keys["trials"] == 2 and [c["context"] for c in keys["contexts"]] == [512, 1024]
    assert all(0 <= c["accuracy"] <= c["digit_accuracy"] <= 1 and len(c["digits_right"]) == 2 for c in keys["contexts"])
    stem = tmp_path / "report" / "quality"
    table = finished(run_quality("report", str(rows), "--out", str(stem)))
    assert "| mmrec+window=8 | 1 |" in table and "| transformer | 1 |" in table and "256-1K" in table
    assert "| arch | first | D = 64 | D = 512 |" in table
    assert "| arch | C = 512 | C = 1K |" in table and "| transformer | 0% (" in table
    assert stem.with_suffix(".md").read_text() == table
    report = json.loads(stem.with_suffix(".json").read_text())
    assert {r["arch"] for r in report["rows"]} == {"mmrec", "transformer"}
    assert report["summary"]["archs"]["mmrec+window=8"]["val_bpb"]["mean"] == row["val_bpb"]
    assert stem.with_suffix(".png").read_bytes().startswith(b"\x89PNG")


def test_quality_row_stopped_and_continued_is_the_row_of_one_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    row = ("run", "--smoke", "--arch", "mmrec", "--seed", "1")
    finished(run_quality(*row, "--out", str(whole)))
    stopped = finished(run_quality(*row, "--out", str(parts), "--checkpoint-every", "2", "--stop-at", "4"))
    checkpoint = parts / "mmrec-seed1.ckpt.pt"
    assert "stopped at step 4" in stopped and checkpoint.exists() and not list(parts.glob("*.json"))
    finished(run_quality(*row, "--out", str(parts), "--checkpoint-every", "2"))
    one, continued = (json.loads((folder / "mmrec-seed1.json").read_text()) for folder in (whole, parts))
    assert continued["curve"] == one["curve"] and continued["val_bpb"] == one["val_bpb"]
    assert continued["long_context"] == one["long_context"] and continued["recall"] == one["recall"]
    assert continued["tokens_per_s"] > 0 and not checkpoint.exists()


def test_quality_refuses_the_checkpoint_of_another_row(tmp_path):
    row = ("run", "--smoke", "--arch", "transformer", "--seed", "0", "--out", str(tmp_path), "--stop-at", "2")
    finished(run_quality(*row))
    process = run_quality(*row, "--lr", "0.01")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert stderr.strip().splitlines()[-1].startswith("bench.quality run: error: ") and "differs in lr" in stderr
    process = run_quality(*row[:-2], "--stop-at", "6")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1 and "--stop-at: expected" in stderr.strip().splitlines()[-1]


def run_seed0_rows(folder, rows) -> list[str]:
    """bench.quality --smoke rows (arch, options), seed 0, side by side into folder: the names of
    the row files there, sorted."""
    runs = [
        run_quality("run", "--smoke", "--arch", arch, "--seed", "0", "--out", str(folder), *options)
        for arch, options in rows
    ]
    for process in runs:
        finished(process)
    return sorted(path.name for path in folder.glob("*.json"))


def ablation_deltas(folder) -> tuple[dict, dict]:
    """The folder's report's validation deltas {(ablation, full): mean}, and each label's
    validation bits/byte from its seed-0 row file."""
    report = json.loads((folder / "report.json").read_text())
    val = {
        path.name.removesuffix("-seed0.json"): json.loads(path.read_text())["val_bpb"]
        for path in folder.glob("*-seed0.json")
    }
    return {(a["arch"], a["full"]): a["val_delta"]["mean"] for a in report["summary"]["ablations"]}, val


def test_past_first_band_weighs_each_band_by_its_positions():
    bands = [
        {"band": "0-64", "start": 0, "end": 64, "bpb": 9.0},
        {"band": "64-256", "start": 64, "end": 256, "bpb": 2.0},
        {"band": "256-1K", "start": 256, "end": 1024, "bpb": 1.0},
    ]
    row = {"long_context": {"bands": bands}}
    assert past_first_band_label(row) == "64-1K"
    assert past_first_band_bpb(row) == pytest.approx((192 * 2.0 + 768 * 1.0) / 960)
    nothing = {"long_context": {"bands": []}}
    assert past_first_band_bpb(nothing) is None and past_first_band_label(nothing) is None


def test_recorded_rows_of_carried_chunks_keep_their_label():
    row = {"arch": "mmrec", "settings": {"carry_chunks": 2, "config": {}, "window": None}}
    assert row_label(row) == "mmrec+carry2"
    assert row_label({**row, "settings": {}}) == "mmrec"


def report_deltas(folder, name: str) -> dict:
    """The folder's report's deltas `name` ('past_delta', 'first_delta') {(ablation, full): mean}."""
    report = json.loads((folder / "report.json").read_text())
    return {(a["arch"], a["full"]): a[name]["mean"] for a in report["summary"]["ablations"]}


SLOTS, WINDOW, FINAL = (
    ("--config", "persistent_slots=8"),
    ("--window", "8"),
    ("--final-steps", "2", "--final-seq-len", "256"),
)

# A study: rows (arch, options) of seed 0 in one folder; the row files expected; lines of the
# report's table; the settings and model configuration of one row; the (ablation, full) pairs.
REPORT_STUDIES = [
    pytest.param(
        [(arch, options) for arch in ("mmrec", "mmrec-no-longterm") for options in ((), SLOTS)],
        [
            "mmrec+persistent_slots=8-seed0.json",
            "mmrec-no-longterm+persistent_slots=8-seed0.json",
            "mmrec-no-longterm-seed0.json",
            "mmrec-seed0.json",
        ],
        ["| mmrec+persistent_slots=8 | 1 |"],
        ("mmrec+persistent_slots=8", {"config": {"persistent_slots": 8}}, {"persistent_slots": 8}),
        [
            ("mmrec-no-longterm", "mmrec"),
            ("mmrec-no-longterm+persistent_slots=8", "mmrec+persistent_slots=8"),
        ],
        id="configurations",
    ),
    pytest.param(
        [("mmrec", ()), ("mmrec", WINDOW), ("mmrec-no-longterm", WINDOW), ("transformer", WINDOW)],
        [
            "mmrec+window=8-seed0.json",
            "mmrec-no-longterm+window=8-seed0.json",
            "mmrec-seed0.json",
            "transformer-seed0.json",
        ],
        ["| mmrec+window=8 | 1 |", "| mmrec | 1 |", "(64-1K)", "Δ first occurrence", "% (1K) |"],
        ("mmrec+window=8", {"window": 8}, {"window": 8}),
        [("mmrec-no-longterm+window=8", "mmrec+window=8")],
        id="windows",
    ),
    pytest.param(
        [("mmrec", ()), ("mmrec", FINAL), ("mmrec-no-longterm", FINAL)],
        ["mmrec+final256x2-seed0.json", "mmrec-no-longterm+final256x2-seed0.json", "mmrec-seed0.json"],
        ["| mmrec+final256x2 | 1 |", "Rows labelled +finalLxN"],
        ("mmrec+final256x2", {"final_steps": 2}, {}),
        [("mmrec-no-longterm+final256x2", "mmrec+final256x2")],
        id="final_phase",
    ),
]


@pytest.mark.parametrize("rows, files, lines, row_settings, pairs", REPORT_STUDIES)
def test_quality_report_keeps_studies_apart_and_pairs_each_ablation_with_its_own(
    tmp_path, rows, files, lines, row_settings, pairs
):
    assert run_seed0_rows(tmp_path, rows) == files
    label, settings, model = row_settings
    row = json.loads((tmp_path / f"{label}-seed0.json").read_text())
    assert {name: row["settings"][name] for name in settings} == settings
    assert {name: row["model_config"][name] for name in model} == model and row["tokens"] == 6 * 2 * 128
    table = finished(run_quality("report", str(tmp_path)))
    assert all(line in table for line in lines) and "differ in settings" not in table
    deltas, val = ablation_deltas(tmp_path)
    assert deltas == {(a, f): pytest.approx(val[a] - val[f]) for a, f in pairs}
    labelled = {label: json.loads((tmp_path / f"{label}-seed0.json").read_text()) for pair in pairs for label in pair}
    past = {label: past_first_band_bpb(r) for label, r in labelled.items()}
    assert report_deltas(tmp_path, "past_delta") == {(a, f): pytest.approx(past[a] - past[f]) for a, f in pairs}
    first = {label: r["recall"]["first_bpb"] for label, r in labelled.items()}
    assert report_deltas(tmp_path, "first_delta") == {(a, f): pytest.approx(first[a] - first[f]) for a, f in pairs}
    keyed = {label: r["passkey"]["contexts"][-1]["accuracy"] for label, r in labelled.items()}
    report = json.loads((tmp_path / "report.json").read_text())
    passkeys = {(a["arch"], a["full"]): a["passkey"] for a in report["summary"]["ablations"]}
    assert {pair: (p["context"], p["full"]["mean"], p["ablation"]["mean"]) for pair, p in passkeys.items()} == {
        (a, f): (1024, keyed[f], keyed[a]) for a, f in pairs
    }


def training_calls(arch: str, settings: Settings, corpus: Corpus, monkeypatch) -> list[tuple]:
    """(inputs, targets) of every step of bench.quality's train()."""
    calls = []

    def spy(model, inputs, targets, *rest):
        calls.append((inputs, targets))
        return train_step(model, inputs, targets, *rest)

    monkeypatch.setattr("mmrec_model.training.loop.train_step", spy)
    train(build_model(model_config(arch, settings), 0, torch.device("cpu")), corpus, settings, 0, None)
    return calls


def test_quality_training_feeds_every_arch_the_same_windows(monkeypatch):
    settings = dataclasses.replace(SMOKE, steps=7, seq_len=16, log_every=7)
    stream = torch.randint(0, 256, (4000,), dtype=torch.uint8)
    corpus = Corpus(train=stream[:3000], val=stream[3000:], source="random bytes", sha256="")
    mmrec, transformer = (training_calls(arch, settings, corpus, monkeypatch) for arch in ("mmrec", "transformer"))
    assert len(mmrec) == len(transformer) == 7
    for (inputs, targets), (other_inputs, other_targets) in zip(mmrec, transformer):
        assert torch.equal(inputs, other_inputs) and torch.equal(targets, other_targets)


def test_quality_final_phase_trains_its_last_steps_on_long_windows_of_the_same_bytes(monkeypatch):
    settings = dataclasses.replace(
        SMOKE, steps=5, seq_len=16, batch_size=4, final_steps=2, final_seq_len=32, log_every=5
    )
    stream = torch.randint(0, 256, (4000,), dtype=torch.uint8)
    corpus = Corpus(train=stream[:3000], val=stream[3000:], source="random bytes", sha256="")
    calls = training_calls("mmrec", settings, corpus, monkeypatch)
    assert [tuple(inputs.shape) for inputs, _ in calls] == [(4, 16)] * 3 + [(2, 32)] * 2
    for inputs, targets in calls:  # each window is consecutive bytes of the corpus, targets one ahead
        assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize(
    "options, expected",
    [
        (("--final-steps", "7", "--final-seq-len", "256"), "--final-steps: expected 0 to --steps (6), got 7"),
        (("--final-steps", "2"), "--final-seq-len: expected a divisor of --batch-size x --seq-len (256)"),
        (("--final-steps", "2", "--final-seq-len", "100"), "--final-seq-len: expected a divisor"),
    ],
)
def test_quality_refuses_a_final_phase_it_cannot_train(tmp_path, options, expected):
    process = run_quality("run", "--smoke", "--arch", "mmrec", "--seed", "0", "--out", str(tmp_path), *options)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1 and expected in stderr.strip().splitlines()[-1]


def test_windowed_transformer_sees_the_last_window_tokens_only():
    torch.manual_seed(0)
    full = Transformer(TransformerConfig(dim=32, n_layers=2, n_heads=4)).eval()
    windowed = Transformer(TransformerConfig(dim=32, n_layers=2, n_heads=4, window=3)).eval()
    wide = Transformer(TransformerConfig(dim=32, n_layers=2, n_heads=4, window=256)).eval()
    windowed.load_state_dict(full.state_dict())
    wide.load_state_dict(full.state_dict())
    ids = torch.randint(0, 256, (2, 256))  # a multiple of the window function's query blocks, as in training
    changed = ids.clone()
    changed[:, 0] = (ids[:, 0] + 1) % 256
    with torch.no_grad():
        assert_close_rel(wide(ids), full(ids), FLOAT32_ACCUMULATION)  # a window as long as the input: all of it
        # Two layers of a 3-token window reach 2 * (3 - 1) = 4 tokens back: token 0 reaches positions 0-4 only.
        difference = (windowed(changed) - windowed(ids)).abs().amax(dim=(0, 2))
    assert (difference[:5] > 0).all() and (difference[5:] == 0).all()


def test_train_breakdown_smoke(tmp_path):
    out = tmp_path / "breakdown"
    args = ["--smoke", "--device", "cpu", "--variants", "transformer", "mmrec", "--profile", "mmrec", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "bench.train_breakdown", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["variant"] for r in rows] == ["transformer", "mmrec"] and all(r["step_ms"] > 0 for r in rows)
    assert rows[0]["kernels"] == [] and any(k["name"].startswith("mmrec::") for k in rows[1]["kernels"])
    assert "| mmrec |" in out.with_suffix(".md").read_text()


def test_read_bench_smoke(tmp_path):
    out = tmp_path / "read"
    result = subprocess.run(
        [sys.executable, "-m", "bench.read", "--smoke", "--device", "cpu", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["read"] for r in rows] == ["causal-sdpa", "memory_read op", "blocked-sdpa eager", "blocked-sdpa compiled"]
    assert all(r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 for r in rows)


def test_read_bench_picks_reads(tmp_path):
    out = tmp_path / "read"
    args = ["--smoke", "--device", "cpu", "--reads", "memory_read", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "bench.read", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["read"] for r in json.loads(out.with_suffix(".json").read_text())["results"]] == ["memory_read op"]


def test_quality_refuses_probe_beyond_long_windows(tmp_path):
    process = run_quality(
        "run", "--smoke", "--arch", "mmrec", "--seed", "0", "--out", str(tmp_path), "--probe-distances", "64", "1000"
    )
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1 and stderr.strip().splitlines()[-1].startswith(
        "bench.quality run: error: --probe-distances"
    )
    assert not list(tmp_path.iterdir())


def test_recall_sequence_copies_the_passage_distance_bytes_later():
    window = torch.randint(0, 256, (1025,))
    sequence = recall_sequence(window, offset=40, distance=100, passage_len=32)
    assert sequence.shape == (40 + 100 + 32,)
    assert torch.equal(sequence[:140], window[:140]) and torch.equal(sequence[140:], window[40:72])


def test_probe_offsets_spread_the_passages_and_leave_room_for_the_farthest_copy():
    settings = Settings(long_len=1024, probe_len=32, probe_distances=(64, 512), probe_passages=4)
    offsets = probe_offsets(settings)
    assert offsets[0] == 32 and len(set(offsets)) == 4 and offsets == sorted(offsets)
    assert offsets[-1] + 512 + 32 == 1024 + 1  # the last copy ends at the window's last byte
    assert probe_offsets(dataclasses.replace(settings, probe_passages=1)) == [32]


def test_quality_config_reaches_every_mmrec_arch_and_the_ablation_keeps_its_field():
    settings = Settings(preset="tiny", config={"persistent_slots": 8, "top_k": 2})
    assert model_config("mmrec", settings).top_k == 2
    ablation = model_config("mmrec-no-longterm", settings)
    assert ablation.top_k == 0 and ablation.persistent_slots == 8
    assert model_config("transformer", settings).window is None


def test_generate_bench_smoke(tmp_path):
    out = tmp_path / "generate"
    result = subprocess.run(
        [sys.executable, "-m", "bench.generate", "--device", "cpu", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    assert {r["path"] for r in rows} == {"mmrec-decoder", "mmrec-step", "transformer-kv"} and len(rows) == 12
    assert all(r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 for r in rows)
