"""The passkey test: a random 5-digit key stated once, `# pass key: 48213`, at a depth inside
filler of validation text, and at the end `# pass key: `; the model's greedy continuation of
KEY_DIGITS bytes is read against the key. Nothing of this format is in the training data: a
model answers from what it kept of the statement, or guesses.

Every model reads the prompt as it reads long text (MM-Rec in chunks of --chunk-size with its
state carried) and continues from what that reading left: MM-Rec's state; the Transformer's
KV cache; the windowed Transformer, which has no cache decoding, reads the prompt and the bytes
decoded so far again for each new byte."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bench.transformer import KVCache, Transformer
from mmrec_model.training import Corpus, autocast

from .settings import Settings, passkey_contexts

KEY_DIGITS = 5
PASSKEY_SEED = 48213
QUESTION = b"\n# pass key: "
# Trials per forward: as many as make this many bytes (bounds a Transformer's KV cache and
# every model's logits, [trials, context, 256]).
BATCH_BYTES = 1 << 19


def key_statement(key: int) -> bytes:
    """'\\n# pass key: 48213\\n': the key on a line of its own."""
    return f"{QUESTION.decode()}{key}\n".encode()


def filler_len(context: int) -> int:
    """Bytes of validation text in a prompt of `context` bytes (the rest states and asks)."""
    return context - len(key_statement(10**KEY_DIGITS - 1)) - len(QUESTION)


def as_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def passkey_trials(val: Tensor, context: int, trials: int) -> tuple[Tensor, Tensor, list[int]]:
    """`trials` prompts [trials, context] (int64) over the validation split `val` (uint8),
    the keys' digits as bytes [trials, KEY_DIGITS], and where each key's statement starts.

    Trial i: F = filler_len(context) bytes of `val` from a random offset, the statement
    inserted at depth (2i + 1) F / (2 trials) of them (depths spread evenly over the context),
    then QUESTION. Keys and offsets come from a generator of (PASSKEY_SEED, context): every
    arch and seed sees the same trials."""
    generator = torch.Generator().manual_seed(PASSKEY_SEED * 1_000_003 + context)
    filler = filler_len(context)
    starts = torch.randint(0, len(val) - filler + 1, (trials,), generator=generator).tolist()
    keys = torch.randint(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS, (trials,), generator=generator).tolist()
    prompts, depths = [], []
    for i, (start, key) in enumerate(zip(starts, keys)):
        text, depth = val[start : start + filler], (2 * i + 1) * filler // (2 * trials)
        prompts.append(torch.cat([text[:depth], as_tensor(key_statement(key)), text[depth:], as_tensor(QUESTION)]))
        depths.append(depth)
    digits = torch.tensor([list(str(key).encode()) for key in keys])
    return torch.stack(prompts).long(), digits, depths


def read_prompt(model, prompts: Tensor, chunk_size: int, cache_dtype) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The logits [B, V] of the byte after prompts [B, T], and a function from the next bytes
    [B, 1] to the logits of the byte after them, continuing what was read: a model with a
    state (forward(ids, state, chunk_size) -> (logits, state)) from its state; the
    Transformer from its KV cache (of cache_dtype); the windowed one reading all again."""
    if not isinstance(model, Transformer):
        logits, state = model(prompts, chunk_size=chunk_size)

        def next_logits(ids: Tensor) -> Tensor:
            nonlocal state
            step_logits, state = model(ids, state)
            return step_logits[:, -1]

        return logits[:, -1], next_logits
    if model.config.window is not None:
        read = prompts

        def read_again(ids: Tensor) -> Tensor:
            nonlocal read
            read = torch.cat([read, ids], dim=1)
            return model(read)[:, -1]

        return model(read)[:, -1], read_again
    cache = KVCache(model.config, prompts.shape[0], prompts.shape[1] + KEY_DIGITS, prompts.device, cache_dtype)
    return model(prompts, cache)[:, -1], lambda ids: model(ids, cache)[:, -1]


@torch.no_grad()
def greedy_continuation(model, prompts: Tensor, new_bytes: int, chunk_size: int, autocast_dtype) -> Tensor:
    """The model's greedy continuation [B, new_bytes] (int64, on the CPU) of prompts [B, T]."""
    device = next(model.parameters()).device
    model.eval()
    with autocast(device, autocast_dtype):
        logits, next_logits = read_prompt(model, prompts.to(device), chunk_size, autocast_dtype or torch.float32)
        decoded = [logits.argmax(-1, keepdim=True)]
        for _ in range(new_bytes - 1):
            decoded.append(next_logits(decoded[-1]).argmax(-1, keepdim=True))
    return torch.cat(decoded, dim=1).cpu()


def check_passkey_fits(corpus: Corpus, settings: Settings) -> None:
    """The validation split must hold the filler of the longest context."""
    longest = max(passkey_contexts(settings))
    if len(corpus.val) < filler_len(longest):
        raise ValueError(
            f"--passkey-max-len {settings.passkey_max_len}: a context of {longest} bytes needs "
            f"{filler_len(longest)} bytes of validation text, but the validation split of {corpus.source} "
            f"holds only {len(corpus.val)}"
        )


def passkey(model, corpus: Corpus, settings: Settings, autocast_dtype) -> dict:
    """Greedy recall of the key at each context of passkey_contexts: per context, the share
    of trials whose KEY_DIGITS bytes are all right (accuracy) and of the digits right
    (digit_accuracy), with each trial's statement offset and digits right."""
    measured = {"trials": settings.passkey_trials, "key_digits": KEY_DIGITS, "contexts": []}
    for context in passkey_contexts(settings):
        prompts, keys, offsets = passkey_trials(corpus.val, context, settings.passkey_trials)
        batches = prompts.split(max(1, BATCH_BYTES // context))
        answers = [
            greedy_continuation(model, batch, KEY_DIGITS, settings.chunk_size, autocast_dtype) for batch in batches
        ]
        right = torch.cat(answers) == keys
        measured["contexts"].append(
            {
                "context": context,
                "accuracy": right.all(dim=1).double().mean().item(),
                "digit_accuracy": right.double().mean().item(),
                "key_offsets": offsets,
                "digits_right": right.sum(dim=1).tolist(),
            }
        )
    return measured
