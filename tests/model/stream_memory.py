"""Peak memory of streaming tokens through a tiny MMRecModel, chunk by chunk.

    python -m tests.model.stream_memory N_TOKENS CHUNK

Prints the growth of the process's peak resident memory (MiB) from just before the
first chunk to the end. Run in a fresh process by test_long, since the peak of a
process only grows, with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_):
large tensors are then mapped and unmapped on their own, so the peak resident
memory follows the peak of live tensors instead of heap fragmentation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mmrec_model import MMRecConfig, MMRecModel


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss, which
    keeps the peak of the parent that forked it across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (this measurement needs Linux)")


def main() -> None:
    n_tokens, chunk = int(sys.argv[1]), int(sys.argv[2])
    # A store of 8192 tokens, wrapped many times over.
    model = MMRecModel(MMRecConfig.preset("tiny", memory_tokens=8192, top_k=2))
    ids = torch.randint(0, 256, (1, n_tokens))
    baseline = peak_rss_mib()
    state = None
    with torch.no_grad():
        for part in ids.split(chunk, dim=1):
            _, state = model(part, state)
    print(peak_rss_mib() - baseline)


if __name__ == "__main__":
    main()
