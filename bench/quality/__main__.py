"""The command line: `python -m bench.quality run ...` and `python -m bench.quality report ...`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from . import __doc__ as quality_doc
from .report import report_command
from .run import run_command
from .settings import ARCHS, OPTIONS, SMOKE, Settings


def config_item(text: str) -> tuple[str, int | float | str]:
    """'FIELD=VALUE' -> (FIELD, VALUE as an int, else a float, else the text)."""
    field_name, sep, value = text.partition("=")
    if not sep or not field_name:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return field_name, kind(value)
        except ValueError:
            pass
    return field_name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=quality_doc.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train and measure one (arch, seed) row")
    run.add_argument("--arch", required=True, choices=ARCHS)
    run.add_argument("--seed", type=int, required=True, help="seeds the initial weights and the training batches")
    run.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder of the rows")
    run.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, seconds: checks the script")
    field_types = {field.name: field.type for field in dataclasses.fields(Settings)}
    for name, (kind, help_text) in OPTIONS.items():
        defaults = f"default {getattr(Settings(), name)}, --smoke {getattr(SMOKE, name)}"
        several = "+" if field_types[name].startswith("tuple") else None
        run.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            nargs=several,
            default=argparse.SUPPRESS,
            help=f"{help_text} ({defaults})",
        )
    run.add_argument(
        "--config",
        type=config_item,
        action="append",
        default=argparse.SUPPRESS,
        metavar="FIELD=VALUE",
        help="an MMRecConfig field of every MM-Rec arch (the ablation's own field wins), e.g. "
        "top_k=8 or memory_tokens=16384; repeatable",
    )
    run.add_argument("--compile", action="store_true", default=argparse.SUPPRESS, help="torch.compile each block")
    run.add_argument("--device", choices=["cuda", "cpu"], default=argparse.SUPPRESS, help="default cuda (--smoke: cpu)")
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="write the row's training checkpoint (OUT/<label>-seed<S>.ckpt.pt) every N steps; a run "
        "whose checkpoint exists continues from it, exactly (default 0: never)",
    )
    run.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop training at STEP with a checkpoint, to continue in a later run (rows longer than one sitting)",
    )
    report = commands.add_parser("report", help="tables and plots over the rows of a folder")
    report.add_argument("folder", type=Path, help="folder of the rows (run's --out)")
    report.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="STEM",
        help="writes STEM.md, STEM.json, STEM.png (default: FOLDER/report)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.command == "run":
        run_command(args)
    else:
        report_command(args)


if __name__ == "__main__":
    main()
