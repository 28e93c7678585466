"""The multi-memory read alone, forward and forward+backward, by kernel, beside the
Transformer's causal attention over the same tokens.

    python -m bench.read --out bench/results/read_cuda_h100          # CUDA: bf16
    python -m bench.read --device cpu --seq-lens 2048 --tokens 8192  # CPU: float32
    python -m bench.read --smoke --device cpu                        # tiny shapes, checks the script

For each --seq-lens T, --tokens tokens in sequences of T (batch = tokens / T), the read of
one MMRecBlock of the --preset as its forward computes it in a chunk with no state (the
layout from ``memory_layout``, random queries, long-term groups and window tokens):

  causal-sdpa          the Transformer's read of the same tokens: SDPA with is_causal, [B, H, T, d]
  memory_read          ``op_blocked_attention``: mmrec::memory_read, each query tile over its
                       group and its window in place in one pass (the model's default)
  blocked-sdpa         ``sdpa_blocked_attention``: each block of queries over a copy of its
                       keys, masked (eager, and compiled)

Times are medians (CUDA: 10 calls between two events per sample) of the forward, and of
the forward with the gradients of every input.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import apply_smoke, forward_backward, markdown_table, median_time_ms, versions, write_results
from mmrec_model import MMRecConfig
from mmrec_model.memory import memory_layout
from mmrec_model.model.read import op_blocked_attention, sdpa_blocked_attention, working_keys

READS = ("causal-sdpa", "memory_read", "blocked-sdpa")
SMOKE = dict(preset="tiny", seq_lens=[200], tokens=400, warmup=1, repeats=2)


def causal_read(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def read_inputs(config: MMRecConfig, batch: int, T: int, device, dtype):
    """q ``[B, T, H, d]``, groups ``[B, nb, G, 2, D]``, window tokens ``[B, W - 1 + T, 2, D]``,
    the read mask ``[nb, Q, G + Q + W - 1]`` and which tokens exist ``[W - 1 + T]``, for a
    sequence's first chunk."""
    layout = memory_layout(torch.zeros((), dtype=torch.int64, device=device), T, config)
    n_blocks, Q, n_keys = layout.read_mask.shape
    H, d, W = config.n_heads, config.head_dim, config.window
    n_group = n_keys - (Q + W - 1)
    q = torch.randn(batch, T, H, d, device=device, dtype=dtype)
    group = torch.randn(batch, n_blocks, n_group, 2, H * d, device=device, dtype=dtype)
    tokens = torch.randn(batch, W - 1 + T, 2, H * d, device=device, dtype=dtype)
    return q, group, tokens, layout.read_mask, layout.first_token


def variants(config: MMRecConfig, mask: torch.Tensor, first_token: torch.Tensor) -> dict:
    """name -> read of (q, group, tokens)."""
    n_blocks, Q, _ = mask.shape
    W = config.window

    def blocked(q, group, tokens):
        return sdpa_blocked_attention(q, group, working_keys(tokens, n_blocks, Q, W), mask)

    def memory_read(q, group, tokens):
        return op_blocked_attention(q, group, tokens, mask, W, first_token)

    return {
        "memory_read op": memory_read,
        "blocked-sdpa eager": blocked,
        "blocked-sdpa compiled": torch.compile(blocked, fullgraph=True),
    }


def rows_of(config: MMRecConfig, T: int, args, device, dtype) -> list[dict]:
    batch = max(args.tokens // T, 1)
    H, d = config.n_heads, config.head_dim
    base = {"T": T, "batch": batch}
    q, group, tokens, mask, first_token = read_inputs(config, batch, T, device, dtype)
    qkv = [torch.randn(batch, H, T, d, device=device, dtype=dtype) for _ in range(3)]
    reads = {"causal-sdpa": (causal_read, qkv)}
    reads.update({name: (fn, (q, group, tokens)) for name, fn in variants(config, mask, first_token).items()})
    if args.reads:
        reads = {name: read for name, read in reads.items() if name.split()[0] in args.reads}
    rows = []
    for name, (fn, inputs) in reads.items():
        torch._dynamo.reset()
        with torch.no_grad():
            forward_ms = median_time_ms(functools.partial(fn, *inputs), device.type, args.warmup, args.repeats)
        both_ms = median_time_ms(forward_backward(fn, inputs), device.type, args.warmup, args.repeats)
        rows.append({**base, "read": name, "forward_ms": forward_ms, "forward_backward_ms": both_ms})
        print(rows[-1], flush=True)
    return rows


def render(rows: list[dict], info: dict, args, dtype) -> str:
    lines = [
        "# The multi-memory read by kernel, beside causal attention",
        "",
        f"`bench/read.py`; {info['device']}; torch {info['torch']}; Triton {info.get('triton', '-')}; {info['date']}. "
        f"Preset {args.preset}, one block's read, {dtype}; {args.tokens} tokens in sequences of T.",
        "",
    ]
    causal = {r["T"]: r for r in rows if r["read"] == "causal-sdpa"}

    def fmt(value):
        return f"{value:.3f}"

    def ratio(row, key):
        baseline = causal.get(row["T"])  # absent when --reads leaves causal-sdpa out
        return f"{row[key] / baseline[key]:.2f}x" if baseline else "-"

    lines += markdown_table(
        ["T", "batch", "read", "forward ms", "x causal", "forward+backward ms", "x causal"],
        [
            [
                str(r["T"]),
                str(r["batch"]),
                r["read"],
                fmt(r["forward_ms"]),
                ratio(r, "forward_ms"),
                fmt(r["forward_backward_ms"]),
                ratio(r, "forward_backward_ms"),
            ]
            for r in rows
        ],
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per call (batch = tokens / T)")
    parser.add_argument("--reads", nargs="+", default=None, choices=READS, help="only these reads (default: all)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="output stem (.md, .json)")
    args = parser.parse_args()
    apply_smoke(args, SMOKE)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = MMRecConfig.preset(args.preset)
    rows = [row for T in args.seq_lens for row in rows_of(config, T, args, device, dtype)]
    info = versions(device.type)
    write_results(args.out, info, rows, render(rows, info, args, dtype))


if __name__ == "__main__":
    main()
