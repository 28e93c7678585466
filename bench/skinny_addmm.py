"""mmrec::skinny_addmm against cuBLAS's addmm on a GPU, at a decoder's products.

    python -m bench.skinny_addmm --out bench/results/skinny_addmm_cuda_h100

The products of a `base` decoder's block (float32, bias + x W, W [K, N]): the input
projection 768 -> 3456, MDI's second layers 384 -> 1536, the output projection 768 -> 768,
the FFN 768 -> 3072 and 3072 -> 768, at 1 to 32 rows. A decoder's weights do not stay in
L2 from one token to the next (a `base` model holds 340 MB of them), so each timing
cycles through enough copies of the weight to spill L2, and is the time per product
from a CUDA graph. Beside them, the memory's floor: a read of the weight's bytes
(torch.sum over it). Each output is checked against the float64 product.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import mmrec_ops
from bench.common import graph_time_ms, markdown_table, versions, write_results

# (name, K, N) of a base block's products.
PRODUCTS = [
    ("input projection", 768, 3456),
    ("MDI second layers", 384, 1536),
    ("output projection", 768, 768),
    ("FFN in", 768, 3072),
    ("FFN out", 3072, 768),
]
SPILL_BYTES = 128 * 2**20  # more than an H100's (50 MB) or H200's L2


def time_per_product(fn, weights, repeats: int) -> float:
    """us per call of fn(weight), cycling through the weights inside one graph."""
    return graph_time_ms(lambda: [fn(w) for w in weights], repeats) * 1000 / len(weights)


def measure(name: str, rows: int, K: int, N: int, repeats: int) -> dict:
    copies = max(2, SPILL_BYTES // (K * N * 4))
    weights = [torch.randn(K, N, device="cuda") / K**0.5 for _ in range(copies)]
    x, bias = torch.randn(rows, K, device="cuda"), torch.randn(N, device="cuda")
    exact = torch.addmm(bias.double(), x.double(), weights[0].double())
    errors = {}
    for label, fn in (("skinny_addmm", mmrec_ops.skinny_addmm), ("addmm", torch.addmm)):
        out = fn(bias, x, weights[0]).double()
        errors[label] = ((out - exact).norm() / exact.norm()).item()
    return dict(
        product=name,
        rows=rows,
        K=K,
        N=N,
        weight_copies=copies,
        skinny_addmm_us=time_per_product(lambda w: mmrec_ops.skinny_addmm(bias, x, w), weights, repeats),
        addmm_us=time_per_product(lambda w: torch.addmm(bias, x, w), weights, repeats),
        read_floor_us=time_per_product(torch.sum, weights, repeats),
        skinny_addmm_rel_error=errors["skinny_addmm"],
        addmm_rel_error=errors["addmm"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="output stem (.md, .json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/skinny_addmm.py: needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as the decoder's
    results = []
    for name, K, N in PRODUCTS:
        for rows in args.rows:
            results.append(measure(name, rows, K, N, args.repeats))
            print(
                f"{name} {K} -> {N}, {rows} rows: skinny_addmm {results[-1]['skinny_addmm_us']:.2f} us, "
                f"addmm {results[-1]['addmm_us']:.2f} us",
                flush=True,
            )
    info = versions("cuda")
    table_rows = [
        [
            r["product"],
            f"{r['K']} -> {r['N']}",
            str(r["rows"]),
            f"{r['skinny_addmm_us']:.2f}",
            f"{r['addmm_us']:.2f}",
            f"{r['addmm_us'] / r['skinny_addmm_us']:.2f}x",
            f"{r['read_floor_us']:.2f}",
            f"{r['skinny_addmm_rel_error']:.1e}",
            f"{r['addmm_rel_error']:.1e}",
        ]
        for r in results
    ]
    header = (
        f"skinny_addmm against addmm, float32, weights out of L2; {info['device']}; torch {info['torch']}, "
        f"Triton {info['triton']}; {info['date']}"
    )
    table = "\n".join(
        [
            header,
            "",
            *markdown_table(
                [
                    "product",
                    "K -> N",
                    "rows",
                    "skinny_addmm (us)",
                    "addmm (us)",
                    "addmm / skinny",
                    "read of W (us)",
                    "skinny rel. error",
                    "addmm rel. error",
                ],
                table_rows,
            ),
        ]
    )
    write_results(args.out, info, results, table)


if __name__ == "__main__":
    main()
