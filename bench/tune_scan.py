"""Sweep of the Triton scan's launch knobs on a GPU (a development tool).

    python -m bench.tune_scan --out tune.json

For each dtype and kernel (forward, backward), each candidate _Tuning of
mmrec_ops/triton/scan.py (steps per thread R, warps, tile size, pipeline
stages) and channel-block narrowing (_MIN_PROGRAMS_PER_SM): checks the result
against the C++ CPU kernel and times the launcher at [8, 4096, 16, 64] with
CUDA events; prints the fastest settings per dtype and kernel. The chosen ones
go into _FWD_TUNING and _BWD_TUNING by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

import mmrec_ops  # noqa: F401  (registers the ops the check uses)
from bench.common import median_time_ms, versions
from mmrec_ops.triton import scan as triton_scan

# Candidates per (dtype, kernel): R, num_warps, tile elements, stages, programs
# per SM; the first of each is the shipped setting.
GRIDS = {
    (torch.bfloat16, "forward"): dict(
        rows=[8, 4], num_warps=[4, 8], tile=[8192, 16384], stages=[3, 2], per_sm=[0.5, 1]
    ),
    (torch.bfloat16, "backward"): dict(
        rows=[4, 2], num_warps=[8, 4], tile=[4096, 8192], stages=[0, 3], per_sm=[0.5, 1]
    ),
    (torch.float32, "forward"): dict(rows=[4, 8], num_warps=[8, 4], tile=[4096], stages=[3, 2], per_sm=[0.5, 1]),
    (torch.float32, "backward"): dict(rows=[4, 2], num_warps=[8, 4], tile=[4096], stages=[0], per_sm=[0.5, 1]),
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sweep(dtype, shape):
    gamma = torch.rand(shape, device="cuda", dtype=dtype)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    grad = torch.randn(shape, device="cuda", dtype=dtype)
    ref = torch.ops.mmrec.scan(gamma.cpu(), x.cpu())
    ref_bwd = torch.ops.mmrec.scan_backward(grad.cpu(), gamma.cpu(), ref, None, True, False)
    h = ref.cuda()
    calls = {
        "forward": (lambda: triton_scan.scan_forward(gamma, x, None, False), [ref]),
        "backward": (lambda: triton_scan.scan_backward(grad, gamma, h, None, True, False), ref_bwd),
    }
    tunings = {"forward": triton_scan._FWD_TUNING, "backward": triton_scan._BWD_TUNING}
    size, default_per_sm = dtype.itemsize, triton_scan._MIN_PROGRAMS_PER_SM[dtype.itemsize]
    for kernel, (call, refs) in calls.items():
        grid = GRIDS[(dtype, kernel)]
        default = tunings[kernel][size]
        for rows, num_warps, tile, stages, per_sm in itertools.product(*grid.values()):
            tunings[kernel][size] = triton_scan._Tuning(rows, num_warps, tile, stages)
            triton_scan._MIN_PROGRAMS_PER_SM[size] = per_sm
            triton_scan._clear_plans()  # the launch plans are cached per shape and knobs
            row = dict(
                dtype=str(dtype), kernel=kernel, rows=rows, num_warps=num_warps, tile=tile, stages=stages, per_sm=per_sm
            )
            try:
                out = call()
            except Exception as err:  # e.g. out of registers or shared memory: report, go on
                row["error"] = f"{type(err).__name__}: {err}"[:300]
                print(json.dumps(row), flush=True)
                yield row
                continue
            outs = out if isinstance(out, tuple) else (out,)
            row["err_vs_cpu"] = max(rel_err(a.cpu(), b) for a, b in zip(outs, refs))
            row["us"] = round(1e3 * median_time_ms(call, "cuda", 2, 15), 1)
            print(json.dumps(row), flush=True)
            yield row
        tunings[kernel][size] = default
        triton_scan._MIN_PROGRAMS_PER_SM[size] = default_per_sm
        triton_scan._clear_plans()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 4096, 16, 64])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [row for dtype in (torch.bfloat16, torch.float32) for row in sweep(dtype, tuple(args.shape))]
    for dtype, kernel in GRIDS:
        rows = sorted(
            (r for r in results if (r["dtype"], r["kernel"]) == (str(dtype), kernel) and "us" in r),
            key=lambda r: r["us"],
        )
        print(f"\nfastest {kernel} for {dtype} (us; rows, num_warps, tile, stages, programs per SM):")
        for r in rows[:6]:
            print(
                f"  {r['us']:7.1f}  err {r['err_vs_cpu']:.1e}  {r['rows']}, {r['num_warps']}, {r['tile']}, {r['stages']}, {r['per_sm']}"
            )
    if args.out:
        info = {
            **versions("cuda"),
            "shape": args.shape,
            "command": "python -m bench.tune_scan",
            "how": "launchers alone, bench.common.median_time_ms; err_vs_cpu: relative error (norm) of the "
            "outputs against the C++ CPU kernel on the same inputs",
        }
        args.out.write_text(json.dumps({"info": info, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
