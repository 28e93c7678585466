"""MM-Rec language model (DESIGN.md section 2).

    from mmrec_model import MMRecConfig, MMRecModel
    model = MMRecModel(MMRecConfig.preset("tiny", mode="parallel"))
    logits, state = model(ids)                 # ids [B, T] int64 -> logits [B, T, 256]
    logits, state = model(next_ids, state)     # continue; same logits as one long call
    out = model.generate(prompt_ids, 100)      # [B, T0 + 100]

The names are imported on first use, so that `python -m mmrec_model.pretrain`
can report a missing operator library (mmrec_ops) with its own fatal message.
"""

import importlib

_EXPORTS = {
    "BlockState": ".memory",
    "MDI": ".mdi",
    "MMRecBlock": ".block",
    "MMRecConfig": ".config",
    "MMRecModel": ".model",
    "MultiMemoryAttention": ".attention",
    "MemoryState": ".memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'mmrec_model' has no attribute {name!r}")


def __dir__():
    return __all__
