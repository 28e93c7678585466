"""What a row measures beyond validation: bits per byte by position on long validation
documents, and the recall of a passage copied D bytes after it."""

from __future__ import annotations

import torch

from bench.common import model_logits
from mmrec_model.training import Corpus, autocast, bits_per_byte, token_losses
from mmrec_model.training.data import validation_documents

from .settings import Settings, probe_distances

MIN_LONG_DOCS = 2  # fewer documents than this measure one text, not long context


def position_bands(length: int) -> list[tuple[int, int]]:
    """[0, L/16), [L/16, L/4), [L/4, L): 0-2K, 2K-8K, 8K-32K at L = 32768."""
    return [(0, length // 16), (length // 16, length // 4), (length // 4, length)]


def size_label(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def long_windows(documents: list[bytes], corpus: Corpus, length: int, count: int) -> list[torch.Tensor]:
    """The first length + 1 bytes (int64) of each validation document that has them, at most `count`."""
    starts = [start for start, size in validation_documents(documents) if size >= length + 1][:count]
    return [corpus.val[start : start + length + 1].long() for start in starts]


@torch.no_grad()
def position_losses(model, windows: list[torch.Tensor], chunk_size: int, autocast_dtype) -> torch.Tensor:
    """Next-byte loss at every position of each window (all of length L + 1), [windows, L],
    in one batch."""
    device = next(model.parameters()).device
    model.eval()
    ids = torch.stack(windows).to(device)
    with autocast(device, autocast_dtype):
        logits = model_logits(model, ids[:, :-1], chunk_size)
    return token_losses(logits, ids[:, 1:])


def long_context(model, documents: list[bytes], corpus: Corpus, settings: Settings, autocast_dtype) -> dict:
    """Bits per byte by position band on the long validation documents (or a note why not)."""
    length = settings.long_len
    windows = long_windows(documents, corpus, length, settings.long_docs)
    measured = {"length": length, "documents": len(windows), "bands": []}
    if len(windows) < MIN_LONG_DOCS:
        measured["note"] = (
            f"not measured: {len(windows)} validation document(s) of {corpus.source} hold "
            f"{length + 1} bytes, fewer than {MIN_LONG_DOCS}"
        )
        return measured
    losses = position_losses(model, windows, settings.chunk_size, autocast_dtype)
    for start, end in position_bands(length):
        band = {"band": f"{size_label(start)}-{size_label(end)}", "start": start, "end": end}
        measured["bands"].append({**band, "bpb": bits_per_byte(losses[:, start:end].mean().item())})
    return measured


def recall_sequence(window: torch.Tensor, offset: int, distance: int, passage_len: int) -> torch.Tensor:
    """The window's first offset + distance bytes, then again its bytes [offset, offset + P)
    (P = passage_len): the passage that starts at offset, copied to start `distance` bytes later."""
    return torch.cat([window[: offset + distance], window[offset : offset + passage_len]])


def probe_offsets(settings: Settings) -> list[int]:
    """Where the recalled passages start: --probe-passages offsets evenly spaced from P on,
    the last one leaving room for the passage's copy at the largest distance (probe_distances')."""
    P, count = settings.probe_len, settings.probe_passages
    last = settings.long_len + 1 - max(probe_distances(settings)) - P
    return [P + (last - P) * i // max(count - 1, 1) for i in range(count)]


def recall(model, documents: list[bytes], corpus: Corpus, settings: Settings, autocast_dtype) -> dict:
    """Bits per byte on a passage's second occurrence, at each distance from its first, and
    on its first occurrence (the same bytes, never seen before), on the long documents."""
    windows = long_windows(documents, corpus, settings.long_len, settings.long_docs)
    P = settings.probe_len
    offsets = probe_offsets(settings)
    measured = {"passage_len": P, "documents": len(windows), "offsets": offsets, "first_bpb": None, "distances": []}
    if len(windows) < MIN_LONG_DOCS:
        measured["note"] = f"not measured: {len(windows)} long validation document(s), fewer than {MIN_LONG_DOCS}"
        return measured
    firsts = []
    for distance in probe_distances(settings):
        copies = []
        for offset in offsets:
            sequences = [recall_sequence(window, offset, distance, P) for window in windows]
            # The loss at i predicts byte i + 1: the passage is bytes [o, o + P), its copy [o + D, o + D + P).
            losses = position_losses(model, sequences, settings.chunk_size, autocast_dtype)
            firsts.append(losses[:, offset - 1 : offset + P - 1])
            copies.append(losses[:, offset + distance - 1 : offset + distance + P - 1])
        measured["distances"].append({"distance": distance, "copy_bpb": bits_per_byte(torch.cat(copies).mean().item())})
    # Each distance reads the same first occurrences (causal: the bytes before them are the same).
    measured["first_bpb"] = bits_per_byte(torch.cat(firsts).mean().item())
    return measured
