"""MMRecConfig: the hyperparameters of an MM-Rec language model, with presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# 'none' removes the short-term memory: an ablation for bench.quality.
MODES = ("exact", "parallel", "none")
READ_KERNELS = ("auto", "memory_read", "sdpa")

# Chosen by measurement on the project's 2-core CPU (bench/results/model_cpu.md):
# tiny pretrains usefully there in minutes; base is about 100M parameters.
PRESETS = {
    "tiny": dict(dim=128, n_layers=4, n_heads=4, window=256),
    "small": dict(dim=512, n_layers=8, n_heads=8, window=1024),
    "base": dict(dim=768, n_layers=12, n_heads=12, window=1024),
}


@dataclass
class MMRecConfig:
    """Hyperparameters of ``MMRecModel``; see docs/design.md section 2.

    Serialisable: ``MMRecConfig(**dataclasses.asdict(config)) == config``.

    Fields:
        vocab_size: token ids are in [0, vocab_size) (256: bytes).
        dim: model width D.
        n_layers: number of MMRecBlocks.
        n_heads: heads H; the head width d = D / H.
        mode: 'exact' (gate reads the state, mmrec.recurrence), 'parallel'
            (gate reads the input, mmrec.scan), or 'none' (no short-term memory:
            an ablation).
        window: W, tokens of the working memory: token t reads the keys and values
            of tokens t - W < s <= t (0: no working memory, an ablation).
        segment_len: S, tokens per segment of the long-term memory (its unit of storage
            and of retrieval).
        memory_tokens: raw tokens the long-term store keeps per sequence, a multiple of S
            (N = memory_tokens / S segment slots, the one in progress included): the most
            recent N - 1 complete segments are retrievable.
        top_k: segments each token retrieves from the long-term store, by its index (0: no
            long-term memory, an ablation).
        persistent_slots: P >= 1 learned memory slots per block, always visible (so no
            query attends to an empty set).
        read_kernel: how a chunk's read is computed: 'memory_read',
            ``torch.ops.mmrec.memory_read``, one pass per query tile over its group and
            its working memory in place (C++ on the CPU, Triton on CUDA); 'sdpa', each
            block of queries over a copy of its keys, masked (``blocked_attention``); or
            'auto' (the default), 'memory_read' on CUDA and 'sdpa' on the CPU, the faster
            on each (``bench/results/read_cpu.md``).
        ffn_mult: hidden width of the feed-forward network, in multiples of D.
        norm_eps: epsilon of the RMSNorms.
        init_std: standard deviation of the embedding and projection weights at init.
    """

    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mode: str = "exact"
    window: int = 256
    segment_len: int = 64
    memory_tokens: int = 65536
    top_k: int = 4
    persistent_slots: int = 16
    read_kernel: str = "auto"
    ffn_mult: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "window",
            "segment_len",
            "memory_tokens",
            "top_k",
            "persistent_slots",
            "ffn_mult",
        ):
            value, least = getattr(self, name), 0 if name in ("window", "top_k") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "an int >= 0" if least == 0 else "a positive int"
                raise ValueError(f"MMRecConfig.{name}: expected {kind}, got {value!r}")
        for name in ("norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"MMRecConfig.{name}: expected a positive float, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"MMRecConfig.mode: expected one of {MODES}, got {self.mode!r}")
        if self.read_kernel not in READ_KERNELS:
            raise ValueError(f"MMRecConfig.read_kernel: expected one of {READ_KERNELS}, got {self.read_kernel!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"MMRecConfig.dim: expected a multiple of n_heads ({self.n_heads}), got {self.dim}")
        if self.memory_tokens % self.segment_len or self.memory_tokens < 2 * self.segment_len:
            raise ValueError(
                f"MMRecConfig.memory_tokens: expected a multiple of segment_len ({self.segment_len}), at least "
                f"2 segments, got {self.memory_tokens}"
            )
        if self.dim < 4:
            raise ValueError(f"MMRecConfig.dim: expected at least 4 (MDI's hidden width is dim // 4), got {self.dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def store_slots(self) -> int:
        """N: segment slots of the long-term store."""
        return self.memory_tokens // self.segment_len

    @classmethod
    def preset(cls, name: str, **overrides) -> MMRecConfig:
        """A named configuration ('tiny', 'small', 'base') with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"MMRecConfig.preset: expected name in {sorted(PRESETS)}, got {name!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"MMRecConfig.preset: unknown field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})
