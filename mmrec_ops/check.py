"""Status report of MM-Rec's compiled operator library.

    python -m mmrec_ops.check          # human-readable
    python -m mmrec_ops.check --json   # for machines
    mmrec-check                        # console script, same

Reports the library file (load status, path, size, mtime, SHA256), the package
version and torch version it was built with against the running ones, each
operator's registered dispatch keys, the Triton version, the path by which
the CUDA kernels are launched with it and whether they can run here. Exit
status 1 when something required is missing.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import mmrec_ops
from mmrec_ops import _library

# Dispatch keys each operator must have (CUDA kernels are Triton launchers,
# registered from Python, and run only where a CUDA device and Triton are).
REQUIRED_KEYS = {
    "scan": ("CPU", "CUDA", "Meta", "Autograd"),
    "scan_backward": ("CPU", "CUDA", "Meta", "Autograd"),
    "recurrence": ("CPU", "CUDA", "Meta", "Autograd"),
    # The Autograd kernels of recurrence_backward, memory_read_backward and
    # segment_read_backward refuse second derivatives by name.
    "recurrence_backward": ("CPU", "CUDA", "Meta", "Autograd"),
    "decode_read": ("CPU", "CUDA", "Meta", "Autograd"),
    "memory_read": ("CPU", "CUDA", "Meta", "Autograd"),
    "memory_read_backward": ("CPU", "CUDA", "Meta", "Autograd"),
    "segment_read": ("CPU", "CUDA", "Meta", "Autograd"),
    "segment_read_backward": ("CPU", "CUDA", "Meta", "Autograd"),
    "skinny_addmm": ("CPU", "CUDA", "Meta", "Autograd"),
}
REPORTED_KEYS = ("CPU", "CUDA", "Meta", "Autograd")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_report() -> dict:
    lib = mmrec_ops._C
    candidates = _library.library_candidates()
    path = Path(lib.__file__) if lib is not None else (candidates[0] if candidates else None)
    report = {
        "loaded": lib is not None,
        "load_error": _library.LOAD_ERROR,
        "path": str(path) if path else None,
        "built_version": getattr(lib, "built_version", None),
        "built_with_torch": getattr(lib, "built_with_torch", None),
    }
    if lib is None and path is not None and path.is_file():  # read from the file that did not load
        report["built_with_torch"] = _library.recorded_torch_version(path)
    if path is not None and path.exists():
        stat = path.stat()
        report["size_bytes"] = stat.st_size
        report["mtime"] = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc).isoformat()
        report["sha256"] = sha256(path)
    return report


def ops_report() -> dict:
    ops = {}
    for name in REQUIRED_KEYS:
        qualname = f"mmrec::{name}"
        exists = torch._C._dispatch_has_kernel(qualname) if hasattr(torch._C, "_dispatch_has_kernel") else True
        keys = {
            key: bool(exists) and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key) for key in REPORTED_KEYS
        }
        ops[name] = keys
    return ops


def triton_report() -> dict:
    """Triton's version and the launch path the CUDA kernels take with it
    (mmrec_ops/triton/_common.py: launched directly, or through
    JITFunction.run)."""
    try:
        import triton

        from mmrec_ops.triton._common import launch_path
    except ImportError as err:
        return {"version": None, "launch_path": None, "error": f"{type(err).__name__}: {err}"}
    return {"version": triton.__version__, "launch_path": launch_path(), "error": None}


def cuda_report(triton: dict, ops: dict) -> dict:
    available = torch.cuda.is_available()
    registered = all(keys["CUDA"] for keys in ops.values())
    reasons = []
    if not available:
        reasons.append("no CUDA device visible to torch")
    if triton["version"] is None:
        reasons.append("Triton is not importable")
    if not registered:
        reasons.append("CUDA kernels are not registered for every op")
    return {
        "device_available": available,
        "device_name": torch.cuda.get_device_name(0) if available else None,
        "kernels_registered": registered,
        "kernels_can_run": not reasons,
        "reasons": reasons,
    }


def collect() -> dict:
    library = library_report()
    ops = ops_report()
    triton = triton_report()
    cuda = cuda_report(triton, ops)
    problems = []
    if not library["loaded"]:
        problems.append(f"compiled library not loaded ({library['load_error']}); {_library.build_help()}")
    else:
        if library["built_with_torch"] != torch.__version__:
            problems.append(_library.torch_mismatch_message(library["built_with_torch"], torch.__version__))
        if library["built_version"] != mmrec_ops.__version__:
            problems.append(
                f"library built for mmrec {library['built_version']}, package is {mmrec_ops.__version__}: rebuild it"
            )
        for name, required in REQUIRED_KEYS.items():
            missing = [key for key in required if not ops[name][key]]
            if missing:
                problems.append(f"mmrec::{name} has no kernel for {', '.join(missing)}")
    if cuda["device_available"] and not cuda["kernels_can_run"]:
        problems.append(f"a CUDA device is present but the CUDA kernels cannot run: {'; '.join(cuda['reasons'])}")
    return {
        "package_version": mmrec_ops.__version__,
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "library": library,
        "ops": ops,
        "triton": triton,
        "cuda": cuda,
        "problems": problems,
        "ok": not problems,
    }


def render(report: dict) -> str:
    lib = report["library"]
    status = "loaded" if lib["loaded"] else "NOT LOADED"
    lines = [
        "MM-Rec extension status",
        f"  package version   {report['package_version']}",
        f"  torch (running)   {report['torch_version']}",
        "",
        f"mmrec_ops._C        {status}",
    ]
    if lib["load_error"]:
        lines.append(f"  error             {lib['load_error']}")
    for label, key in (
        ("path", "path"),
        ("size (bytes)", "size_bytes"),
        ("mtime (UTC)", "mtime"),
        ("SHA256", "sha256"),
        ("built version", "built_version"),
        ("built with torch", "built_with_torch"),
    ):
        value = lib.get(key)
        lines.append(f"  {label:<17} {value if value is not None else '-'}")
    width = max(len("mmrec::" + name) for name in report["ops"]) + 2
    lines += ["", f"{'operators':<{width + 2}}" + "  ".join(f"{k:<8}" for k in REPORTED_KEYS)]
    for name, keys in report["ops"].items():
        marks = "  ".join(f"{'yes' if keys[k] else 'no':<8}" for k in REPORTED_KEYS)
        lines.append(f"  {'mmrec::' + name:<{width}}{marks}")
    triton, cuda = report["triton"], report["cuda"]
    lines += [
        "",
        f"triton              {triton['version'] or 'not installed'}",
        f"  launch path       {triton['launch_path'] or '-'}",
        f"CUDA device         {cuda['device_name'] or 'none'}",
        f"CUDA kernels run    {'yes' if cuda['kernels_can_run'] else 'no (' + '; '.join(cuda['reasons']) + ')'}",
        "",
    ]
    if report["problems"]:
        lines.append("PROBLEMS")
        lines += [f"  - {p}" for p in report["problems"]]
    else:
        lines.append("OK: everything required is present")
    return os.linesep.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmrec-check", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
