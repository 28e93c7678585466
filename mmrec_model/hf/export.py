"""A pretrain run as a transformers model folder: weights, config and tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..training import load_model
from .modeling import MMRecForCausalLM
from .tokenizer import MMRecByteTokenizer


def export_run(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes the model of ``run`` (a pretrain run folder or its checkpoint file) to the new
    or empty folder ``out``: model.safetensors, config.json, generation_config.json and the
    tokenizer's files, for ``AutoModelForCausalLM.from_pretrained(out)`` and
    ``AutoTokenizer.from_pretrained(out)``. A ValueError for a folder that already holds
    files, a CheckpointError (a ValueError) for a run that has no usable checkpoint."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"OUT_DIR {out}: expected a new or empty folder, got one that exists with files in it")
    model = MMRecForCausalLM.from_mmrec(load_model(run, torch.device("cpu")))
    model.save_pretrained(out)
    MMRecByteTokenizer().save_pretrained(out)
    return out
