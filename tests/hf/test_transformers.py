"""mmrec_model.hf: the model in transformers' generate, pipelines and Auto classes, its
weights through safetensors, and the byte tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from mmrec_model import MMRecModel  # noqa: E402
from mmrec_model.hf import MMRecByteTokenizer, MMRecForCausalLM  # noqa: E402
from tests.helpers import assert_close_rel, output_tolerance  # noqa: E402
from tests.model.models import small_config  # noqa: E402
from tests.pretrain.cli import REPO, environment  # noqa: E402

pytestmark = [pytest.mark.model, pytest.mark.hf]

# Past the window (20 tokens) and through the long-term store (64 tokens), which wraps.
PROMPT = "def mean(values):\n    return "
NEW_TOKENS = 60


@pytest.fixture
def model() -> MMRecModel:
    """Random weights spread wide enough (init_std 0.3) that the likeliest byte leads the
    next one by far more than float rounding: greedy choices do not hang on it."""
    return MMRecModel(small_config("exact", init_std=0.3)).eval()


@pytest.fixture
def folder(tmp_path, model):
    out = tmp_path / "hf"
    MMRecForCausalLM.from_mmrec(model).save_pretrained(out)
    MMRecByteTokenizer().save_pretrained(out)
    return out


def prompt_ids(rows: int = 1) -> torch.Tensor:
    return torch.tensor([list(PROMPT.encode())] * rows)


def test_greedy_generation_equals_the_models_own(model):
    ids = torch.cat([prompt_ids(), prompt_ids().flip(1)])
    expected = model.generate(ids, NEW_TOKENS, temperature=0)
    out = MMRecForCausalLM.from_mmrec(model).generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.tolist() == expected.tolist()


def test_each_steps_logits_are_those_of_the_whole_sequence(model):
    """The cache carries everything: a step's logits, from the state, equal one call's over all the tokens."""
    ids = prompt_ids(2)
    out = MMRecForCausalLM.from_mmrec(model).generate(
        ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    full, _ = model(out.sequences)
    steps = torch.stack(out.logits, dim=1)
    assert_close_rel(steps, full[:, ids.shape[1] - 1 : -1], output_tolerance(torch.float32), "logits of each step")


def test_generate_reads_the_prompt_once_then_one_token_a_step(model):
    """After the prompt, each step is the decoder's, in place: the model's forward (which
    returns a new state) runs once."""
    wrapper = MMRecForCausalLM.from_mmrec(model)
    inputs, model_calls = [], []
    wrapper.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    wrapper.model.register_forward_pre_hook(lambda m, args: model_calls.append(args[0].shape[1]))
    wrapper.generate(prompt_ids(), max_new_tokens=10, do_sample=False)
    assert inputs == [len(PROMPT)] + [1] * 9
    assert model_calls == [len(PROMPT)]


def test_generate_continues_from_a_returned_cache(model):
    """A second generate given the first's sequences and cache reads only the token the cache has not seen."""
    wrapper = MMRecForCausalLM.from_mmrec(model)
    first = wrapper.generate(prompt_ids(), max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    second = wrapper.generate(first.sequences, cache=first.cache, max_new_tokens=18, do_sample=False)
    assert second.tolist() == wrapper.generate(prompt_ids(), max_new_tokens=30, do_sample=False).tolist()


def test_beam_search_with_the_state_equals_beam_search_recomputing_it(model):
    """Beam search reorders the cache's rows; without a cache each step reads the whole sequence."""
    wrapper = MMRecForCausalLM.from_mmrec(model)
    settings = dict(max_new_tokens=12, num_beams=3, do_sample=False)
    with_cache = wrapper.generate(prompt_ids(), **settings)
    assert with_cache.tolist() == wrapper.generate(prompt_ids(), use_cache=False, **settings).tolist()


def test_forward_gives_the_models_logits_and_the_next_token_loss(model):
    ids = prompt_ids(2)
    out = MMRecForCausalLM.from_mmrec(model)(ids, labels=ids)
    logits, _ = model(ids)
    assert torch.equal(out.logits, logits)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_forward_continues_from_the_cache_it_returned(model):
    """Chunks through the model's forward and, without gradients, single tokens through the
    decoder, all continuing one cache, give the logits of one call over the whole sequence."""
    wrapper = MMRecForCausalLM.from_mmrec(model)
    ids = prompt_ids(2)
    cache = wrapper(ids[:, :10]).cache
    assert cache.get_seq_length() == 10
    with pytest.raises(ValueError, match="as cache="):
        wrapper(ids[:, 10:], past_key_values=cache)
    with torch.no_grad():
        pieces = [wrapper(ids[:, t : t + 1], cache=cache) for t in range(10, 13)]
        pieces.append(wrapper(ids[:, 13:], cache=cache))
    assert all(piece.cache is cache for piece in pieces) and cache.get_seq_length() == ids.shape[1]
    logits = torch.cat([piece.logits for piece in pieces], dim=1)
    assert_close_rel(logits, model(ids)[0][:, 10:], output_tolerance(torch.float32), "logits after the cache")


def test_padded_prompts_are_refused(model):
    ids = prompt_ids(2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="attention_mask of ones"):
        MMRecForCausalLM.from_mmrec(model).generate(ids, attention_mask=mask, max_new_tokens=2)


def test_save_and_load_round_trip_gives_identical_logits(folder, model):
    loaded = MMRecForCausalLM.from_pretrained(folder).eval()
    assert loaded.config.mmrec_config() == model.config
    ids = prompt_ids()
    assert torch.equal(loaded(ids).logits, model(ids)[0])
    # The head is the embedding: stored once, under the model's own names.
    assert set(load_file(folder / "model.safetensors")) == {f"model.{name}" for name in model.state_dict()}


def test_pipeline_text_generation_continues_the_prompt(folder, model):
    generated = pipeline("text-generation", model=str(folder))(PROMPT, max_new_tokens=40, do_sample=False)
    expected = model.generate(prompt_ids(), 40, temperature=0)[0]
    assert generated[0]["generated_text"] == bytes(expected.tolist()).decode("utf-8", errors="replace")


def test_auto_classes_load_the_folder_in_a_fresh_process(folder, model):
    """Importing mmrec_model does not import transformers; it registers the Auto classes once transformers is."""
    code = f"""
import json, sys
import mmrec_model
assert "transformers" not in sys.modules
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer({PROMPT!r}, return_tensors="pt")
print(json.dumps([type(model).__name__, type(tokenizer).__name__, model.generate(**ids, max_new_tokens=20, do_sample=False)[0].tolist()]))
"""
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder)], cwd=REPO, env=environment(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    expected = model.generate(prompt_ids(), 20, temperature=0)[0].tolist()
    assert json.loads(result.stdout.splitlines()[-1]) == ["MMRecForCausalLM", "MMRecByteTokenizer", expected]


def test_auto_classes_know_mmrec_in_this_process(folder):
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is MMRecForCausalLM
    assert type(AutoTokenizer.from_pretrained(folder)) is MMRecByteTokenizer


def test_byte_tokenizer_reads_text_as_its_utf8_bytes():
    tokenizer = MMRecByteTokenizer()
    text = "déf f(x):\n\treturn x  # ünïcode €"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([0x66, 0xFF, 0x66]) == "f\ufffdf"
    assert tokenizer.vocab_size == len(tokenizer.get_vocab()) == 256
