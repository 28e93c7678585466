"""Benchmark of torch.ops.mmrec.recurrence against recurrent baselines, side by side.

    python -m bench.recurrence                       # CPU, float32 [B, T, H, d] = [4, 512, 8, 64]
    python -m bench.recurrence --device cuda         # CUDA, bfloat16 [16, 1024, 12, 64] and [8, 1024, 16, 64]

Rows, forward and forward+backward (gradients of every input), median times:
mmrec.recurrence through the op, eagerly through autograd as a user's model
calls it, in [B, T, H, d] and as a transposed [B, H, T, d] view;
recurrence and recurrence_backward called directly as ops (the same kernels
without the autograd engine); on CUDA the bare Triton launchers (no dispatch,
no autograd: forward, then the backward kernel); the PyTorch eager loop over
time that the original model ran (mmrec_ops.reference.recurrence_reference);
torch.nn.GRU with hidden size H*d (cuDNN on CUDA: a dense recurrence, 3 gates,
against our block-diagonal one); and, when installed, FlashRNN's fused Triton
LSTM (H heads of d, its published comparison shape) and accelerated-scan's
linear scan of the same [B, H*d, T] through autograd (no gate, no weight: a
floor for a recurrence of this size; pip install accelerated-scan, never a
dependency). Below the table, forward+backward through autograd against the
ops called directly, sampled in turn. Prints a Markdown table and writes it,
with the raw numbers, device and versions, to --out (.md and .json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import mmrec_ops
from bench.common import (
    forward_backward,
    keep_freed_memory,
    markdown_table,
    median_time_ms,
    paired_median_times_ms,
    versions,
    write_results,
)
from mmrec_ops.reference import recurrence_reference

CPU_SHAPES = [[4, 512, 8, 64]]
ACCELERATED_SCAN_BLOCK = 2048  # accelerated_scan.scalar's BLOCK (0.3.1)
CUDA_SHAPES = [[16, 1024, 12, 64], [8, 1024, 16, 64]]


def model_inputs(B, T, H, d, dtype, device, layout="BTHd"):
    """(z, gamma, weight, bias, h0) in the model's regime: z standard normal,
    gamma in (0, 1), W of scale 1/sqrt(d)."""

    def draw(shape, kind="normal"):
        values = torch.rand(shape, device=device) if kind == "gamma" else torch.randn(shape, device=device)
        return values.to(dtype)

    if layout == "BHTd":
        z = draw((B, H, T, d)).transpose(1, 2)
        gamma = draw((B, H, T, d), "gamma").transpose(1, 2)
    else:
        z, gamma = draw((B, T, H, d)), draw((B, T, H, d), "gamma")
    weight = (torch.randn(H, d, d, device=device) / d**0.5).to(dtype)
    return z, gamma, weight, draw((H, d)), draw((B, H, d))


def launchers_forward_backward(inputs):
    """Forward then backward through the bare Triton launchers, upstream gradient made once."""
    from mmrec_ops.triton import recurrence as triton_recurrence

    grad_h = torch.randn_like(triton_recurrence.recurrence_forward(*inputs))

    def run():
        h = triton_recurrence.recurrence_forward(*inputs)
        triton_recurrence.recurrence_backward(grad_h, *inputs, h)

    return run


def ops_without_autograd(inputs):
    """recurrence then recurrence_backward, called as ops on inputs that need no
    gradient: the kernels of forward+backward without the autograd engine."""
    grad_h = torch.randn_like(inputs[0])

    def run():
        h = torch.ops.mmrec.recurrence.default(*inputs)
        torch.ops.mmrec.recurrence_backward.default(grad_h, *inputs, h)

    return run


def autograd_against_direct(B, T, H, d, dtype, device, repeats) -> dict:
    """Forward+backward of recurrence eagerly through autograd and as the two
    ops called directly, sampled in turn: median ms of each and their ratio."""
    inputs = model_inputs(B, T, H, d, dtype, device)
    times = paired_median_times_ms(
        {"autograd_ms": forward_backward(mmrec_ops.recurrence, inputs), "direct_ms": ops_without_autograd(inputs)},
        device,
        3,
        repeats,
    )
    return {**times, "ratio": times["autograd_ms"] / times["direct_ms"]}


def gru_rows(B, T, H, d, dtype, device):
    gru = torch.nn.GRU(H * d, H * d, batch_first=True, device=device, dtype=dtype)
    x = torch.randn(B, T, H * d, device=device, dtype=dtype, requires_grad=True)
    leaves = [x, *gru.parameters()]
    grad_out = torch.randn(B, T, H * d, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return gru(x)[0]

    def fwdbwd():
        torch.autograd.grad(gru(x)[0], leaves, grad_out)

    engine = "cuDNN" if device == "cuda" else "ATen"
    return [(f"torch.nn.GRU, hidden {H * d} ({engine})", fwd, fwdbwd, "dense, 3 gates")]


def flashrnn_rows(B, T, H, d, dtype, device):
    name = "FlashRNN fused Triton LSTM"
    if device != "cuda":
        return []
    try:
        from flashrnn import flashrnn
    except ImportError:
        return [(name, None, None, "not installed")]
    # FlashRNN's layout: Wx [B, T, gates, heads, d], R [gates, heads, d, d], b [gates, heads, d].
    gates = 4
    wx = torch.randn(B, T, gates, H, d, device=device, dtype=dtype)
    r = (torch.randn(gates, H, d, d, device=device) / d**0.5).to(dtype)
    b = torch.randn(gates, H, d, device=device, dtype=dtype)
    dtype_name = str(dtype).removeprefix("torch.")

    def lstm(wx, r, b):
        return flashrnn(wx, r, b, function="lstm", backend="triton_fused", dtype=dtype_name)[0]

    return [(name, lambda: lstm(wx, r, b), forward_backward(lstm, (wx, r, b)), "LSTM, 4 gates")]


def accelerated_scan_rows(B, T, H, d, dtype, device):
    name = "accelerated-scan (Triton), linear, through autograd"
    if device != "cuda":
        return []
    try:
        from accelerated_scan.scalar import scan as accelerated_scan
    except ImportError:
        return [(name, None, None, "not installed")]
    gates = torch.rand(B, H * d, T, dtype=dtype, device=device)
    tokens = torch.randn(B, H * d, T, dtype=dtype, device=device)
    if T % ACCELERATED_SCAN_BLOCK:
        # Its backward loads states[t - 1] masked by t > 0 only, so for T not a multiple of its
        # block it reads up to a block past each sequence: past the tensor's end on the last
        # (an illegal address at float32 on an H100, 2026-11-26), which poisons the process.
        return [
            (
                name,
                lambda: accelerated_scan(gates, tokens),
                None,
                f"[B,H*d,T], no gate: a floor; backward not run (out of bounds for T % {ACCELERATED_SCAN_BLOCK} > 0)",
            )
        ]
    return [
        (
            name,
            lambda: accelerated_scan(gates, tokens),
            forward_backward(accelerated_scan, (gates, tokens)),
            "[B,H*d,T], no gate: a floor",
        )
    ]


def contenders(B, T, H, d, dtype, device):
    """(name, forward callable, forward+backward callable or None, note)."""
    inputs = model_inputs(B, T, H, d, dtype, device)
    inputs_bhtd = model_inputs(B, T, H, d, dtype, device, "BHTd")
    rows = [
        (
            "mmrec.recurrence (op) [B,T,H,d], eager through autograd",
            lambda: mmrec_ops.recurrence(*inputs),
            forward_backward(mmrec_ops.recurrence, inputs),
            "bias and h0 given",
        ),
        (
            "mmrec.recurrence (op) [B,H,T,d] as transposed view, through autograd",
            lambda: mmrec_ops.recurrence(*inputs_bhtd),
            forward_backward(mmrec_ops.recurrence, inputs_bhtd),
            "",
        ),
        (
            "mmrec ops called directly, no autograd",
            lambda: mmrec_ops.recurrence(*inputs),
            ops_without_autograd(inputs),
            "recurrence then recurrence_backward",
        ),
    ]
    if device == "cuda":
        from mmrec_ops.triton import recurrence as triton_recurrence

        rows.append(
            (
                "Triton launchers, bare",
                lambda: triton_recurrence.recurrence_forward(*inputs),
                launchers_forward_backward(inputs),
                "no dispatch, no autograd",
            )
        )
    rows.append(
        (
            "PyTorch eager loop over t",
            lambda: recurrence_reference(*inputs),
            forward_backward(recurrence_reference, inputs),
            "the original model's loop",
        )
    )
    rows += gru_rows(B, T, H, d, dtype, device)
    rows += flashrnn_rows(B, T, H, d, dtype, device)
    rows += accelerated_scan_rows(B, T, H, d, dtype, device)
    return rows


def render(results, info, device) -> str:
    unit, scale = ("us", 1e3) if device == "cuda" else ("ms", 1.0)
    lines = [
        f"recurrence benchmark on {info['device']}; torch {info['torch']}"
        + (f", Triton {info['triton']}" if "triton" in info else "")
        + f"; {info['date']}",
        "",
    ]
    ours = {(r["dtype"], str(r["shape"])): r for r in results if r["name"].startswith("mmrec.recurrence (op) [B,T")}

    def fmt(ms):
        return "-" if ms is None else f"{ms * scale:.3g}" if ms * scale < 100 else f"{ms * scale:.0f}"

    def ratio(r, key):
        base = ours.get((r["dtype"], str(r["shape"])), {}).get(key)
        return f"{r[key] / base:.2f}x" if r[key] and base else "-"

    header = [
        "dtype",
        "[B, T, H, d]",
        "",
        f"fwd ({unit})",
        f"fwd+bwd ({unit})",
        "fwd / mmrec op",
        "fwd+bwd / mmrec op",
        "note",
    ]
    rows = [
        [
            r["dtype"],
            str(r["shape"]),
            r["name"],
            fmt(r["fwd_ms"]),
            fmt(r["fwdbwd_ms"]),
            ratio(r, "fwd_ms"),
            ratio(r, "fwdbwd_ms"),
            r["note"],
        ]
        for r in results
    ]
    pairs = [
        f"{p['dtype']} {p['shape']} {fmt(p['autograd_ms'])} / {fmt(p['direct_ms'])} {unit} = {p['ratio']:.3f}x"
        for p in info["autograd_over_direct"]
    ]
    footer = [
        "",
        "Forward+backward eagerly through autograd / recurrence and recurrence_backward called directly, "
        "sampled in turn: " + "; ".join(pairs),
    ]
    return "\n".join(lines + markdown_table(header, rows) + footer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=4,
        action="append",
        metavar=("B", "T", "H", "d"),
        help="repeatable; default: per device (see the module docstring)",
    )
    parser.add_argument("--dtype", nargs="+", help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-slow", action="store_true", help="skip the PyTorch eager loop")
    parser.add_argument("--out", type=Path, default=None, help="output stem (writes .json and .md)")
    args = parser.parse_args()

    device = args.device
    if device == "cpu":
        keep_freed_memory()  # see bench.scan: every row runs under the same allocator setting
    shapes = args.shape or (CPU_SHAPES if device == "cpu" else CUDA_SHAPES)
    dtypes = args.dtype or (["float32"] if device == "cpu" else ["bfloat16"])
    info = versions(device)
    info.update(shapes=shapes)

    results = []
    info["autograd_over_direct"] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in shapes:
            torch.manual_seed(0)
            pair = autograd_against_direct(*shape, dtype, device, 2 * args.repeats)
            info["autograd_over_direct"].append({"dtype": dtype_name, "shape": shape, **pair})
            print(
                f"{dtype_name:9} {shape} forward+backward through autograd / ops called directly: {pair}",
                file=sys.stderr,
                flush=True,
            )
            for name, fwd, fwdbwd, note in contenders(*shape, dtype, device):
                row = {
                    "dtype": dtype_name,
                    "shape": shape,
                    "name": name,
                    "note": note,
                    "fwd_ms": None,
                    "fwdbwd_ms": None,
                }
                slow = name.startswith("PyTorch eager loop")
                if fwd is not None and not (slow and args.skip_slow):
                    # The eager loop takes ~0.2-0.7 s a call on a GPU (10 calls a sample there).
                    warmup, reps = (1, 1 if device == "cuda" else 3) if slow else (3, args.repeats)
                    row["fwd_ms"] = median_time_ms(fwd, device, warmup, reps)
                    if fwdbwd is not None:
                        row["fwdbwd_ms"] = median_time_ms(fwdbwd, device, warmup, reps)
                results.append(row)
                print(
                    f"{dtype_name:9} {shape} {name:52} fwd {row['fwd_ms']}  fwd+bwd {row['fwdbwd_ms']}",
                    file=sys.stderr,
                    flush=True,
                )

    write_results(args.out, info, results, render(results, info, device))


if __name__ == "__main__":
    main()
