"""MMRecByteTokenizer: text as its UTF-8 bytes, token id = byte value (0 .. 255)."""

from __future__ import annotations

from transformers import PreTrainedTokenizer

BYTES = 256


class MMRecByteTokenizer(PreTrainedTokenizer):
    """The tokenizer of MM-Rec's byte-level models: a text's tokens are its UTF-8 bytes,
    each token's id its value, with no special tokens; decoding writes U+FFFD for an invalid
    sequence (as ``mmrec-generate`` does). A token is the character of the same code point
    as its byte (a byte-valued string, as ``convert_ids_to_tokens`` shows it).
    """

    model_input_names = ["input_ids", "attention_mask"]

    @property
    def vocab_size(self) -> int:
        return BYTES

    def get_vocab(self) -> dict[str, int]:
        return {chr(byte): byte for byte in range(BYTES)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(byte) for byte in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) != 1 or ord(token) >= BYTES:
            raise ValueError(
                f"MMRecByteTokenizer: expected a token of one byte (a character below U+0100), got {token!r}"
            )
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return bytes(ord(token) for token in tokens).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the bytes: no file
