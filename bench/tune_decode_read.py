"""Sweep of decode_read's Triton launch knobs on a GPU (a development tool).

    python -m bench.tune_decode_read --out bench/results/tune_decode_read_h100

At a `base` decoder's cache (q [B, 12, 64]; keys and values [B, 12, 1136, 64], views of
one [2, B, 12, 1136, 64] tensor; some slots masked), batch 1 and 16, float32: each
candidate (BLOCK_K slots per tile, PROGRAMS_PER_SM, NUM_WARPS of
mmrec_ops/triton/decode_read.py) is checked against the float64 reference and timed
from a CUDA graph. The chosen one goes into the module's constants by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import graph_time_ms, markdown_table, versions, write_results
from mmrec_ops.reference import decode_read_reference
from mmrec_ops.triton import decode_read as triton_read

HEADS, SLOTS, HEAD_DIM = 12, 1136, 64
# (BLOCK_K, PROGRAMS_PER_SM, NUM_WARPS); the first is the shipped setting.
CANDIDATES = [
    (64, 4, 2),
    (64, 4, 4),
    (32, 4, 2),
    (32, 4, 4),
    (128, 4, 2),
    (128, 4, 4),
    (64, 2, 2),
    (64, 8, 2),
    (32, 8, 4),
    (32, 16, 2),
]


def inputs(batch: int):
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda")
    keys, values = torch.randn(2, batch, HEADS, SLOTS, HEAD_DIM, device="cuda")
    mask = torch.zeros(SLOTS, device="cuda")
    mask[500:600] = float("-inf")
    return q, keys, values, mask


def measure(batch: int, candidate, repeats: int) -> dict:
    triton_read.BLOCK_K, triton_read.PROGRAMS_PER_SM, triton_read.NUM_WARPS = candidate
    triton_read._plans.cache_clear()
    args = inputs(batch)
    out = triton_read.decode_read(*args)
    ref = decode_read_reference(*(t.double() for t in args))
    error = ((out.double() - ref).norm() / ref.norm()).item()
    us = graph_time_ms(lambda: triton_read.decode_read(*args), repeats) * 1000
    return dict(
        batch=batch, block_k=candidate[0], programs_per_sm=candidate[1], num_warps=candidate[2], us=us, rel_error=error
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="output stem (.md, .json)")
    args = parser.parse_args()
    shipped = (triton_read.BLOCK_K, triton_read.PROGRAMS_PER_SM, triton_read.NUM_WARPS)
    results = [measure(batch, candidate, args.repeats) for batch in args.batches for candidate in CANDIDATES]
    triton_read.BLOCK_K, triton_read.PROGRAMS_PER_SM, triton_read.NUM_WARPS = shipped
    triton_read._plans.cache_clear()
    info = versions("cuda")
    rows = [
        [
            str(r["batch"]),
            str(r["block_k"]),
            str(r["programs_per_sm"]),
            str(r["num_warps"]),
            f"{r['us']:.2f}",
            f"{r['rel_error']:.1e}",
        ]
        for r in results
    ]
    header = (
        f"decode_read launch sweep; {info['device']}; torch {info['torch']}, Triton {info['triton']}; {info['date']}"
    )
    table = "\n".join(
        [header, "", *markdown_table(["batch", "BLOCK_K", "programs / SM", "warps", "us", "rel. error"], rows)]
    )
    write_results(args.out, info, results, table)


if __name__ == "__main__":
    main()
