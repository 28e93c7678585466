"""Decoding speed: time per new token of MM-Rec's paths and of a same-size Transformer with
a KV cache, after a prompt of each context length, at each batch size, side by side.

    python -m bench.generate --device cpu --out bench/results/generate_cpu
    python -m bench.generate --device cuda --presets base --batches 1 --contexts 2048 32768 131072
    python -m bench.generate --device cpu --smoke                  # tiny shapes, checks the script

Paths:
  mmrec-graphs             what ``MMRecModel.generate`` runs on CUDA: the Decoder's step replayed
                           as CUDA graphs (the decoder ``generate`` keeps on the model)
  mmrec-decoder            what it runs on the CPU (and on CUDA with cuda_graphs=False):
                           ``mmrec_model.decode.Decoder``, the state in fixed caches updated in
                           place, launched op by op
  mmrec-step               ``model(token, state)``, the functional one-token step
                           (``MMRecBlock.step``)
  transformer-kv           bench.transformer's GPT (the preset's width, depth, heads), its
                           keys and values cached, eager
  transformer-kv-compiled  the same GPT's ``StaticDecoder`` (static cache, position a tensor)
                           under ``torch.compile(mode="reduce-overhead")``: one CUDA graph a token
Each (preset, batch, context): per model family, fresh weights (seed 0) and the prompt read
once (MM-Rec in chunks of --prefill-chunk), then each path from a copy of that state:
warm-up tokens (20; for mmrec-graphs enough for every plan's graph to be captured, the
capture being once per model and batch size; for transformer-kv-compiled the compilation
too), their time kept apart, then --tokens greedy tokens timed; float32, no autograd, eval
mode. A path that runs out of memory gets a row that says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.common import apply_smoke, markdown_table, versions, write_results
from bench.transformer import KVCache, StaticDecoder, Transformer, TransformerConfig
from mmrec_model import MMRecConfig, MMRecModel
from mmrec_model.decode import Decoder
from mmrec_model.memory import MemoryState
from mmrec_model.training import pick_device
from mmrec_model.training.loop import synchronize

MMREC_PATHS = ("mmrec-graphs", "mmrec-decoder", "mmrec-step")
TRANSFORMER_PATHS = ("transformer-kv", "transformer-kv-compiled")
PATHS = MMREC_PATHS + TRANSFORMER_PATHS
CUDA_ONLY = ("mmrec-graphs", "transformer-kv-compiled")
DEFAULT_PATHS = {
    "cpu": ("mmrec-decoder", "mmrec-step", "transformer-kv"),
    "cuda": ("mmrec-graphs", "mmrec-decoder", "transformer-kv", "transformer-kv-compiled"),
}
WARM_UP = 20  # the first row of a process also warms its thread pool and allocator up
SMOKE = dict(presets=["tiny"], batches=[1, 2], contexts=[16, 40], tokens=4, prefill_chunk=32)


def build(family: str, preset: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = MMRecConfig.preset(preset)
    if family == "mmrec":
        return MMRecModel(config).to(device).eval()
    transformer = TransformerConfig(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads)
    return Transformer(transformer).to(device).eval()


def warm_up_tokens(path: str, config) -> int:
    """mmrec-graphs: two segments of the long-term memory, so that each plan (whether the
    token starts or completes its segment) has come twice, its graph captured."""
    if path == "mmrec-graphs" and config.top_k:
        return max(WARM_UP, 2 * config.segment_len)
    return WARM_UP


def mmrec_stepper(path: str, model, state: MemoryState):
    """A function token [B, 1] -> logits [B, V] continuing from (a copy of) ``state``."""
    if path == "mmrec-graphs":
        return model._decoder(state.clone(), cuda_graphs=True).step
    if path == "mmrec-decoder":
        return Decoder(model, state.clone()).step
    state = state.clone()

    def step(token):
        nonlocal state
        out, state = model(token, state)
        return out[:, -1]

    return step


def transformer_stepper(path: str, model, prompt: torch.Tensor, max_len: int):
    """Reads the prompt into a fresh cache of ``max_len`` tokens; its last logits and the step."""
    cache = KVCache(model.config, prompt.shape[0], max_len, prompt.device, torch.float32)
    logits = model(prompt, cache)[:, -1]
    if path == "transformer-kv":
        return logits, lambda token: model(token, cache)[:, -1]
    step = torch.compile(StaticDecoder(model, cache), mode="reduce-overhead", fullgraph=True)
    position = torch.tensor([cache.length], device=prompt.device)

    def compiled_step(token):
        logits = step(token, position)
        position.add_(1)
        return logits

    return logits, compiled_step


def timed_tokens(next_logits, logits: torch.Tensor, count: int, device: torch.device) -> float:
    """Seconds for ``count`` greedy tokens after ``logits``."""
    token = logits.argmax(-1, keepdim=True)
    synchronize(device.type)
    began = time.perf_counter()
    for _ in range(count):
        token = next_logits(token).argmax(-1, keepdim=True)
    synchronize(device.type)
    return time.perf_counter() - began


def measure(path: str, start, warm_up: int, args, device: torch.device) -> dict:
    """Warm-up and timed tokens of one path; ``start()`` gives its first logits and step."""
    try:
        began = time.perf_counter()
        logits, next_logits = start()
        synchronize(device.type)
        start_s = time.perf_counter() - began
        warm_up_s = timed_tokens(next_logits, logits, warm_up, device)
        seconds = timed_tokens(next_logits, logits, args.tokens, device) / args.tokens
    except torch.OutOfMemoryError:
        return {"warm_up_tokens": warm_up, "note": "out of memory"}
    return {
        "warm_up_tokens": warm_up,
        "start_s": start_s,
        "warm_up_s": warm_up_s,
        "ms_per_token": 1e3 * seconds,
        "note": "",
    }


@torch.no_grad()
def rows_of(family: str, paths: list[str], preset: str, batch: int, context: int, args, device) -> list[dict]:
    """Every path of one model family from one prompt of ``context`` tokens."""
    model = build(family, preset, device)
    prompt = torch.randint(0, 256, (batch, context), device=device)
    base = {"preset": preset, "batch": batch, "context": context}
    rows = []
    if family == "mmrec":
        began = time.perf_counter()
        logits, state = model(prompt, chunk_size=args.prefill_chunk)
        logits = logits[:, -1]
        synchronize(device.type)
        prefill_s = time.perf_counter() - began
        for path in paths:
            warm_up = warm_up_tokens(path, model.config)
            row = measure(path, lambda path=path: (logits, mmrec_stepper(path, model, state)), warm_up, args, device)
            rows.append({"path": path, **base, "prefill_s": prefill_s, **row})
            model.release_graphs()
    else:
        for path in paths:
            max_len = context + WARM_UP + args.tokens
            row = measure(
                path,
                lambda path=path, max_len=max_len: transformer_stepper(path, model, prompt, max_len),
                WARM_UP,
                args,
                device,
            )
            rows.append({"path": path, **base, "prefill_s": row.get("start_s"), **row})
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for row in rows:
        if "ms_per_token" in row:
            row["tokens_per_s"] = batch * 1e3 / row["ms_per_token"]
        print(row, file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict], info: dict, args) -> str:
    lines = [
        "# Decoding: time per new token",
        "",
        f"`bench/generate.py`; {info['device']}; torch {info['torch']}; {info['date']}. "
        f"Greedy, float32, {args.tokens} timed tokens after the warm-up tokens, fresh weights.",
        "",
    ]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines += markdown_table(
        [
            "preset",
            "batch",
            "context",
            "path",
            "ms / token",
            "tokens/s (all batch rows)",
            "prefill s",
            "warm-up tokens",
            "warm-up s",
            "note",
        ],
        [
            [
                r["preset"],
                str(r["batch"]),
                str(r["context"]),
                r["path"],
                fmt(r.get("ms_per_token"), ".3f"),
                fmt(r.get("tokens_per_s"), ",.0f"),
                fmt(r.get("prefill_s"), ".2f"),
                str(r["warm_up_tokens"]),
                fmt(r.get("warm_up_s"), ".2f"),
                r["note"],
            ]
            for r in rows
        ],
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument(
        "--paths",
        nargs="+",
        default=None,
        choices=PATHS,
        help="default: " + "; ".join(f"{d}: {' '.join(p)}" for d, p in DEFAULT_PATHS.items()),
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 2048])
    parser.add_argument("--tokens", type=int, default=200, help="timed tokens per row")
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="output stem (.md, .json)")
    args = parser.parse_args()
    apply_smoke(args, SMOKE)
    device = pick_device(args.device)
    paths = args.paths or DEFAULT_PATHS[device.type]
    if device.type != "cuda" and set(paths) & set(CUDA_ONLY):
        parser.error(f"--paths: {', '.join(sorted(set(paths) & set(CUDA_ONLY)))} run on CUDA only")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        for batch in args.batches:
            for context in args.contexts:
                for family, family_paths in (("mmrec", MMREC_PATHS), ("transformer", TRANSFORMER_PATHS)):
                    chosen = [path for path in family_paths if path in paths]
                    if chosen:
                        rows += rows_of(family, chosen, preset, batch, context, args, device)
    info = versions(device.type)
    write_results(args.out, info, rows, render(rows, info, args))


if __name__ == "__main__":
    main()
