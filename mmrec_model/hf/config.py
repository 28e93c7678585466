"""MMRecHFConfig: an ``MMRecConfig`` as a transformers configuration (config.json)."""

from __future__ import annotations

import dataclasses

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ..config import MMRecConfig


@strict
class MMRecHFConfig(PreTrainedConfig):
    """The transformers configuration of an ``MMRecForCausalLM`` (model_type "mmrec").

    ``mmrec`` holds the ``MMRecConfig`` fields (checked by it; missing ones take its
    defaults). They are kept apart from the top level, where transformers reads names such
    as ``top_k`` as generation settings.
    """

    model_type = "mmrec"

    mmrec: dict | None = None

    def __post_init__(self, **kwargs):
        self.mmrec = dataclasses.asdict(MMRecConfig(**(self.mmrec or {})))
        super().__post_init__(**kwargs)

    @classmethod
    def from_mmrec(cls, config: MMRecConfig, **kwargs) -> MMRecHFConfig:
        return cls(mmrec=dataclasses.asdict(config), **kwargs)

    def mmrec_config(self) -> MMRecConfig:
        return MMRecConfig(**self.mmrec)

    @property
    def vocab_size(self) -> int:
        return self.mmrec["vocab_size"]
