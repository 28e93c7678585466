"""Sweep of the Triton scan's launch configuration on a GPU (a development tool).

    python bench/tune_scan.py --out tune.json

For each dtype and each candidate configuration (the module-level knobs of
mmrec_ops/triton/scan.py), checks the result against the C++ CPU kernel and
times forward and backward at [8, 4096, 16, 64] with CUDA events; prints the
configurations sorted by forward+backward time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mmrec_ops  # noqa: E402,F401  (registers the ops the check uses)
from bench.common import median_time_ms  # noqa: E402
from mmrec_ops.triton import scan as triton_scan  # noqa: E402

KNOBS = {
    "_MIN_PROGRAMS_PER_SM": [1, 4, 8],
    "_ROWS": [4, 8, 16],
    "_NUM_WARPS": [4, 8],
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 4096, 16, 64])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    B, T, H, d = args.shape
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        gamma = torch.rand(B, T, H, d, device="cuda", dtype=dtype)
        x = torch.randn(B, T, H, d, device="cuda", dtype=dtype)
        grad = torch.randn(B, T, H, d, device="cuda", dtype=dtype)
        ref = torch.ops.mmrec.scan(gamma.cpu(), x.cpu())
        ref_bwd = torch.ops.mmrec.scan_backward(grad.cpu(), gamma.cpu(), ref, None, True, False)
        h = ref.cuda()
        for values in itertools.product(*KNOBS.values()):
            config = dict(zip(KNOBS, values))
            for name, value in config.items():
                setattr(triton_scan, name, value if name != "_ROWS" else {8: value // 2 or 1, 4: value, 2: value})
            triton_scan._clear_plans()  # the launch plans are cached per shape and knob values
            out = triton_scan.scan_forward(gamma, x, None, False)
            bwd = triton_scan.scan_backward(grad, gamma, h, None, True, False)
            err = max(rel_err(out.cpu(), ref), *(rel_err(a.cpu(), b) for a, b in zip(bwd[:2], ref_bwd[:2])))
            fwd_us = 1e3 * median_time_ms(lambda: triton_scan.scan_forward(gamma, x, None, False), "cuda", 1, 20)
            bwd_us = 1e3 * median_time_ms(lambda: triton_scan.scan_backward(grad, gamma, h, None, True, False), "cuda", 1, 20)
            row = {"dtype": str(dtype), **config, "fwd_us": fwd_us, "bwd_us": bwd_us, "err_vs_cpu": err}
            results.append(row)
            print(json.dumps(row), flush=True)
    for dtype in ("torch.bfloat16", "torch.float32"):
        rows = sorted((r for r in results if r["dtype"] == dtype), key=lambda r: r["fwd_us"] + r["bwd_us"])
        print(f"\nbest for {dtype} (fwd, bwd, fwd+bwd in us):")
        for r in rows[:8]:
            knobs = {k: r[k] for k in KNOBS}
            print(f"  {r['fwd_us']:7.1f} {r['bwd_us']:7.1f} {r['fwd_us'] + r['bwd_us']:7.1f}  err {r['err_vs_cpu']:.1e}  {knobs}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
