"""MM-Rec in Hugging Face transformers (the ``hf`` extra: ``pip install "mmrec[hf]"``).

    import mmrec_model                         # registers "mmrec" with the Auto classes
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder)    # an MMRecForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(folder)       # an MMRecByteTokenizer
    out = model.generate(**tokenizer("def main(", return_tensors="pt"), max_new_tokens=100)

``mmrec-export RUN_DIR OUT_DIR`` makes such a folder of a pretrain run (``export_run``).
Importing this module registers the classes with AutoConfig, AutoModelForCausalLM and
AutoTokenizer; ``import mmrec_model`` does it when transformers is first imported
(``mmrec_model.hf_registration``).
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .config import MMRecHFConfig
from .export import export_run
from .modeling import MMRecCache, MMRecCausalLMOutput, MMRecForCausalLM
from .tokenizer import MMRecByteTokenizer

AutoConfig.register(MMRecHFConfig.model_type, MMRecHFConfig, exist_ok=True)
AutoModelForCausalLM.register(MMRecHFConfig, MMRecForCausalLM, exist_ok=True)
AutoTokenizer.register(MMRecHFConfig, tokenizer_class=MMRecByteTokenizer, exist_ok=True)

__all__ = [
    "MMRecByteTokenizer",
    "MMRecCache",
    "MMRecCausalLMOutput",
    "MMRecForCausalLM",
    "MMRecHFConfig",
    "export_run",
]
