"""Throughput of MMRecModel on CPU: tokens/s of forward and forward+backward.

    python -m bench.model_cpu --out bench/results/model_cpu

Rows: presets tiny and small, modes exact and parallel, eager and
torch.compile(fullgraph=True) (inductor). Forward is inference (no_grad);
forward+backward is the next-token cross-entropy and its backward through every
parameter (no optimizer step). A batch of [B, T] = [8, 512] random bytes from an
empty state. Each figure is the median of --repeats timed calls, with the best
(minimum) beside it: on a shared 2-core machine other processes slow some calls
several-fold, and the best shows what the code does when it has the cores.
Compilation happens in the warm-up calls, outside the timed ones. Prints a
Markdown table and writes it, with the raw times, device, versions and the
machine's load average before and after, to --out (.md and .json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import keep_freed_memory, markdown_table, versions, write_results
from mmrec_model import MMRecConfig, MMRecModel
from mmrec_model.training import next_byte_loss


def next_token_loss(model, ids):
    """The training loss of the bytes ids [B, T]: the mean next-byte loss of ids[:, 1:]."""
    logits, _ = model(ids, return_state=False)
    return next_byte_loss(logits[:, :-1], ids[:, 1:]).mean()


def workloads(model, ids):
    """(forward callable, forward+backward callable) of a model, eager or compiled."""

    def forward():
        with torch.no_grad():
            model(ids, return_state=False)

    def forward_backward():
        next_token_loss(model, ids).backward()

    return forward, forward_backward


def times_ms(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(preset: str, mode: str, compiled: bool, ids, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MMRecModel(MMRecConfig.preset(preset, mode=mode))
    runner = torch.compile(model, fullgraph=True) if compiled else model
    forward, forward_backward = workloads(runner, ids)
    row = {"preset": preset, "mode": mode, "compiled": compiled, "parameters": model.num_parameters()}
    for name, fn in (("fwd", forward), ("fwdbwd", forward_backward)):
        samples = times_ms(fn, warmup, repeats)
        row[f"{name}_times_ms"] = samples
        row[f"{name}_tokens_per_s"] = ids.numel() / statistics.median(samples) * 1e3
        row[f"{name}_best_tokens_per_s"] = ids.numel() / min(samples) * 1e3
    return row


def render(results, info) -> str:
    lines = [
        f"`{info['command']}`",
        "",
        f"MMRecModel on {info['device']} ({info['cpu']}); [B, T] = {info['shape']}; torch {info['torch']};"
        f" mmrec {info['mmrec']}; {info['date']}; load average (1 min) {info['load_before']:.2f} before,"
        f" {info['load_after']:.2f} after",
        "",
        "tokens/s: median of the timed calls (best in brackets)",
        "",
    ]
    header = ["preset", "parameters", "mode", "", "fwd (tokens/s)", "fwd+bwd (tokens/s)"]
    rows = [
        [
            r["preset"],
            f"{r['parameters'] / 1e6:.2f}M",
            r["mode"],
            "compiled" if r["compiled"] else "eager",
            f"{r['fwd_tokens_per_s']:,.0f} ({r['fwd_best_tokens_per_s']:,.0f})",
            f"{r['fwdbwd_tokens_per_s']:,.0f} ({r['fwdbwd_best_tokens_per_s']:,.0f})",
        ]
        for r in results
    ]
    return "\n".join(lines + markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--modes", nargs="+", default=["exact", "parallel"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled rows")
    parser.add_argument("--out", type=Path, default=None, help="output stem (writes .json and .md)")
    args = parser.parse_args()

    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = versions("cpu")
    info.update(
        command="python " + " ".join(sys.argv), shape=[args.batch_size, args.seq_len], load_before=os.getloadavg()[0]
    )
    ids = torch.randint(0, 256, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    results = []
    for preset in args.presets:
        for mode in args.modes:
            for compiled in (False,) if args.eager_only else (False, True):
                row = measure(preset, mode, compiled, ids, args.warmup, args.repeats)
                results.append(row)
                print(
                    f"{preset:6} {mode:8} {'compiled' if compiled else 'eager':8} "
                    f"fwd {row['fwd_tokens_per_s']:9,.0f} tok/s  fwd+bwd {row['fwdbwd_tokens_per_s']:9,.0f} tok/s",
                    file=sys.stderr,
                )
    info["load_after"] = os.getloadavg()[0]
    write_results(args.out, info, results, render(results, info))


if __name__ == "__main__":
    main()
