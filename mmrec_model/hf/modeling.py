"""MMRecForCausalLM: an ``MMRecModel`` as a transformers causal language model, its
``MemoryState`` as the cache that ``generate`` carries from token to token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from ..decode import Decoder
from ..memory import MemoryState
from ..model import MMRecModel
from .config import MMRecHFConfig


class MMRecCache:
    """The model's ``MemoryState`` in the place of transformers' key-value cache.

    Its size is fixed whatever the context, so ``generate`` reads the prompt once and each
    new token then costs one step of O(1) work: from the first one-token step on, a
    ``Decoder`` holds the state in fixed buffers that each step updates in place (the
    model's own generation step, with CUDA graphs on CUDA), and ``state`` reads it back.
    It cannot be cropped (assisted decoding needs that); beam search reorders its rows.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, state: MemoryState):
        self._state: MemoryState | None = state
        self._decoder: Decoder | None = None

    @property
    def state(self) -> MemoryState:
        return self._state if self._decoder is None else self._decoder.state()

    @state.setter
    def state(self, state: MemoryState) -> None:
        self._state, self._decoder = state, None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read so far (the same in every layer)."""
        return int(self._state.position) if self._decoder is None else self._decoder.position

    def step(self, model: MMRecModel, ids: Tensor) -> Tensor:
        """ids ``[B, 1]``, one token a row -> logits ``[B, 1, V]``; the state advances in place."""
        if self._decoder is None:
            on_cuda = self._state.position.device.type == "cuda"
            self._decoder, self._state = Decoder(model, self._state, cuda_graphs=on_cuda), None
        return self._decoder.step(ids).unsqueeze(1)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Row b of the state becomes row ``beam_idx[b]`` of the old one (beam search)."""
        state = self.state
        blocks = tuple(type(block)(*(t.index_select(0, beam_idx) for t in block)) for block in state.blocks)
        reordered = MemoryState(state.position, blocks)
        if self._decoder is None:
            self._state = reordered
        else:
            self._decoder.load(reordered)


@dataclass
class MMRecCausalLMOutput(ModelOutput):
    """loss: mean cross-entropy of next-token prediction (when labels are given); logits
    ``[B, T, V]``; cache: the state after the tokens, to continue from."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: MMRecCache | None = None


class MMRecForCausalLM(PreTrainedModel, GenerationMixin):
    """``MMRecModel`` (``self.model``) behind transformers' causal-LM interface:
    ``from_pretrained``/``save_pretrained`` (safetensors), ``generate``, pipelines.

    The output head is the embedding (``MMRecModel.head``): the weights hold it once.
    """

    config_class = MMRecHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MMRecBlock"]

    def __init__(self, config: MMRecHFConfig):
        super().__init__(config)
        self.model = MMRecModel(config.mmrec_config())
        self.post_init()

    @classmethod
    def from_mmrec(cls, model: MMRecModel) -> MMRecForCausalLM:
        """A wrapper of ``model``'s configuration holding a copy of its weights."""
        wrapper = cls(MMRecHFConfig.from_mmrec(model.config))
        wrapper.model.load_state_dict(model.state_dict())
        return wrapper.to(next(model.parameters()).device)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate starts with no cache; forward makes the MMRecCache (as RWKV and xLSTM).
        return False

    def _init_weights(self, module: nn.Module) -> None:
        # MMRecModel's own initialisation, which covers every parameter: transformers
        # calls this on each submodule, children first.
        if isinstance(module, MMRecModel):
            module.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: MMRecCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MMRecCausalLMOutput | tuple:
        """input_ids ``[B, T]`` after the tokens that ``cache`` read (None: the start of the
        sequences) -> logits ``[B, T, V]`` and the cache after them: ``cache`` itself,
        updated, or a new one (None if ``use_cache`` is False). ``labels`` ``[B, T]``: the loss of predicting each token from those
        before it (-100: ignored). ``attention_mask`` may not mask a prompt token: a
        recurrent state reads every token, so padded batches are refused. Other inputs
        transformers passes (such as position_ids) are unused: the state holds the position.
        ``return_dict`` (default: the config's): an MMRecCausalLMOutput, else its tuple.
        """
        if input_ids is None:
            raise ValueError("MMRecForCausalLM: expected input_ids (inputs_embeds are not supported)")
        if kwargs.get("past_key_values") is not None:
            raise ValueError("MMRecForCausalLM: expected the state as cache=, got past_key_values=")
        if cache is not None and not isinstance(cache, MMRecCache):
            raise ValueError(
                f"MMRecForCausalLM: expected cache to be an MMRecCache or None, got {type(cache).__name__}"
            )
        # Only the prompt can be padded: later steps add ones to the mask.
        if cache is None and attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "MMRecForCausalLM: expected an attention_mask of ones (a recurrent model reads every token, so "
                "padded prompts are not supported); give prompts of equal length"
            )
        if use_cache is False:
            logits, _ = self.model(input_ids, None if cache is None else cache.state)
            cache = None
        elif cache is not None and input_ids.shape[1] == 1 and not torch.is_grad_enabled():
            logits = cache.step(self.model, input_ids)  # generate's steps
        else:
            logits, state = self.model(input_ids, None if cache is None else cache.state)
            if cache is None:
                cache = MMRecCache(state)
            else:
                cache.state = state  # in place, as transformers' caches are
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        output = MMRecCausalLMOutput(loss, logits, cache)
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()
