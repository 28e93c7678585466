"""Where a training step's time goes: MM-Rec, each of its memories taken out, and the
Transformer, timed alike, plus the kernels that fill the step.

    python -m bench.train_breakdown --out bench/results/train_breakdown_small_h100
    python -m bench.train_breakdown --smoke --device cpu        # tiny shapes, checks the script

Every variant is bench.quality's model for its arch (the preset's width, depth, heads and
window), built with seed 0, compiled (each block alone, regional compilation, or with
--compile model the whole model; --cuda-graphs adds torch.compile's CUDA graphs), trained on random
bytes: --tokens-per-step tokens a step in sequences of --seq-len, bf16 autocast on CUDA,
fused AdamW. The step time is the median of --steps timed steps after 3 warm-up steps; the
difference between a variant and the full model is what the memory it removes costs.
torch.profiler then records --profiled-steps steps of each variant named in --profile, and
the table lists its kernels by their time per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import compile_blocks, markdown_table, model_logits, versions, write_results
from bench.quality.run import build_model
from bench.quality.settings import Settings, model_config
from mmrec_model.training import autocast, next_byte_loss
from mmrec_model.training.loop import synchronize

# variant: (bench.quality arch, MMRecConfig overrides)
VARIANTS = {
    "transformer": ("transformer", {}),
    "mmrec": ("mmrec", {}),
    "mmrec-parallel": ("mmrec", {"mode": "parallel"}),
    "mmrec-sdpa": ("mmrec", {"read_kernel": "sdpa"}),
    "mmrec-parallel-sdpa": ("mmrec", {"mode": "parallel", "read_kernel": "sdpa"}),
    "mmrec-no-window": ("mmrec-no-window", {}),
    "mmrec-no-longterm": ("mmrec-no-longterm", {}),
    "mmrec-parallel-no-longterm": ("mmrec-no-longterm", {"mode": "parallel"}),
    "mmrec-no-recurrence": ("mmrec-no-recurrence", {}),
    "mmrec-window-only": ("mmrec-no-recurrence", {"top_k": 0}),
    "mmrec-window-only-sdpa": ("mmrec-no-recurrence", {"top_k": 0, "read_kernel": "sdpa"}),
}
SMOKE_SIZES = {"dim": 32, "n_layers": 2, "n_heads": 2, "window": 16}
KERNEL_ROWS = 25


def build(
    variant: str, settings: Settings, device: torch.device, scope: str = "blocks", mode: str | None = None
) -> torch.nn.Module:
    """The variant's model, compiled: each block alone (``compile_blocks``) or the whole
    model, in torch.compile's ``mode`` (None: the default; 'reduce-overhead': CUDA graphs)."""
    arch, overrides = VARIANTS[variant]
    config = dataclasses.replace(model_config(arch, settings), **overrides)
    model = build_model(config, seed=0, device=device)
    compile_blocks(model, mode, whole=scope == "model")
    return model


