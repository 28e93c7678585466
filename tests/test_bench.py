"""The GPU model benchmark runs end to end on tiny shapes on the CPU (--smoke), so the
script cannot rot between GPU sessions; and its Transformer baseline's KV-cache decoding
gives the logits of a full forward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.transformer import KVCache, Transformer, TransformerConfig
from tests.helpers import FLOAT32_ACCUMULATION, assert_close_rel

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parent.parent


def test_model_gpu_smoke(tmp_path):
    out = tmp_path / "model"
    args = ["--smoke", "--device", "cpu", "--seq-lens", "128", "--contexts", "64", "--out", str(out)]
    result = subprocess.run([sys.executable, "bench/model_gpu.py", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    archs = {"transformer", "mmrec-parallel", "mmrec-exact"}
    assert {r["arch"] for r in results["train"]} == archs
    assert all(r["tokens_per_s"] > 0 for r in results["train"])
    # MM-Rec's state has the same size whatever the context; it is what generation reads.
    assert all(r["ms_per_token"] > 0 and r["state_bytes"] > 0 for r in results["generate"])
    assert all(0 < r["val_bpb"] < 9 for r in results["quality"])
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| mmrec-parallel |" in out.with_suffix(".md").read_text()


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
