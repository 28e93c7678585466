"""Samples text from a pretrained MM-Rec checkpoint: `python -m mmrec_model.generate` (or `mmrec-generate`).

    python -m mmrec_model.generate --checkpoint runs/tiny --prompt "def main(" --max-new-tokens 300

The prompt is encoded as UTF-8 bytes (token id = byte value); the model
continues it one byte at a time, carrying its recurrent and memory state
(O(1) work per byte), sampling from softmax(logits / temperature) restricted to
the top_k most likely bytes (temperature 0: the most likely byte). The bytes
are decoded as UTF-8, with U+FFFD for any invalid sequence.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .checkpoint import CheckpointError, load_checkpoint, non_finite_entries

PROG = "mmrec-generate"


def encode(text: str) -> torch.Tensor:
    """Token ids [1, len(utf-8 bytes)] of `text`."""
    return torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


@torch.no_grad()
def generate_text(model, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int) -> str:
    """The prompt followed by `max_new_tokens` sampled bytes, as text; reproducible for a given seed."""
    if not prompt:
        raise ValueError("prompt: expected at least one character to continue")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        ids = model.generate(encode(prompt).to(device), max_new_tokens, temperature=temperature, top_k=top_k)
    model.train(was_training)
    return decode(ids[0].cpu())


def load_model(path: str, device: torch.device):
    """The model of a checkpoint file (or run folder), in eval mode on `device`."""
    from mmrec_model import MMRecConfig, MMRecModel

    checkpoint = load_checkpoint(path)
    non_finite = non_finite_entries(checkpoint["model"])
    if non_finite:
        raise CheckpointError(
            f"{path}: the checkpoint's model has NaN or Inf weights ({', '.join(non_finite[:3])}"
            f"{', ...' if len(non_finite) > 3 else ''}): it comes from a run that diverged"
        )
    try:
        model = MMRecModel(MMRecConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the checkpoint's model does not load ({err})") from None
    return model.to(device).eval()


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise ValueError("--prompt: expected at least one character to continue")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens: expected >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: expected >= 0, got {args.temperature}")
    if not 0 <= args.top_k <= 256:
        raise ValueError(f"--top-k: expected 0 .. 256 (0: all bytes), got {args.top_k}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")


def operators_loaded(prog: str) -> bool:
    """Whether the model's compiled operators load; if not, says why (the command's fatal
    error): without them nothing can run."""
    try:
        import mmrec_ops  # noqa: F401
    except ImportError as err:
        print(f"{prog}: fatal: {err}", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    if not operators_loaded(PROG):
        return 1
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        model = load_model(args.checkpoint, device)
    except ValueError as err:  # CheckpointError is one
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(generate_text(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
