"""Decoding speed: time per new token of MM-Rec's paths and of a same-size Transformer with
a KV cache, after a prompt of each context length, at each batch size, side by side.

    python bench/generate.py --device cpu --out bench/results/generate_cpu
    python bench/generate.py --device cpu --smoke                  # tiny shapes, checks the script

Paths:
  mmrec-decoder     what ``MMRecModel.generate`` runs: ``mmrec_model.decode.Decoder``, the
                    state in fixed caches updated in place
  mmrec-step        ``model(token, state)``, the functional one-token step
                    (``MMRecBlock.step``)
  transformer-kv    bench/transformer.py's GPT (the preset's width, depth, heads), its
                    keys and values cached
Each row: the prompt read once (MM-Rec in chunks of --prefill-chunk), then --tokens greedy
tokens timed after 3 warm-up tokens; float32, no autograd, eval mode, fresh weights (seed 0).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import markdown_table, synchronize, versions, write_results  # noqa: E402
from bench.transformer import KVCache, Transformer, TransformerConfig  # noqa: E402
from mmrec_model import MMRecConfig, MMRecModel  # noqa: E402
from mmrec_model.decode import Decoder  # noqa: E402
from mmrec_model.training import pick_device  # noqa: E402

PATHS = ("mmrec-decoder", "mmrec-step", "transformer-kv")
WARM_UP = 3
SMOKE = dict(presets=["tiny"], batches=[1, 2], contexts=[16, 40], tokens=4, prefill_chunk=32)


def build(path: str, preset: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    config = MMRecConfig.preset(preset)
    if path.startswith("mmrec"):
        return MMRecModel(config).to(device).eval()
    transformer = TransformerConfig(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads)
    return Transformer(transformer).to(device).eval()


def start(path: str, model, prompt: torch.Tensor, tokens: int, prefill_chunk: int):
    """Reads the prompt; returns its last logits [B, V] and a function token [B, 1] -> logits [B, V]."""
    if path == "transformer-kv":
        cache = KVCache(model.config, prompt.shape[0], prompt.shape[1] + tokens + WARM_UP, prompt.device, torch.float32)
        return model(prompt, cache)[:, -1], lambda token: model(token, cache)[:, -1]
    logits, state = model(prompt, chunk_size=prefill_chunk)
    if path == "mmrec-decoder":
        return logits[:, -1], Decoder(model, state).step

    def step(token):
        nonlocal state
        out, state = model(token, state)
        return out[:, -1]

    return logits[:, -1], step


@torch.no_grad()
def row(path: str, preset: str, batch: int, context: int, args, device: torch.device) -> dict:
    model = build(path, preset, device)
    prompt = torch.randint(0, 256, (batch, context), device=device)
    began = time.perf_counter()
    logits, next_logits = start(path, model, prompt, args.tokens, args.prefill_chunk)
    synchronize(device.type)
    prefill_s = time.perf_counter() - began
    token = logits.argmax(-1, keepdim=True)
    for _ in range(WARM_UP):
        token = next_logits(token).argmax(-1, keepdim=True)
    synchronize(device.type)
    began = time.perf_counter()
    for _ in range(args.tokens):
        token = next_logits(token).argmax(-1, keepdim=True)
    synchronize(device.type)
    seconds = (time.perf_counter() - began) / args.tokens
    return {"path": path, "preset": preset, "batch": batch, "context": context, "prefill_s": prefill_s,
            "ms_per_token": 1e3 * seconds, "tokens_per_s": batch / seconds}  # fmt: skip


def render(rows: list[dict], info: dict, args) -> str:
    lines = [
        "# Decoding: time per new token",
        "",
        f"`bench/generate.py`; {info['device']}; torch {info['torch']}; {info['date']}. "
        f"Greedy, float32, {args.tokens} timed tokens after {WARM_UP} warm-up tokens, fresh weights.",
        "",
    ]
    lines += markdown_table(
        ["preset", "batch", "context", "path", "ms / token", "tokens/s (all batch rows)", "prefill s"],
        [[r["preset"], str(r["batch"]), str(r["context"]), r["path"], f"{r['ms_per_token']:.3f}",
          f"{r['tokens_per_s']:,.0f}", f"{r['prefill_s']:.2f}"] for r in rows],
    )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 2048])
    parser.add_argument("--tokens", type=int, default=200, help="timed tokens per row")
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="output stem (.md, .json)")
    args = parser.parse_args()
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        for batch in args.batches:
            for context in args.contexts:
                for path in args.paths:
                    rows.append(row(path, preset, batch, context, args, device))
                    print(rows[-1], file=sys.stderr, flush=True)
    info = versions(device.type)
    write_results(args.out, info, rows, render(rows, info, args))


if __name__ == "__main__":
    main()
