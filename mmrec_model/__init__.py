"""MM-Rec language model (docs/design.md section 2).

from mmrec_model import MMRecConfig, MMRecModel
model = MMRecModel(MMRecConfig.preset("tiny", mode="parallel"))
logits, state = model(ids)                 # ids [B, T] int64 -> logits [B, T, 256]
logits, state = model(next_ids, state)     # continue; same logits as one long call
out = model.generate(prompt_ids, 100)      # [B, T0 + 100]

With transformers installed, the model is also a transformers model ("mmrec"): see
``mmrec_model.hf``, registered with the Auto classes once transformers is imported.
"""

from .config import MMRecConfig
from .hf_registration import register_with_transformers
from .memory import BlockState, MemoryState, PackedState
from .model import MDI, MMRecBlock, MMRecModel, MultiMemoryAttention

register_with_transformers()

__all__ = [
    "BlockState",
    "MDI",
    "MMRecBlock",
    "MMRecConfig",
    "MMRecModel",
    "MemoryState",
    "MultiMemoryAttention",
    "PackedState",
]