def make_step(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, cuda_graphs: bool = False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def step():
        if cuda_graphs:
            # The previous step's graph outputs are dead: their memory may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, dtype):
            loss = next_byte_loss(model_logits(model, ids[:, :-1]), ids[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_ms(step, device: torch.device, steps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        synchronize(device.type)
        start = time.perf_counter()
        step()
        synchronize(device.type)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernels(step, device: torch.device, steps: int) -> tuple[list[dict], dict]:
    """The profiled steps' kernels (on CUDA; ops on CPU), by time per step, longest first,
    and their totals per step: {"launches", "ms"} (on CUDA, the GPU's busy time: what the
    step's wall time holds beyond it is the GPU waiting for the host)."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        synchronize(device.type)
    rows = []
    for event in prof.key_averages():
        total = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        # On CUDA the device's own events (kernels, memsets, copies), aten's kernels included.
        if total > 0 and (device.type == "cpu" or event.device_type == DeviceType.CUDA):
            rows.append({"name": event.key, "calls_per_step": event.count / steps, "ms_per_step": total / 1e3 / steps})
    totals = {"launches": sum(r["calls_per_step"] for r in rows), "ms": sum(r["ms_per_step"] for r in rows)}
    return sorted(rows, key=lambda row: -row["ms_per_step"])[:KERNEL_ROWS], totals


def render(rows: list[dict], info: dict, args: argparse.Namespace) -> str:
    reference = next((r["step_ms"] for r in rows if r["variant"] == "transformer"), None)
    full = next((r["step_ms"] for r in rows if r["variant"] == "mmrec"), None)
    lines = [
        "# Training step breakdown: MM-Rec's memories against the Transformer",
        "",
        f"`bench/train_breakdown.py`; {info['device']}; torch {info['torch']}; Triton {info.get('triton', '-')}; "
        f"{info['date']}. Preset {args.preset}, {args.tokens_per_step} tokens a step in sequences of "
        f"{args.seq_len}; {'compiled blocks' if args.compile == 'blocks' else 'the whole model compiled'}"
        f"{', CUDA graphs' if args.cuda_graphs else ''}; median of {args.steps} steps.",
        "",
    ]
    lines += markdown_table(
        ["variant", "ms / step", "tokens/s vs Transformer", "ms vs mmrec"],
        [
            [
                r["variant"],
                f"{r['step_ms']:.1f}",
                f"{reference / r['step_ms']:.2f}x" if reference else "-",
                f"{r['step_ms'] - full:+.1f}" if full else "-",
            ]
            for r in rows
        ],
    )
    for r in rows:
        if r["kernels"]:
            totals = r["kernel_totals"]
            lines += ["", f"## {r['variant']}: kernels by time per step", ""]
            what = "kernels" if args.device == "cuda" else "ops (self CPU time)"
            lines += [
                f"All {what}: {totals['launches']:g} calls, {totals['ms']:.1f} ms a step "
                f"({totals['ms'] / r['step_ms']:.0%} of the step's {r['step_ms']:.1f} ms).",
                "",
            ]
            lines += markdown_table(
                ["kernel", "calls / step", "ms / step"],
                [[k["name"][:100], f"{k['calls_per_step']:g}", f"{k['ms_per_step']:.2f}"] for k in r["kernels"]],
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--profile", nargs="*", default=["transformer", "mmrec", "mmrec-window-only"])
    parser.add_argument(
        "--compile",
        default="blocks",
        choices=["blocks", "model"],
        help="compile each block alone (regional compilation) or the whole model",
    )
    parser.add_argument("--cuda-graphs", action="store_true", help="torch.compile mode 'reduce-overhead'")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokens-per-step", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--profiled-steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="output stem (.md, .json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train_breakdown.py: error: --device cuda, but CUDA is not available (use --device cpu --smoke)")
    if args.smoke:
        args.preset, args.seq_len, args.tokens_per_step, args.steps, args.profiled_steps = "tiny", 64, 128, 1, 1
    device = torch.device(args.device)
    settings = Settings(preset=args.preset, sizes=SMOKE_SIZES if args.smoke else {})
    ids = torch.randint(0, 256, (args.tokens_per_step // args.seq_len, args.seq_len + 1), device=device)
    rows = []
    for variant in args.variants:
        mode = "reduce-overhead" if args.cuda_graphs else None
        step = make_step(build(variant, settings, device, args.compile, mode), ids, device, args.cuda_graphs)
        row = {"variant": variant, "step_ms": step_ms(step, device, args.steps)}
        row["kernels"], row["kernel_totals"] = (
            kernels(step, device, args.profiled_steps) if variant in args.profile else ([], {})
        )
        print(f"{variant}: {row['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)
        rows.append(row)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = versions(args.device)
    write_results(args.out, info, rows, render(rows, info, args))


if __name__ == "__main__":
    main()
