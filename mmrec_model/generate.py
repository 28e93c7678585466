"""Samples text from a pretrained MM-Rec checkpoint: `python -m mmrec_model.generate` (or `mmrec-generate`).

    python -m mmrec_model.generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 300

The prompt is encoded as UTF-8 bytes (token id = byte value); the model
continues it one byte at a time, carrying its recurrent and memory state
(O(1) work per byte), sampling from softmax(logits / temperature) restricted to
the top_k most likely bytes and to the fewest whose probabilities sum to top_p
(temperature 0: the most likely byte). The text streams out as it is made (one
sample), or each of --num-samples samples, made together, after the other; the
bytes are decoded as UTF-8, with U+FFFD for any invalid sequence. The speed goes
to stderr.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .training import load_model, pick_device

PROG = "mmrec-generate"


def encode(text: str) -> torch.Tensor:
    """Token ids [1, len(utf-8 bytes)] of `text`."""
    return torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    """The text of token ids [T], UTF-8 with U+FFFD for an invalid sequence."""
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


@dataclass
class Sampling:
    """How the commands sample: ``MMRecModel.stream``'s settings and the seed of its generator."""

    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None
    seed: int = 0


def sample_tokens(
    model, prompt: str, max_new_tokens: int, sampling: Sampling, num_samples: int = 1, cuda_graphs: bool | None = None
) -> Iterator[list[int]]:
    """The bytes sampled after `prompt`, one list of `num_samples` (one per sample, a
    batch row each) per step, as they come; reproducible for a given seed (a generator
    of its own, on the model's device, so nothing else's random numbers change).
    `cuda_graphs`: ``MMRecModel.stream``'s (None: on CUDA)."""
    if not prompt:
        raise ValueError("prompt: expected at least one character to continue")
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(sampling.seed)
    ids = encode(prompt).to(device).expand(num_samples, -1)
    was_training = model.training
    model.eval()
    try:
        stream = model.stream(
            ids, max_new_tokens, sampling.temperature, sampling.top_k, None, sampling.top_p, generator, cuda_graphs
        )
        for token in stream:
            yield token[:, 0].tolist()
    finally:
        model.train(was_training)


def generate_text(model, prompt: str, max_new_tokens: int, sampling: Sampling) -> str:
    """The prompt followed by `max_new_tokens` sampled bytes, as text."""
    return continued(prompt, [step[0] for step in sample_tokens(model, prompt, max_new_tokens, sampling)])


def continued(prompt: str, new_bytes) -> str:
    """The prompt followed by the text of `new_bytes` (token ids)."""
    return decode(torch.cat([encode(prompt)[0], torch.tensor(new_bytes, dtype=torch.long)]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="checkpoint file, or a run folder holding checkpoint.pt"
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=300, help="bytes to generate (default: 300)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest bytes; 0: all (default 40)")
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the fewest likeliest bytes whose probabilities sum to p; 1: all (default 1)",
    )
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1,
        help="samples of the same prompt, generated together as a batch (default: 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    parser.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        default=None,
        help="on CUDA, launch each step op by op instead of replaying CUDA graphs",
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise ValueError("--prompt: expected at least one character to continue")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens: expected >= 0, got {args.max_new_tokens}")
    for name in ("temperature", "top_p"):  # NaN passes every comparison below
        if not math.isfinite(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')}: expected a finite number, got {getattr(args, name)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: expected >= 0, got {args.temperature}")
    if not 0 <= args.top_k <= 256:
        raise ValueError(f"--top-k: expected 0 .. 256 (0: all bytes), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p: expected a number in (0, 1] (1: all bytes), got {args.top_p}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples: expected a positive integer, got {args.num_samples}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        model = load_model(args.checkpoint, pick_device(args.device))
    except ValueError as err:  # CheckpointError is one
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    sampling = Sampling(args.temperature, args.top_k or None, args.top_p if args.top_p < 1 else None, args.seed)
    started = time.perf_counter()
    tokens = sample_tokens(model, args.prompt, args.max_new_tokens, sampling, args.num_samples, args.cuda_graphs)
    if args.num_samples == 1:
        print_stream(args.prompt, (step[0] for step in tokens))
    else:
        samples = list(zip(*tokens)) or [()] * args.num_samples
        for i, sample in enumerate(samples):
            print(f"--- sample {i + 1} of {args.num_samples} ---")
            print(continued(args.prompt, list(sample)))
    seconds = time.perf_counter() - started
    made = args.max_new_tokens * args.num_samples
    print(
        f"{PROG}: {made} bytes in {seconds:.2f} s, {made / seconds:,.0f} bytes/s (prompt included) on "
        f"{next(model.parameters()).device}",
        file=sys.stderr,
    )
    return 0


def print_stream(prompt: str, new_bytes: Iterator[int]) -> None:
    """Prints the prompt, then each byte's text as soon as it completes a character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(prompt, end="", flush=True)
    for byte in new_bytes:
        print(decoder.decode(bytes([byte])), end="", flush=True)
    print(decoder.decode(b"", final=True))


if __name__ == "__main__":
    sys.exit(main())
