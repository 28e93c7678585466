"""What the benchmarks share: timing, the allocator setting, regional compilation, either
model's logits, version info, output."""

from __future__ import annotations

import ctypes
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import mmrec_ops
from mmrec_model import MMRecModel
from mmrec_model.training.loop import synchronize


def keep_freed_memory() -> None:
    """Make glibc reuse large freed blocks instead of unmapping them."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def sample_time_ms(fn, device: str) -> float:
    """One timing sample of fn, in ms per call.

    On CUDA a sample times several back-to-back calls between two events, so
    that the GPU queue runs ahead of Python's launch overhead. One more call
    goes before the start event: the GPU runs it while the host launches the
    first timed call, whose host time would otherwise count (an empty queue at
    the start event), as it does not in steady state.
    """
    if device == "cuda":
        inner = 10
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / inner
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_time_ms(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(sample_time_ms(fn, device) for _ in range(repeats))


def paired_median_times_ms(fns: dict, device: str, warmup: int, repeats: int) -> dict:
    """{name: median ms per call} of several callables sampled in turn, one
    sample of each per round, so that a machine whose speed drifts (another
    process on the same cores) weighs on all of them alike: for ratios."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(sample_time_ms(fn, device))
    return {name: statistics.median(samples) for name, samples in times.items()}


def graph_time_ms(fn, repeats: int) -> float | None:
    """Device time per call of fn with no host in the way: 10 calls captured in
    one CUDA graph, whose replays median_time_ms times (divided by the 10
    calls). None when fn cannot be captured (the capture's error is printed)."""
    inner = 10
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except Exception as err:  # any op that cannot be captured; the benchmark goes on
        print(f"not captured: {type(err).__name__}: {err}"[:300], file=sys.stderr)
        return None
    return median_time_ms(graph.replay, "cuda", 1, repeats) / inner


def forward_backward(fn, inputs):
    """A callable running fn forward and backward (gradients of every input),
    with an upstream gradient made once, outside the timed region."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.no_grad():
        grad_out = torch.randn_like(fn(*leaves))

    def run():
        torch.autograd.grad(fn(*leaves), leaves, grad_out)

    return run


def versions(device: str) -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "mmrec": mmrec_ops.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device == "cuda":
        import triton

        info["device"] = torch.cuda.get_device_name()
        info["triton"] = triton.__version__
    else:
        info["device"] = f"CPU, {torch.get_num_threads()} threads"
    return info


def apply_smoke(args, values: dict) -> None:
    """With ``args.smoke``, overwrite the parsed options named in ``values`` with the tiny
    settings there (``--smoke`` checks a script end to end, measuring nothing)."""
    if args.smoke:
        for name, value in values.items():
            setattr(args, name, value)


def compile_blocks(model: torch.nn.Module, mode: str | None = None, whole: bool = False) -> None:
    """Regional compilation: every block of ``model.blocks`` through torch.compile (one
    shared graph), the way PyTorch's docs recommend for stacks of identical layers; or,
    with ``whole``, the whole model. ``mode``: torch.compile's (None: the default;
    'reduce-overhead': CUDA graphs).

    Dynamo's caches are reset first, so that each measurement compiles its own static
    graph (not a dynamic one left by an earlier length, nor eager past the recompile limit).
    """
    torch._dynamo.reset()
    for module in [model] if whole else model.blocks:
        module.compile(fullgraph=True, mode=mode)


def model_logits(model: torch.nn.Module, ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Logits [B, T, V] of ids [B, T] from either architecture: MMRecModel runs the blocks on
    chunk_size tokens at a time with its state carried (None: all at once), and returns no
    state (so that a fresh call builds no long-term store); a Transformer reads all T
    tokens at once."""
    if isinstance(model, MMRecModel):
        return model(ids, chunk_size=chunk_size, return_state=False)[0]
    return model(ids)


def markdown_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: header, separator, one line per row."""
    return [markdown_row(header), "|" + "---|" * len(header)] + [markdown_row(row) for row in rows]


def write_results(out: Path | None, info: dict, results: list, table: str) -> None:
    """Print the Markdown table; with an output stem, write it (.md) and the raw numbers (.json)."""
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"info": info, "results": results}, indent=2))
        out.with_suffix(".md").write_text(table + "\n")
