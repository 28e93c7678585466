"""The report over a folder of rows: per label, the mean over seeds with [min, max]; each
ablation against the full model of the same seed and settings; by position and recall.
Written as STEM.md, STEM.json and STEM.png."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from matplotlib.figure import Figure

from bench.common import markdown_table

from .measure import size_label
from .settings import ABLATIONS, ARCHS, row_label

ROW_GLOB = "*-seed*.json"


def load_rows(folder: Path) -> list[dict]:
    paths = sorted(folder.glob(ROW_GLOB))
    if not paths:
        raise ValueError(f"{folder}: no rows (<label>-seed<S>.json) to report")
    return [json.loads(path.read_text()) for path in paths]


def group_by_label(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows per label (archs in ARCHS' order, then any other), each list in seed order."""
    order = {arch: i for i, arch in enumerate(ARCHS)}
    groups = {}
    for row in sorted(rows, key=lambda r: (order.get(r["arch"], len(order)), row_label(r), r["seed"])):
        groups.setdefault(row_label(row), []).append(row)
    return groups


def stats(values: list[float]) -> dict | None:
    """Mean, min, max and count of `values`; None when there are none."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def mean_curve(rows: list[dict]) -> dict:
    """The training curve averaged over the rows (to the shortest)."""
    n = min(len(r["curve"]["bpb"]) for r in rows)
    bpb = [statistics.fmean(r["curve"]["bpb"][i] for r in rows) for i in range(n)]
    return {"step": rows[0]["curve"]["step"][:n], "bpb": bpb}


def band_bpb(row: dict) -> dict[str, float]:
    return {band["band"]: band["bpb"] for band in row["long_context"]["bands"]}


def farthest_bpb(row: dict) -> float | None:
    """Bits per byte of the last position band (beyond a window's reach); None if not measured."""
    bands = row["long_context"]["bands"]
    return bands[-1]["bpb"] if bands else None


def past_first_band_bpb(row: dict) -> float | None:
    """Bits per byte over every position past the first band (2K-32K at L = 32768: beyond
    the preset's training windows), the bands' figures weighted by their lengths; None if
    not measured."""
    bands = row["long_context"]["bands"][1:]
    if not bands:
        return None
    return sum(b["bpb"] * (b["end"] - b["start"]) for b in bands) / sum(b["end"] - b["start"] for b in bands)


def past_first_band_label(row: dict) -> str | None:
    """'2K-32K' at L = 32768: the positions past_first_band_bpb covers."""
    bands = row["long_context"]["bands"][1:]
    return f"{size_label(bands[0]['start'])}-{size_label(bands[-1]['end'])}" if bands else None


def copy_bpb(row: dict) -> dict[int, float]:
    """Bits per byte on the recalled copy by distance ({} for rows from before the probe)."""
    return {d["distance"]: d["copy_bpb"] for d in row.get("recall", {}).get("distances", [])}


def first_occurrence_bpb(row: dict) -> float | None:
    """Bits per byte on the probe's passages themselves (None for rows from before the probe)."""
    return row.get("recall", {}).get("first_bpb")


def farthest_copy_bpb(row: dict) -> float | None:
    copies = copy_bpb(row)
    return copies[max(copies)] if copies else None


def recall_summary(rows: list[dict]) -> dict:
    copies = [copy_bpb(r) for r in rows]
    distances = sorted({d for c in copies for d in c})
    return {
        "first_bpb": stats([bpb for bpb in map(first_occurrence_bpb, rows) if bpb]),
        "copy_bpb": {str(d): stats([c[d] for c in copies if d in c]) for d in distances},
    }


def passkey_accuracy(row: dict) -> dict[int, dict]:
    """{context: its passkey record} ({} for rows from before the passkey test)."""
    return {c["context"]: c for c in row.get("passkey", {}).get("contexts", [])}


def passkey_summary(rows: list[dict]) -> dict:
    """Per context: the stats of the accuracy (all digits right) and of the digits right."""
    measured = [passkey_accuracy(r) for r in rows]
    contexts = sorted({c for m in measured for c in m})
    return {
        str(c): {name: stats([m[c][name] for m in measured if c in m]) for name in ("accuracy", "digit_accuracy")}
        for c in contexts
    }


def arch_summary(rows: list[dict]) -> dict:
    bands = [band_bpb(r) for r in rows]
    labels = list(dict.fromkeys(label for b in bands for label in b))
    return {
        "seeds": [r["seed"] for r in rows],
        "parameters": rows[0]["parameters"],
        "steps": stats([r["settings"]["steps"] for r in rows]),
        "tokens": stats([r["tokens"] for r in rows]),
        "train_s": stats([r["train_s"] for r in rows]),
        "tokens_per_s": stats([r["tokens_per_s"] for r in rows if r["tokens_per_s"]]),
        "val_bpb": stats([r["val_bpb"] for r in rows]),
        "bands": {label: stats([b[label] for b in bands if label in b]) for label in labels},
        "long_context_notes": sorted({r["long_context"]["note"] for r in rows if "note" in r["long_context"]}),
        "recall": recall_summary(rows),
        "passkey": passkey_summary(rows),
        "curve": mean_curve(rows),
    }


def spread(summary: dict | None) -> float | None:
    """max - min over seeds; None with fewer than two."""
    return summary["max"] - summary["min"] if summary and summary["n"] > 1 else None


def delta_stats(pairs: list[tuple[dict, dict]], measure) -> dict | None:
    """stats of measure(ablation) - measure(full) over the (ablation, full) row pairs where
    both were measured (measure: row -> float or None)."""
    values = [(measure(r), measure(f)) for r, f in pairs]
    return stats([a - b for a, b in values if a is not None and b is not None])


def paired_passkey(pairs: list[tuple[dict, dict]]) -> dict | None:
    """The passkey accuracy of the ablation and of the full model over the (ablation, full)
    row pairs, at the longest context that every row of them measured; None if there is none."""
    measured = [(passkey_accuracy(r), passkey_accuracy(f)) for r, f in pairs]
    contexts = set.intersection(*(set(a) & set(f) for a, f in measured))
    if not contexts:
        return None
    context = max(contexts)
    return {
        "context": context,
        "ablation": stats([a[context]["accuracy"] for a, _ in measured]),
        "full": stats([f[context]["accuracy"] for _, f in measured]),
    }


def ablation_summary(groups: dict[str, list[dict]], archs: dict[str, dict]) -> list[dict]:
    """Each ablation minus the full model (mmrec) of the same seed, --config overrides,
    carried chunks and final phase (the rest of its label): validation, the positions past the first band
    (beyond the training windows), the farthest band and the farthest recalled copy."""
    ablations = []
    for full_label, full_rows in groups.items():
        if full_rows[0]["arch"] != "mmrec":
            continue
        overrides = full_label.removeprefix("mmrec")
        full = {r["seed"]: r for r in full_rows}
        full_bands = archs[full_label]["bands"]
        far_band = list(full_bands)[-1] if full_bands else None
        for arch, (_, removes) in ABLATIONS.items():
            pairs = [(r, full[r["seed"]]) for r in groups.get(arch + overrides, []) if r["seed"] in full]
            if not pairs:
                continue
            full_past = [bpb for bpb in map(past_first_band_bpb, full_rows) if bpb is not None]
            ablations.append(
                {
                    "arch": arch + overrides,
                    "full": full_label,
                    "removes": removes,
                    "seeds": [r["seed"] for r, _ in pairs],
                    "val_delta": delta_stats(pairs, lambda row: row["val_bpb"]),
                    "far_band": far_band,
                    "far_delta": delta_stats(pairs, farthest_bpb),
                    "past_band": past_first_band_label(full_rows[0]),
                    "past_delta": delta_stats(pairs, past_first_band_bpb),
                    "full_val_spread": spread(archs[full_label]["val_bpb"]),
                    "full_far_spread": spread(full_bands.get(far_band)),
                    "full_past_spread": spread(stats(full_past)),
                    "recall_delta": delta_stats(pairs, farthest_copy_bpb),
                    "first_delta": delta_stats(pairs, first_occurrence_bpb),
                    "passkey": paired_passkey(pairs),
                }
            )
    return ablations


def distinct(rows: list[dict], key: str) -> str:
    return ", ".join(sorted({str(r.get(key) or "-") for r in rows}))


def header_summary(rows: list[dict]) -> dict:
    """Where and with what the rows ran, and the settings that differ between them."""
    settings = [r["settings"] for r in rows]
    # The labels carry each MM-Rec row's --config overrides, --window and each row's carried
    # chunks, final phase and time budget (which sets the row's steps).
    labelled = ("config", "window", "carry_chunks", "final_steps", "final_seq_len", "time_budget")
    differing = sorted(
        name
        for name in settings[0]
        if name not in labelled
        and len({json.dumps(s.get(name)) for s in settings if name != "steps" or s.get("time_budget") is None}) > 1
    )
    budgeted = [r for r in rows if r["settings"].get("time_budget") is not None]
    return {
        "rows": len(rows),
        "device": distinct(rows, "device"),
        "torch": distinct(rows, "torch"),
        "triton": distinct(rows, "triton"),
        "dates": distinct(rows, "date"),
        "corpus": distinct(rows, "corpus"),
        "settings": settings[0],
        "differing_settings": differing,
        "carry_chunks": sorted({s.get("carry_chunks", 1) for s in settings}),
        "final_phase": any(s.get("final_steps", 0) for s in settings),
        "time_budgets": sorted({r["settings"]["time_budget"] for r in budgeted}),
        "budget_device": distinct(budgeted, "device") if budgeted else None,
    }


def summarize(rows: list[dict]) -> dict:
    groups = group_by_label(rows)
    archs = {label: arch_summary(label_rows) for label, label_rows in groups.items()}
    ablations = ablation_summary(groups, archs)
    return {"header": header_summary(rows), "archs": archs, "ablations": ablations}


def fmt_stats(summary: dict | None, spec: str = ".4f") -> str:
    """'mean [min, max]' ('mean' alone for one seed; '-' for none)."""
    if summary is None:
        return "-"
    if summary["n"] == 1:
        return format(summary["mean"], spec)
    return f"{summary['mean']:{spec}} [{summary['min']:{spec}}, {summary['max']:{spec}}]"


def beyond(delta: dict | None, full_spread: float | None) -> str:
    """Whether the ablation's mean loss increase exceeds the full model's spread between seeds."""
    if delta is None or full_spread is None:
        return "n/a"
    return "yes" if delta["mean"] > full_spread else "no"


def header_lines(summary: dict) -> list[str]:
    head = summary["header"]
    s = head["settings"]
    overrides = {**s["sizes"], **({} if s.get("window") is None else {"window": s["window"]})}
    sizes = "".join(f", {name} {value}" for name, value in overrides.items())
    lines = [
        "# Quality: MM-Rec, its ablations and Transformers trained alike",
        "",
        f"{head['rows']} rows (`python -m bench.quality run`); {head['device']}; torch {head['torch']}; "
        f"Triton {head['triton']}; dated {head['dates']}.",
        f"Preset {s['preset']}{sizes}; {s['steps']} steps of {s['batch_size']} x {s['seq_len']} bytes, "
        f"lr {s['lr']}, compiled: {s['compile']}; validation: {s['val_windows']} windows of {s['seq_len']} bytes; "
        f"long context: windows of {s['long_len']} bytes. Corpus: {head['corpus']}.",
        "Figures: mean over seeds, with [min, max] over seeds when there are several. Tokens/s are "
        "while training, with rows that ran side by side sharing one GPU: not a model's own speed "
        "(bench.model_gpu measures that).",
    ]
    if head["carry_chunks"] != [1]:
        lines.append(
            "Rows labelled +carryK trained on each group of K steps as K consecutive windows of the same "
            "streams, MM-Rec carrying its state (detached) from one to the next; the others, on "
            "independent windows."
        )
    if head.get("final_phase"):
        lines.append(
            "Rows labelled +finalLxN trained their last N steps on windows of L bytes (as many as make "
            "the same bytes a step); validation is on the windows of seq_len bytes for every row."
        )
    if head.get("time_budgets"):
        budgets = ", ".join(f"{seconds:g} s" for seconds in head["time_budgets"])
        lines.append(
            f"Rows labelled +budgetSs trained for a wall-clock budget of S seconds ({budgets}) on "
            f"{head['budget_device']}: as many steps as a timed warm-up of each phase said the budget holds "
            "(compiling and the warm-up not counted), the schedule set for them; their steps and training "
            "time are in the Validation table."
        )
    if head["differing_settings"]:
        lines.append(f"**The rows differ in settings: {', '.join(head['differing_settings'])}.**")
    return lines


def validation_lines(archs: dict) -> list[str]:
    return ["", "## Validation", ""] + markdown_table(
        ["arch", "seeds", "parameters", "steps", "training bytes", "training s", "tokens/s", "val bits/byte"],
        [
            [
                arch,
                str(len(a["seeds"])),
                f"{a['parameters'] / 1e6:.2f}M",
                fmt_stats(a["steps"], ",.0f"),
                f"{a['tokens']['mean'] / 1e6:.1f}M",
                fmt_stats(a["train_s"], ",.0f"),
                fmt_stats(a["tokens_per_s"], ",.0f"),
                fmt_stats(a["val_bpb"]),
            ]
            for arch, a in archs.items()
        ],
    )


def fmt_paired_passkey(paired: dict | None) -> str:
    """'95% -> 5% (64K)': the full model's passkey accuracy, then the ablation's (means)."""
    if paired is None:
        return "-"
    context = size_label(paired["context"])
    return f"{paired['full']['mean']:.0%} -> {paired['ablation']['mean']:.0%} ({context})"


def ablation_lines(ablations: list[dict]) -> list[str]:
    if not ablations:
        return []
    lines = [
        "",
        "## Ablations: the full model (mmrec) without one memory, seed by seed",
        "",
        "Δ = ablation - full model (bits/byte; > 0: the memory helps). Beyond spread: the mean Δ "
        "exceeds the full model's spread (max - min) between seeds (n/a with one seed). A memory "
        "recalls only as far as its Δ on a copy exceeds its Δ on the passage's first occurrence, "
        "which no memory can help. Passkey: the full model's accuracy, then the ablation's, at the "
        "longest context measured.",
        "",
    ]
    return lines + markdown_table(
        [
            "without",
            "arch",
            "seeds",
            "Δ val",
            "Δ past the first band",
            "Δ farthest band",
            "beyond spread (val, past first, far)",
            "Δ recall, farthest copy",
            "Δ first occurrence",
            "passkey, full -> without",
        ],
        [
            [
                a["removes"],
                a["arch"],
                str(len(a["seeds"])),
                fmt_stats(a["val_delta"], "+.4f"),
                f"{fmt_stats(a['past_delta'], '+.4f')} ({a['past_band'] or '-'})",
                f"{fmt_stats(a['far_delta'], '+.4f')} ({a['far_band'] or '-'})",
                f"{beyond(a['val_delta'], a['full_val_spread'])}, {beyond(a['past_delta'], a['full_past_spread'])}, "
                f"{beyond(a['far_delta'], a['full_far_spread'])}",
                fmt_stats(a.get("recall_delta"), "+.4f"),
                fmt_stats(a.get("first_delta"), "+.4f"),
                fmt_paired_passkey(a.get("passkey")),
            ]
            for a in ablations
        ],
    )


def long_context_lines(archs: dict) -> list[str]:
    labels = list(dict.fromkeys(label for a in archs.values() for label in a["bands"]))
    lines = ["", "## Long context: bits per byte by position", ""]
    if labels:
        band_rows = [[arch, *(fmt_stats(a["bands"].get(label)) for label in labels)] for arch, a in archs.items()]
        lines += markdown_table(["arch", *labels], band_rows)
    return lines + [f"{arch}: {note}" for arch, a in archs.items() for note in a["long_context_notes"]]


def recall_lines(archs: dict, settings: dict) -> list[str]:
    distances = sorted({int(d) for a in archs.values() for d in a["recall"]["copy_bpb"]})
    if not distances:
        return []
    lines = [
        "",
        "## Recall: bits per byte on a passage's copy, D bytes after the passage",
        "",
        f"Passages of {settings.get('probe_len')} bytes, {settings.get('probe_passages', 1)} per long document; "
        '"first": the passages themselves (never seen before). What a memory recalls shows as copies '
        "cheaper than without it.",
        "",
    ]
    return lines + markdown_table(
        ["arch", "first", *(f"D = {size_label(d)}" for d in distances)],
        [
            [
                arch,
                fmt_stats(a["recall"]["first_bpb"]),
                *(fmt_stats(a["recall"]["copy_bpb"].get(str(d))) for d in distances),
            ]
            for arch, a in archs.items()
            if a["recall"]["copy_bpb"]
        ],
    )


def fmt_passkey(measured: dict | None) -> str:
    """'95% (98%)': trials with every digit right, then digits right (mean); '-' if not measured."""
    if measured is None:
        return "-"
    return f"{fmt_stats(measured['accuracy'], '.0%')} ({measured['digit_accuracy']['mean']:.0%})"


def passkey_lines(archs: dict, settings: dict) -> list[str]:
    contexts = sorted({int(c) for a in archs.values() for c in a["passkey"]})
    if not contexts:
        return []
    lines = [
        "",
        "## Passkey: greedy recall of a 5-digit key stated once",
        "",
        "`# pass key: 48213` on a line at a depth in validation text, `# pass key: ` at the end of a "
        f"context of C bytes; {settings.get('passkey_trials')} trials a context, their depths spread evenly "
        "over it, the same trials for every row; the model's greedy 5 bytes against the key. Cells: the "
        "trials with all 5 digits right (the digits right). A model that keeps nothing of the statement "
        "guesses: about 0% (10% of the digits).",
        "",
    ]
    return lines + markdown_table(
        ["arch", *(f"C = {size_label(c)}" for c in contexts)],
        [
            [arch, *(fmt_passkey(a["passkey"].get(str(c))) for c in contexts)]
            for arch, a in archs.items()
            if a["passkey"]
        ],
    )


def render(summary: dict) -> str:
    archs, settings = summary["archs"], summary["header"]["settings"]
    lines = header_lines(summary) + validation_lines(archs) + ablation_lines(summary["ablations"])
    lines += long_context_lines(archs) + recall_lines(archs, settings) + passkey_lines(archs, settings)
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """Training curves, bits per byte by position band, and, where measured, the copy's bits
    per byte by distance and the passkey accuracy by context: means over seeds."""
    archs = summary["archs"]
    recalled = any(a["recall"]["copy_bpb"] for a in archs.values())
    keyed = any(a["passkey"] for a in archs.values())
    fig = Figure(figsize=(6.4 * (2 + recalled + keyed), 4.5))
    axes = list(fig.subplots(1, 2 + recalled + keyed))
    ax_curve, ax_bands = axes[:2]
    ax_recall = axes[2] if recalled else None
    ax_passkey = axes[-1] if keyed else None
    for arch, a in archs.items():
        ax_curve.plot(a["curve"]["step"], a["curve"]["bpb"], label=arch)
        if a["bands"]:
            means = [band["mean"] for band in a["bands"].values()]
            ax_bands.plot(range(len(means)), means, "o-", label=arch)
            ax_bands.set_xticks(range(len(means)), list(a["bands"]))
        if a["recall"]["copy_bpb"]:
            distances = [int(d) for d in a["recall"]["copy_bpb"]]
            ax_recall.plot(distances, [c["mean"] for c in a["recall"]["copy_bpb"].values()], "o-", label=arch)
        if a["passkey"]:
            contexts = [int(c) for c in a["passkey"]]
            ax_passkey.plot(contexts, [c["accuracy"]["mean"] for c in a["passkey"].values()], "o-", label=arch)
    ax_curve.set(title="training loss, mean over seeds", xlabel="step", ylabel="bits per byte")
    ax_bands.set(title="long context: bits per byte by position", xlabel="position band", ylabel="bits per byte")
    if ax_recall is not None:
        ax_recall.set(
            title="recall: bits per byte on a passage's copy",
            xlabel="bytes from the passage to its copy",
            ylabel="bits per byte",
            xscale="log",
        )
    if ax_passkey is not None:
        ax_passkey.set(
            title="passkey: trials with all 5 digits right",
            xlabel="context (bytes)",
            ylabel="accuracy",
            xscale="log",
            ylim=(-0.05, 1.05),
        )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report_command(args: argparse.Namespace) -> None:
    try:
        rows = load_rows(args.folder)
    except ValueError as err:
        sys.exit(f"bench.quality report: error: {err}")
    stem = args.out or args.folder / "report"
    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    table = render(summary)
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    plot(summary, stem.with_suffix(".png"))
    print(table)
