"""Turns a pretrain run into a transformers model folder: `python -m mmrec_model.export` (or `mmrec-export`).

    mmrec-export runs/tiny hf/tiny

OUT_DIR, a new or empty folder, receives the model's weights (model.safetensors), its
config.json and generation_config.json, and the byte tokenizer's tokenizer_config.json, for transformers'
AutoModelForCausalLM and AutoTokenizer (after `import mmrec_model`). Needs transformers:
pip install "mmrec[hf]".
"""

from __future__ import annotations

import argparse
import sys

PROG = "mmrec-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", metavar="RUN_DIR", help="pretrain run folder (or its checkpoint file)")
    parser.add_argument("out", metavar="OUT_DIR", help="folder to write, new or empty")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .hf import export_run  # transformers is an optional dependency
    except ImportError as err:
        print(f'{PROG}: error: needs transformers ({err}); pip install "mmrec[hf]"', file=sys.stderr)
        return 1
    try:
        out = export_run(args.run, args.out)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
