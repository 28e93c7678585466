"""Benchmark of torch.ops.mmrec.scan against the memory floor and baselines, side by side.

    python -m bench.scan                       # CPU, [4, 4096, 8, 64] float32
    python -m bench.scan --device cuda         # CUDA, [8, 4096, 16, 64] bfloat16 and float32

Rows: the memory floor (a device copy moving the same bytes the scan must
read and write), mmrec.scan in [B, T, H, d] and as a transposed [B, H, T, d]
view, called eagerly through autograd as a user's model calls it, scan and
scan_backward called directly as ops (the same kernels without the autograd
engine, whose host time can exceed theirs), the cumulative-product mode
against torch.cumprod, a Python loop over time, and on CUDA PyTorch's
compiled associative_scan and, when installed (pip install accelerated-scan;
never a dependency), accelerated-scan and flash-linear-attention's HGRN chunk
kernel, through autograd too (each in its own layout, same element count), and
accelerated-scan as a caller with [B, T, D] tensors uses it (inputs transposed).
Forward and forward+backward; median times. Below the table, forward+backward
through autograd against the ops called directly, sampled in turn (the CPU
goal: within 1.1x). On CUDA each timing comes twice: eager (back-to-back
calls; where the host is slower than the kernels, as it can be through
autograd, its time is what shows) and replayed from a CUDA graph of the same
calls (device time alone, as under torch.compile's CUDA graphs).
Prints a Markdown table and writes it, with the raw numbers, device and
versions, to --out (.md and .json).

On CPU, glibc returns freed blocks over 32 MB to the OS, so every op that
allocates a fresh output of this size pays page faults on it (about 8 ms per
33 MB tensor here: more than the scan itself). By default the benchmark makes
glibc keep freed memory (mallopt), as the allocators PyTorch's CPU tuning
guide recommends (jemalloc, tcmalloc) do; every row runs under the same
setting. --glibc-default measures without it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import mmrec_ops
from bench.common import (
    forward_backward,
    graph_time_ms,
    keep_freed_memory,
    markdown_table,
    median_time_ms,
    paired_median_times_ms,
    versions,
    write_results,
)
from mmrec_ops.reference import scan_reference


def copy_floor(numel: int, dtype, device):
    """A device copy that reads and writes `numel` elements in all: the bytes floor."""
    src = torch.randn(numel // 2, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def ops_without_autograd(gamma, x):
    """scan then scan_backward, called as ops on inputs that need no gradient:
    the same kernels as forward+backward without the autograd engine, whose
    host time (a hand-off to its device thread and back) can exceed theirs."""
    grad_h = torch.randn_like(gamma)

    def run():
        h = torch.ops.mmrec.scan.default(gamma, x, None, False)
        torch.ops.mmrec.scan_backward.default(grad_h, gamma, h, None, True, False)

    return run


def autograd_against_direct(B, T, H, d, dtype, device, repeats) -> dict:
    """Forward+backward of scan eagerly through autograd and as the two ops
    called directly, sampled in turn: median ms of each and their ratio."""
    gamma = torch.rand(B, T, H, d, dtype=dtype, device=device)
    x = torch.randn(B, T, H, d, dtype=dtype, device=device)
    times = paired_median_times_ms(
        {"autograd_ms": forward_backward(mmrec_ops.scan, (gamma, x)), "direct_ms": ops_without_autograd(gamma, x)},
        device,
        3,
        repeats,
    )
    return {**times, "ratio": times["autograd_ms"] / times["direct_ms"]}


def contenders(B, T, H, d, dtype, device):
    """(name, forward callable, forward+backward callable or None, note)."""
    n = B * T * H * d
    gamma = torch.rand(B, T, H, d, dtype=dtype, device=device)
    x = torch.randn(B, T, H, d, dtype=dtype, device=device)
    gamma_bhtd = torch.rand(B, H, T, d, dtype=dtype, device=device).transpose(1, 2)
    x_bhtd = torch.randn(B, H, T, d, dtype=dtype, device=device).transpose(1, 2)
    rows = [
        # forward: read gamma, x, write h = 3n; backward: read grad, gamma, h, write dgamma, dx = 5n
        (
            "memory floor (copy of the same bytes)",
            copy_floor(3 * n, dtype, device),
            copy_floor(8 * n, dtype, device),
            "3 tensors fwd, 8 fwd+bwd",
        ),
        (
            "mmrec.scan [B,T,H,d], eager through autograd",
            lambda: mmrec_ops.scan(gamma, x),
            forward_backward(mmrec_ops.scan, (gamma, x)),
            "",
        ),
        (
            "mmrec.scan [B,H,T,d] as transposed view, through autograd",
            lambda: mmrec_ops.scan(gamma_bhtd, x_bhtd),
            forward_backward(mmrec_ops.scan, (gamma_bhtd, x_bhtd)),
            "",
        ),
        (
            "mmrec ops called directly, no autograd",
            lambda: mmrec_ops.scan(gamma, x),
            ops_without_autograd(gamma, x),
            "scan then scan_backward",
        ),
        (
            "mmrec.cumprod (x omitted)",
            lambda: mmrec_ops.cumprod(gamma),
            forward_backward(mmrec_ops.cumprod, (gamma,)),
            "",
        ),
        (
            "torch.cumprod (x omitted)",
            lambda: torch.cumprod(gamma, 1),
            forward_backward(lambda g: torch.cumprod(g, 1), (gamma,)),
            "",
        ),
        ("Python loop over t", lambda: scan_reference(gamma, x), None, "forward only"),
    ]
    if device == "cuda":
        rows += cuda_peers(B, T, H, d, dtype, device)
    return rows


def cuda_peers(B, T, H, d, dtype, device):
    rows = []
    from torch._higher_order_ops.associative_scan import associative_scan

    def combine(left, right):
        (a1, b1), (a2, b2) = left, right
        return a1 * a2, a2 * b1 + b2

    compiled_assoc = torch.compile(lambda g, u: associative_scan(combine, (g, u), dim=1, combine_mode="pointwise")[1])
    gamma = torch.rand(B, T, H * d, dtype=dtype, device=device)
    x = torch.randn(B, T, H * d, dtype=dtype, device=device)
    rows.append(("torch associative_scan, compiled", lambda: compiled_assoc(gamma, x), None, "[B,T,D]"))
    try:
        from accelerated_scan.scalar import scan as accelerated_scan
    except ImportError:
        rows.append(("accelerated-scan (Triton), through autograd", None, None, "not installed"))
    else:
        g_bdt = torch.rand(B, H * d, T, dtype=dtype, device=device)
        x_bdt = torch.randn(B, H * d, T, dtype=dtype, device=device)
        rows.append(
            (
                "accelerated-scan (Triton), through autograd",
                lambda: accelerated_scan(g_bdt, x_bdt),
                forward_backward(accelerated_scan, (g_bdt, x_bdt)),
                "[B,D,T]",
            )
        )

        def from_btd(g, u):
            # A [B, T, D] caller's price: its inputs transposed to [B, D, T], the output left a view.
            return accelerated_scan(g.transpose(1, 2).contiguous(), u.transpose(1, 2).contiguous()).transpose(1, 2)

        rows.append(
            (
                "accelerated-scan from [B,T,D], through autograd",
                lambda: from_btd(gamma, x),
                forward_backward(from_btd, (gamma, x)),
                "inputs transposed, output a view",
            )
        )
    try:
        from fla.ops.hgrn import chunk_hgrn
    except ImportError:
        rows.append(("fla HGRN chunk", None, None, "not installed"))
    else:
        log_g = torch.rand(B, T, H * d, dtype=dtype, device=device).log()

        def hgrn(u, g):
            return chunk_hgrn(u, g)[0]

        rows.append(
            ("fla HGRN chunk", lambda: hgrn(x, log_g), forward_backward(hgrn, (x, log_g)), "[B,T,D], log gates")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", type=int, nargs=4, metavar=("B", "T", "H", "d"), help="default: per device")
    parser.add_argument("--dtypes", nargs="+", help="default: float32 on CPU, bfloat16 float32 on CUDA")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--skip-slow", action="store_true", help="skip the Python loop")
    parser.add_argument("--glibc-default", action="store_true", help="keep glibc's default of unmapping large frees")
    parser.add_argument("--out", type=Path, default=None, help="output stem (writes .json and .md)")
    args = parser.parse_args()

    device = args.device
    if device == "cpu" and not args.glibc_default:
        keep_freed_memory()
    shape = args.shape or ([4, 4096, 8, 64] if device == "cpu" else [8, 4096, 16, 64])
    dtypes = args.dtypes or (["float32"] if device == "cpu" else ["bfloat16", "float32"])
    repeats = args.repeats or 20
    info = versions(device)
    info.update(
        shape=shape, allocator="glibc default" if args.glibc_default or device == "cuda" else "freed memory kept"
    )

    results = []
    info["autograd_over_direct"] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        pair = autograd_against_direct(*shape, dtype, device, 2 * repeats)
        info["autograd_over_direct"].append({"dtype": dtype_name, **pair})
        print(f"{dtype_name:9} forward+backward through autograd / ops called directly: {pair}", file=sys.stderr)
        for name, fwd, fwdbwd, note in contenders(*shape, dtype, device):
            row = {
                "dtype": dtype_name,
                "name": name,
                "note": note,
                "fwd_ms": None,
                "fwdbwd_ms": None,
                "fwd_graph_ms": None,
                "fwdbwd_graph_ms": None,
            }
            slow = name.startswith("Python loop")
            if fwd is not None and not (slow and args.skip_slow):
                reps = 3 if slow else repeats
                row["fwd_ms"] = median_time_ms(fwd, device, 1 if slow else 3, reps)
                if fwdbwd is not None:
                    row["fwdbwd_ms"] = median_time_ms(fwdbwd, device, 1 if slow else 3, reps)
                if device == "cuda" and not slow:
                    row["fwd_graph_ms"] = graph_time_ms(fwd, reps)
                    if fwdbwd is not None:
                        row["fwdbwd_graph_ms"] = graph_time_ms(fwdbwd, reps)
            results.append(row)
            print(
                f"{dtype_name:9} {name:42} fwd {row['fwd_ms']}  fwd+bwd {row['fwdbwd_ms']}  "
                f"CUDA graph {row['fwd_graph_ms']} / {row['fwdbwd_graph_ms']}",
                file=sys.stderr,
            )

    write_results(args.out, info, results, render(results, info, device))


def render(results, info, device) -> str:
    unit, scale = ("us", 1e3) if device == "cuda" else ("ms", 1.0)
    lines = [
        f"scan benchmark: [B, T, H, d] = {info['shape']} on {info['device']}; torch {info['torch']}"
        + (f", Triton {info['triton']}" if "triton" in info else "")
        + f"; {info['date']}; allocator: {info['allocator']}",
        "",
    ]
    floors = {r["dtype"]: r["fwd_ms"] for r in results if r["name"].startswith("memory floor")}

    def fmt(ms):
        return "-" if ms is None else f"{ms * scale:.1f}" if ms * scale < 100 else f"{ms * scale:.0f}"

    def ratio(r, key):
        floor = floors.get(r["dtype"])
        return f"{r[key] / floor:.2f}x" if r[key] and floor else "-"

    header = ["dtype", "", f"fwd ({unit})", f"fwd+bwd ({unit})", "fwd / floor", "fwd+bwd / fwd floor", "note"]
    rows = [
        [
            r["dtype"],
            r["name"],
            fmt(r["fwd_ms"]),
            fmt(r["fwdbwd_ms"]),
            ratio(r, "fwd_ms"),
            ratio(r, "fwdbwd_ms"),
            r["note"],
        ]
        for r in results
    ]
    if device == "cuda":  # device time alone, next to the eager figures
        header[4:4] = [f"fwd, CUDA graph ({unit})", f"fwd+bwd, CUDA graph ({unit})"]
        for row, r in zip(rows, results):
            row[4:4] = [fmt(r["fwd_graph_ms"]), fmt(r["fwdbwd_graph_ms"])]
    pairs = [
        f"{p['dtype']} {fmt(p['autograd_ms'])} / {fmt(p['direct_ms'])} {unit} = {p['ratio']:.3f}x"
        for p in info["autograd_over_direct"]
    ]
    footer = [
        "",
        "Forward+backward eagerly through autograd / scan and scan_backward called directly, "
        "sampled in turn: " + "; ".join(pairs),
    ]
    return "\n".join(lines + markdown_table(header, rows) + footer)


if __name__ == "__main__":
    main()
