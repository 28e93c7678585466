"""MM-Rec against a Transformer of the same width and depth on one GPU, side by side.

    python -m bench.model_gpu --out bench/results/model_cuda_h100        # all sections
    python -m bench.model_gpu --sections train --seq-lens 2048 8192      # a part
    python -m bench.model_gpu --smoke --device cpu                       # tiny shapes, checks the script

Contenders: MMRecModel ``base`` (12 layers, width 768, its 1024-token window) in modes parallel
(mmrec.scan) and exact (mmrec.recurrence), and bench.transformer's GPT
(12 layers, width 768, PyTorch SDPA with is_causal), each eager and compiled;
bf16 autocast, float32 parameters, fused AdamW. "Compiled" is regional
compilation: ``torch.compile`` of each block (they share one graph), the way
PyTorch's docs recommend for stacks of identical layers; the rest (embedding,
head, loss) stays eager.

Sections:
  train     training tokens/s and peak memory at each --seq-lens T with
            --tokens-per-step tokens per optimizer step (batch = tokens / T);
            MM-Rec also with the sequence run in chunks (--chunk-sizes).
  generate  greedy decoding at batch 1 after a prompt of each --contexts length:
            time per new token (eager; MM-Rec also compiled with CUDA graphs),
            prompt (prefill) time, and the bytes of the state (MM-Rec) or KV
            cache (Transformer) the next token reads.

How well each model learns (validation and long-context bits per byte after equal
training, over seeds, with ablations) is bench.quality's; the quality section that
bench/results/model_cuda_h100.md records was this script's before it moved there.

Writes a Markdown table per section, the raw numbers (JSON) and a PNG of
throughput, memory and generation to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    compile_blocks,
    markdown_table,
    model_logits,
    versions,
    write_results,
)
from bench.transformer import KVCache, Transformer, TransformerConfig
from mmrec_model import MMRecConfig, MMRecModel
from mmrec_model.training import autocast, next_byte_loss
from mmrec_model.training.loop import synchronize

ARCHS = ("transformer", "mmrec-parallel", "mmrec-exact")


@dataclass
class Sizes:
    """The shapes a run uses (the full benchmark, or --smoke's tiny ones)."""

    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    tokens_per_step: int = 65536
    timed_steps: int = 5
    decode_tokens: int = 64
    prefill_chunk: int = 8192


SMOKE = Sizes(dim=64, n_layers=2, n_heads=2, tokens_per_step=512, timed_steps=2, decode_tokens=4, prefill_chunk=128)


# --- models -------------------------------------------------------------------------


def build(arch: str, sizes: Sizes, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "transformer":
        model = Transformer(TransformerConfig(dim=sizes.dim, n_layers=sizes.n_layers, n_heads=sizes.n_heads))
    else:
        mode = arch.split("-")[1]
        config = MMRecConfig.preset("base", dim=sizes.dim, n_layers=sizes.n_layers, n_heads=sizes.n_heads, mode=mode)
        model = MMRecModel(config)
    return model.to(device)


def loss_of(model, ids, targets, chunk_size=None) -> torch.Tensor:
    """The pretraining loss (mean next-byte cross-entropy) of either architecture."""
    return next_byte_loss(model_logits(model, ids, chunk_size), targets).mean()


def reset_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# --- training throughput --------------------------------------------------------------


def train_row(arch, compiled, T, chunk_size, sizes, device) -> dict:
    row = {"arch": arch, "compiled": compiled, "T": T, "chunk_size": chunk_size, "batch": sizes.tokens_per_step // T}
    model = build(arch, sizes, device)
    if compiled:
        compile_blocks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    ids = torch.randint(0, 256, (row["batch"], T + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step():
        with autocast(device, torch.bfloat16):
            loss = loss_of(model, inputs, targets, chunk_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        start = time.perf_counter()
        step()  # compiles, when compiled
        synchronize(device)
        row["first_step_s"] = time.perf_counter() - start
        step()
        reset_memory(device)
        times = []
        for _ in range(sizes.timed_steps):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        row["step_ms"] = 1e3 * statistics.median(times)
        row["tokens_per_s"] = sizes.tokens_per_step / statistics.median(times)
        row["peak_gib"] = peak_gib(device)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    return row


def train_section(args, sizes, device) -> list[dict]:
    rows = []
    for T in args.seq_lens:
        for arch in args.archs:
            for compiled in args.compiled:
                chunks = [None] + ([c for c in args.chunk_sizes if c < T] if arch != "transformer" else [])
                for chunk_size in chunks:
                    row = train_row(arch, compiled, T, chunk_size, sizes, device)
                    reset_memory(device)  # the row's model is gone: start the next from nothing
                    print(row, file=sys.stderr, flush=True)
                    rows.append(row)
    return rows


# --- generation -------------------------------------------------------------------------


def state_bytes(state) -> int:
    return sum(t.nbytes for block in state.blocks for t in block) + state.position.nbytes


@torch.no_grad()
def generate_row(model, step, context, sizes, device) -> dict:
    """Prompt of `context` random bytes, then sizes.decode_tokens greedy tokens through
    `step` (the model, or its compiled form), timed."""
    row = {"context": context}
    prompt = torch.randint(0, 256, (1, context), device=device)
    try:
        with autocast(device, torch.bfloat16):
            start = time.perf_counter()
            logits, next_logits, row["state_bytes"] = start_decoding(model, step, prompt, sizes, device)
            synchronize(device)
            row["prefill_s"] = time.perf_counter() - start
            token = logits[:, -1:].argmax(-1)
            for _ in range(3):  # warm-up (compiles, records CUDA graphs)
                token = next_logits(token)[:, -1:].argmax(-1)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(sizes.decode_tokens):
                token = next_logits(token)[:, -1:].argmax(-1)
            synchronize(device)
            row["ms_per_token"] = 1e3 * (time.perf_counter() - start) / sizes.decode_tokens
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    return row


def start_decoding(model, step, prompt, sizes, device):
    """Reads the prompt (eager); returns its logits, a function token [1, 1] -> next
    logits, and the bytes of what the next token reads (MM-Rec state, or KV cache)."""
    if isinstance(model, MMRecModel):
        logits, state = model(prompt, chunk_size=sizes.prefill_chunk)

        def next_logits(token):
            nonlocal state
            out, state = step(token, state)
            if step is not model:  # CUDA graph outputs are overwritten by the next replay
                state = state.clone()
            return out

        return logits, next_logits, state_bytes(state)
    cache = KVCache(model.config, 1, prompt.shape[1] + sizes.decode_tokens + 3, device, torch.bfloat16)
    logits = model(prompt, cache)
    return logits, lambda token: model(token, cache), cache.nbytes(prompt.shape[1])


def generate_section(args, sizes, device) -> list[dict]:
    """Per model: eager decoding, and for MM-Rec its step compiled once with CUDA graphs
    (torch.compile mode='reduce-overhead'; the position is a tensor, so every context
    replays the same graph). The Transformer's cache length is a Python int, so it runs eager."""
    rows = []
    for arch in args.archs:
        model = build(arch, sizes, device).eval()
        for compiled in args.compiled if arch != "transformer" else [0]:
            if compiled:
                torch._dynamo.reset()
            step = torch.compile(model, mode="reduce-overhead", fullgraph=True) if compiled else model
            for context in args.contexts:
                row = {"arch": arch, "compiled": bool(compiled), **generate_row(model, step, context, sizes, device)}
                reset_memory(device)
                print(row, file=sys.stderr, flush=True)
                rows.append(row)
        del model
    return rows


# --- output ---------------------------------------------------------------------------------


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def section(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return [title, ""] + markdown_table(header, rows) + [""]


def render(results: dict, info: dict) -> str:
    lines = [
        f"MM-Rec vs Transformer on {info['device']}; torch {info['torch']}"
        + (f", Triton {info['triton']}" if "triton" in info else "")
        + f"; {info['date']}; bf16 autocast",
        "",
    ]

    def yes(flag):
        return "yes" if flag else "no"

    if results.get("train"):
        lines += section(
            "Training (tokens/s, optimizer step included):",
            ["model", "compiled", "T", "chunk", "batch", "tokens/s", "step (ms)", "peak (GiB)", "first step (s)"],
            [
                [
                    r["arch"],
                    yes(r["compiled"]),
                    str(r["T"]),
                    str(r["chunk_size"] or "-"),
                    str(r["batch"]),
                    r.get("error") or f"{r['tokens_per_s'] / 1e3:.1f}K",
                    fmt(r.get("step_ms"), ".1f"),
                    fmt(r.get("peak_gib"), ".1f"),
                    fmt(r.get("first_step_s"), ".1f"),
                ]
                for r in results["train"]
            ],
        )
    if results.get("generate"):
        lines += section(
            "Generation (batch 1, greedy; compiled: CUDA graphs):",
            ["model", "compiled", "context", "ms / token", "state or KV cache (MiB)", "prompt (s)"],
            [
                [
                    r["arch"],
                    yes(r["compiled"]),
                    str(r["context"]),
                    r.get("error") or fmt(r.get("ms_per_token"), ".2f"),
                    fmt(r["state_bytes"] / 2**20 if "state_bytes" in r else None, ".1f"),
                    fmt(r.get("prefill_s"), ".2f"),
                ]
                for r in results["generate"]
            ],
        )
    return "\n".join(lines).rstrip()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax_tps, ax_mem, ax_gen = axes
    for (arch, compiled, chunk), rows in _series(results.get("train", []), ("arch", "compiled", "chunk_size")).items():
        ok = [r for r in rows if "tokens_per_s" in r]
        label = f"{arch}{' compiled' if compiled else ''}{f' chunk {chunk}' if chunk else ''}"
        ax_tps.plot([r["T"] for r in ok], [r["tokens_per_s"] / 1e3 for r in ok], "o-", label=label)
        if ok and ok[0]["peak_gib"] is not None:
            ax_mem.plot([r["T"] for r in ok], [r["peak_gib"] for r in ok], "o-", label=label)
    for (arch, compiled), rows in _series(results.get("generate", []), ("arch", "compiled")).items():
        ok = [r for r in rows if "ms_per_token" in r]
        name = f"{arch}{' compiled' if compiled else ''}"
        if not compiled:
            ax_gen.plot(
                [r["context"] for r in ok], [r["state_bytes"] / 2**20 for r in ok], "o-", label=f"{arch} state MiB"
            )
        ax_gen.plot([r["context"] for r in ok], [r["ms_per_token"] for r in ok], "s--", label=f"{name} ms/token")
    titles = [
        ("training tokens/s (K) vs T", "T"),
        ("peak memory (GiB) vs T", "T"),
        ("generation: state MiB and ms/token vs context", "context"),
    ]
    for ax, (title, xlabel) in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_xscale("log", base=2)
        if ax.lines:
            ax.legend(fontsize=7)
    ax_gen.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _series(rows, keys):
    series = {}
    for r in rows:
        series.setdefault(tuple(r[k] for k in keys), []).append(r)
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--sections", nargs="+", default=["train", "generate"], choices=["train", "generate"])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="training T (default 2048 8192 32768)")
    parser.add_argument(
        "--chunk-sizes",
        type=int,
        nargs="*",
        default=None,
        help="MM-Rec training also in chunks of these sizes (default 8192)",
    )
    parser.add_argument(
        "--compiled", type=int, nargs="+", default=[0, 1], choices=[0, 1], help="eager (0), compiled (1)"
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=None, help="generation contexts (default 2K 32K 128K)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="output stem (.md, .json, .png)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add this run's rows to those already in --out's .json (a benchmark split over calls)",
    )
    args = parser.parse_args()

    sizes = SMOKE if args.smoke else Sizes()
    args.seq_lens = args.seq_lens or ([128, 256] if args.smoke else [2048, 8192, 32768])
    args.chunk_sizes = args.chunk_sizes if args.chunk_sizes is not None else ([128] if args.smoke else [8192])
    args.contexts = args.contexts or ([64, 256] if args.smoke else [2048, 32768, 131072])
    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    info = versions(device)
    info.update(sizes=vars(sizes), smoke=args.smoke)

    results = {}
    if args.append and args.out and args.out.with_suffix(".json").exists():
        results = json.loads(args.out.with_suffix(".json").read_text())["results"]
    sections = {"train": train_section, "generate": generate_section}
    for name in args.sections:
        results[name] = results.get(name, []) + sections[name](args, sizes, device)
    write_results(args.out, info, results, render(results, info))
    if args.out:
        plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
