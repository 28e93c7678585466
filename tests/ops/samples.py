"""The sample inputs of the op tests: one table per op, one function that draws
an entry's inputs.

Every test of an op (the common checks of tests/ops/test_contract.py:
correctness against the float64 references, gradients, gradcheck, opcheck,
compile, empty and bad inputs; the op's own tests; the Triton kernels under the
interpreter) takes its sizes and layouts from the op's table and its tensors
from the op's input function, as pytorch/extension-cpp's sample_inputs feeds
its correctness, gradient and opcheck tests alike. An entry names the tests
that use it (`uses`), so that each keeps the sizes its cost allows (gradcheck
and opcheck small ones, many_tiles a long one); "bad_inputs" is the entry the
bad-input and device checks alter. A test's id carries the entry's
sizes and layout, as fla's do: B2-T31-H3-d5, B2-T23-H3-d6-transposed.

Inputs are drawn in float64 and rounded once to the dtype under test, in the
regime the model runs in: gamma in (0, 1), the rest standard normal, the
weight of the recurrence of scale 1/sqrt(d) (tests/ops/specs.py
says why).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

# Layouts of a [B, T, ...] tensor: its own contiguous storage, a [B, H, T, d]
# storage seen through .transpose(1, 2), every other channel of a wider
# tensor; for the recurrence, "strided" is all five inputs strided at once.
LAYOUT_SUFFIX = {
    "contiguous": "",
    "BHTd_transposed": "-transposed",
    "channel_sliced": "-sliced",
    "unfoldable": "-unfoldable",
    "strided": "-strided",
}


@dataclass(frozen=True)
class Sample:
    """One entry of an op's table: sizes [B, T, ...], layout, the tests that use it."""

    shape: tuple[int, ...]
    layout: str = "contiguous"
    uses: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """B2-T13 then the channel dims: D7 (one), H3-d5 (two), 3x4x2 (more)."""
        B, T, *channels = self.shape
        if len(channels) == 1:
            dims = [f"D{channels[0]}"]
        elif len(channels) == 2:
            dims = [f"H{channels[0]}", f"d{channels[1]}"]
        else:
            dims = ["x".join(map(str, channels))] if channels else []
        return "-".join([f"B{B}", f"T{T}", *dims]) + LAYOUT_SUFFIX[self.layout]


def entries(table: list[Sample], use: str) -> list[Sample]:
    """The entries of `table` that name `use`."""
    found = [sample for sample in table if use in sample.uses]
    assert found, f"no sample for {use}"
    return found


def params(table: list[Sample], use: str) -> list:
    """entries(table, use) as pytest params, each with its id."""
    return [pytest.param(sample, id=sample.id) for sample in entries(table, use)]


def draw(shape, device, dtype, kind="normal"):
    """float64 draws rounded to dtype: kind "gamma" in (0, 1), else standard normal."""
    make = torch.rand if kind == "gamma" else torch.randn
    return make(shape, dtype=torch.float64, device=device).to(dtype)


# ---------------------------------------------------------------------------
# mmrec::scan: gamma, x [B, T, ...], h0 [B, ...].

FORWARD_AND_GRADIENTS = ("forward", "gradients")
SCAN_SAMPLES = [
    # T = 1, prime T, no channel dims (one tile and several), two channels,
    # d not a power of two, many channels.
    Sample((3, 1, 5), uses=FORWARD_AND_GRADIENTS),
    Sample((2, 13, 7), uses=FORWARD_AND_GRADIENTS),
    Sample((4, 9), uses=FORWARD_AND_GRADIENTS),
    Sample((2, 601), uses=FORWARD_AND_GRADIENTS),
    Sample((3, 29, 2), uses=FORWARD_AND_GRADIENTS),
    Sample((2, 31, 3, 5), uses=FORWARD_AND_GRADIENTS),
    Sample((2, 64, 4, 24), uses=(*FORWARD_AND_GRADIENTS, "other_device")),
    Sample((1, 17, 1000), uses=FORWARD_AND_GRADIENTS),
    # Strided inputs, every dtype (forward) and float32 (gradients).
    Sample((2, 23, 3, 6), "BHTd_transposed", ("strided",)),
    Sample((2, 23, 3, 6), "channel_sliced", ("strided",)),
    Sample((2, 19, 3, 6), "BHTd_transposed", ("strided_gradients", "triton_int64")),
    Sample((2, 19, 3, 6), "channel_sliced", ("strided_gradients",)),
    # Three channel dims whose strides fold into no fewer than three groups.
    Sample((2, 5, 3, 4, 2), "unfoldable", ("strided_gradients", "triton_unfoldable")),
    # Each tensor in its own layout; B = 1 splits a batch row across threads.
    Sample((1, 7, 3, 50), uses=("mixed_layouts",)),
    Sample((2, 23, 3, 6), uses=("mixed_layouts",)),
    # Data 16-byte aligned, then one element off (slices of a wider tensor).
    Sample((2, 21, 3, 33), uses=("pointer_alignment",)),
    # Element offsets past 2**31 (a time stride of over 2**30, on a GPU).
    Sample((1, 3, 16), uses=("int32_offsets",)),
    # T = 3079 (prime): several time tiles of the CUDA kernels.
    Sample((2, 3079, 2, 40), uses=("many_tiles",)),
    Sample((2, 3079, 2, 40), "BHTd_transposed", ("many_tiles",)),
    # Outputs over 8 MiB (the CPU kernels' streaming stores), rows unaligned to 16 bytes.
    Sample((2, 1024, 1, 1025), uses=("large",)),
    Sample((2, 1024, 1, 1025), "BHTd_transposed", ("large",)),
    # Small, for gradcheck (float64), gradgradcheck, opcheck and torch.func.
    Sample((2, 6, 2, 3), uses=("gradcheck",)),
    Sample((2, 6, 2, 3), "BHTd_transposed", ("gradcheck",)),
    Sample((2, 5, 3), uses=("gradgradcheck", "bad_inputs")),
    Sample((2, 4, 2), uses=("func",)),
    Sample((2, 7, 3), uses=("opcheck",)),
    Sample((2, 5, 3, 4), "BHTd_transposed", ("opcheck",)),
    Sample((3, 1, 2), uses=("opcheck",)),
    # Two lengths of one graph, for torch.compile(dynamic=True).
    Sample((2, 5, 3, 4), uses=("compile",)),
    Sample((2, 11, 3, 4), uses=("compile",)),
    # Empty time, batch or channel dims.
    *(
        Sample(shape, uses=("empty",))
        for shape in [(2, 0, 3), (0, 5, 3), (0, 0, 2, 2), (2, 5, 0), (2, 5, 3, 0), (2, 5, 0, 3)]
    ),
    # The Triton kernels under the interpreter: T = 1, prime T, no channel
    # dims, d not a power of two; strided; more steps than one tile.
    Sample((2, 1, 3), uses=("triton",)),
    Sample((2, 37, 3, 5), uses=("triton",)),
    Sample((3, 13), uses=("triton",)),
    Sample((1, 20, 2, 24), uses=("triton",)),
    Sample((2, 11, 3, 6), "BHTd_transposed", ("triton_strided",)),
    Sample((2, 11, 3, 6), "channel_sliced", ("triton_strided",)),
    Sample((1, 300, 4), uses=("triton_long",)),
    Sample((2, 9, 4), uses=("triton_broadcast",)),
    Sample((2, 19, 3, 6), uses=("triton_int64",)),
    Sample((2, 0, 3), uses=("triton_empty",)),
    Sample((0, 4, 3), uses=("triton_empty",)),
]


def scan_seq(sample: Sample, device, dtype, kind):
    """One [B, T, ...] tensor of the sample's shape in its layout."""
    shape = sample.shape
    if sample.layout == "contiguous":
        return draw(shape, device, dtype, kind)
    if sample.layout == "BHTd_transposed":
        B, T, H, d = shape
        return draw((B, H, T, d), device, dtype, kind).transpose(1, 2)
    if sample.layout == "channel_sliced":
        return draw((*shape[:-1], 2 * shape[-1]), device, dtype, kind)[..., ::2]
    if sample.layout == "unfoldable":  # [B, T, C1, C2, C3] from storage [B, C2, C1, T, C3]
        B, T, C1, C2, C3 = shape
        return draw((B, C2, C1, T, C3), device, dtype, kind).permute(0, 3, 2, 1, 4)
    raise ValueError(sample.layout)


def scan_inputs(sample: Sample, device, dtype, with_x: bool, with_h0: bool):
    """(gamma, x, h0) of a scan sample; x and h0 None when not given. h0 is contiguous."""
    gamma = scan_seq(sample, device, dtype, "gamma")
    x = scan_seq(sample, device, dtype, "normal") if with_x else None
    h0 = draw((sample.shape[0], *sample.shape[2:]), device, dtype) if with_h0 else None
    return gamma, x, h0


# ---------------------------------------------------------------------------
# mmrec::recurrence: z, gamma [B, T, H, d], weight [H, d, d], bias [H, d], h0 [B, H, d].

RECURRENCE_SAMPLES = [
    # T = 1, prime T with d = 7, d = 16, d not a power of two, d = 64 (the
    # common case), d > 64.
    Sample((3, 1, 2, 5), uses=FORWARD_AND_GRADIENTS),
    Sample((2, 13, 3, 7), uses=FORWARD_AND_GRADIENTS),
    Sample((2, 8, 2, 16), uses=FORWARD_AND_GRADIENTS),
    Sample((1, 17, 2, 24), uses=FORWARD_AND_GRADIENTS),
    Sample((2, 9, 2, 64), uses=(*FORWARD_AND_GRADIENTS, "other_device")),
    Sample((2, 5, 1, 80), uses=FORWARD_AND_GRADIENTS),
    Sample((2, 11, 3, 6), "strided", ("strided",)),
    Sample((1, 4, 2, 64), "strided", ("strided",)),
    # float32 over 4096 steps.
    Sample((1, 4096, 2, 16), uses=("long",)),
    # Small, for gradcheck (float64), second derivatives, opcheck and torch.func.
    Sample((2, 5, 2, 3), uses=("gradcheck", "second_derivatives")),
    Sample((1, 3, 2, 2), uses=("func",)),
    Sample((2, 5, 2, 3), "strided", ("gradcheck",)),
    Sample((2, 7, 2, 5), uses=("opcheck",)),
    Sample((2, 4, 3, 8), "strided", ("opcheck",)),
    Sample((3, 1, 1, 4), uses=("opcheck",)),
    Sample((2, 5, 3, 4), uses=("compile", "bad_inputs")),
    Sample((2, 11, 3, 4), uses=("compile",)),
    *(
        Sample(shape, uses=("empty",))
        for shape in [(2, 0, 3, 4), (0, 5, 3, 4), (0, 0, 2, 2), (2, 5, 3, 0), (2, 5, 0, 4)]
    ),
    # The Triton kernels under the interpreter: T = 1, prime T, more than one
    # batch tile of 16 (at d = 64, over more steps than the 4 pipeline stages),
    # d = 24 (padded to 32); both parameters or one; strided; d below the
    # smallest tile and d = 80 (padded to 128); empty.
    Sample((1, 1, 2, 16), uses=("triton",)),
    Sample((3, 13, 2, 24), uses=("triton", "triton_bias_or_h0")),
    Sample((17, 11, 1, 64), uses=("triton",)),
    Sample((17, 7, 2, 24), "strided", ("triton_strided",)),
    Sample((3, 5, 2, 16), uses=("triton_saved_h",)),
    Sample((2, 6, 1, 5), uses=("triton_padded",)),
    Sample((2, 6, 1, 80), uses=("triton_padded",)),
    Sample((2, 0, 3, 16), uses=("triton_empty",)),
    Sample((0, 4, 3, 16), uses=("triton_empty",)),
]


def recurrence_inputs(sample: Sample, device, dtype, with_bias=True, with_h0=True):
    """(z, gamma, weight, bias, h0) of a recurrence sample; bias and h0 None when
    not given. "strided": z and gamma as [B, H, T, d] tensors seen through
    .transpose(1, 2), the weight as a per-head transpose, bias and h0 as every
    other element of wider tensors."""
    B, T, H, d = sample.shape
    if sample.layout == "strided":
        z = draw((B, H, T, d), device, dtype).transpose(1, 2)
        gamma = draw((B, H, T, d), device, dtype, "gamma").transpose(1, 2)
        weight = (draw((H, d, d), device, torch.float64) / d**0.5).to(dtype).transpose(1, 2)
        bias = draw((H, 2 * d), device, dtype)[:, ::2] if with_bias else None
        h0 = draw((B, H, 2 * d), device, dtype)[..., ::2] if with_h0 else None
    elif sample.layout == "contiguous":
        z = draw((B, T, H, d), device, dtype)
        gamma = draw((B, T, H, d), device, dtype, "gamma")
        weight = (draw((H, d, d), device, torch.float64) / d**0.5).to(dtype)
        bias = draw((H, d), device, dtype) if with_bias else None
        h0 = draw((B, H, d), device, dtype) if with_h0 else None
    else:
        raise ValueError(sample.layout)
    return z, gamma, weight, bias, h0


def recurrence_grad_output(sample: Sample, device, dtype):
    """An upstream gradient for h, in the sample's layout ([B, H, T, d]
    transposed when strided)."""
    B, T, H, d = sample.shape
    if sample.layout == "strided":
        return draw((B, H, T, d), device, dtype).transpose(1, 2)
    return draw((B, T, H, d), device, dtype)


# ---------------------------------------------------------------------------
# mmrec::decode_read: q [B, H, d], keys and values [B, H, K, d], mask [K].


@dataclass(frozen=True)
class ReadSample:
    """One entry of decode_read's table: sizes (B, H, K, d), layout, the tests that use it."""

    shape: tuple[int, int, int, int]
    layout: str = "contiguous"
    uses: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        B, H, K, d = self.shape
        return f"B{B}-H{H}-K{K}-d{d}" + LAYOUT_SUFFIX[self.layout]


DECODE_READ_SAMPLES = [
    # K = 1, prime K, d not a power of two, one row, a decoder's base cache
    # (1136 slots of 12 heads of 64).
    ReadSample((2, 3, 1, 40), uses=FORWARD_AND_GRADIENTS),
    ReadSample((1, 2, 131, 64), uses=FORWARD_AND_GRADIENTS),
    ReadSample((3, 2, 300, 17), uses=FORWARD_AND_GRADIENTS),
    ReadSample((1, 1, 7, 3), uses=FORWARD_AND_GRADIENTS),
    ReadSample((2, 2, 9, 1), uses=(*FORWARD_AND_GRADIENTS, "triton")),
    ReadSample((2, 12, 1136, 64), uses=("forward", "other_device")),
    # q every other element of a wider tensor, keys a [B, K, H, d] tensor seen
    # through .transpose(1, 2), values a slice of a decoder's [2, B, H, K', d] cache,
    # mask every other element. On the CPU, reads of 8192 (row, slot) pairs or
    # more take the BLAS path (csrc/decode_read.cpp), smaller ones the per-row one:
    # both here and above.
    ReadSample((2, 3, 37, 24), "strided", ("strided", "triton_strided")),
    ReadSample((2, 4, 1031, 24), "strided", ("strided",)),
    ReadSample((2, 2, 5, 3), uses=("gradcheck", "gradgradcheck", "opcheck")),
    ReadSample((2, 2, 5, 3), "strided", ("gradcheck", "gradgradcheck", "opcheck")),
    ReadSample((2, 3, 5, 4), uses=("bad_inputs",)),
    ReadSample((1, 2, 3, 2), uses=("func",)),
    ReadSample((2, 3, 6, 4), uses=("compile",)),
    ReadSample((2, 3, 19, 4), uses=("compile",)),
    *(ReadSample(shape, uses=("empty",)) for shape in [(0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 5, 0)]),
    # The Triton kernels under the interpreter: K = 1, K over several chunks of
    # 64 slots, d = 17 (padded to 32); d = 1 above.
    ReadSample((2, 3, 1, 16), uses=("triton",)),
    ReadSample((1, 2, 300, 17), uses=("triton", "triton_masked_chunks")),
    ReadSample((3, 1, 130, 64), uses=("triton",)),
]


def decode_read_mask(K: int, device, dtype, layout: str = "contiguous"):
    """[K]: scores to add, standard normal with every third slot -inf (empty), slot 0 kept."""
    mask = draw((2 * K,), device, torch.float64)
    mask[3::3] = float("-inf")
    mask = mask.to(dtype)
    return mask[::2] if layout == "strided" else mask[:K]


def decode_read_inputs(sample: ReadSample, device, dtype):
    """(q, keys, values, mask) of a decode_read sample in its layout."""
    B, H, K, d = sample.shape
    if sample.layout == "strided":
        q = draw((B, H, 2 * d), device, dtype)[..., ::2]
        keys = draw((B, K, H, d), device, dtype).transpose(1, 2)
        values = draw((2, B, H, K + 3, d), device, dtype)[1, :, :, 2 : K + 2]
    elif sample.layout == "contiguous":
        q = draw((B, H, d), device, dtype)
        keys = draw((B, H, K, d), device, dtype)
        values = draw((B, H, K, d), device, dtype)
    else:
        raise ValueError(sample.layout)
    return q, keys, values, decode_read_mask(K, device, dtype, sample.layout)


# ---------------------------------------------------------------------------
# mmrec::skinny_addmm: bias [N], x [M, K], weight [K, N].


@dataclass(frozen=True)
class ProductSample:
    """One entry of skinny_addmm's table: sizes (M, K, N), layout, the tests that use it."""

    shape: tuple[int, int, int]
    layout: str = "contiguous"
    uses: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        M, K, N = self.shape
        return f"M{M}-K{K}-N{N}" + LAYOUT_SUFFIX[self.layout]


SKINNY_ADDMM_SAMPLES = [
    # One row, K = 1, prime K over several parts, N not a multiple of the column tile,
    # more rows than one tile of 16, a base decoder's input projection at 16 rows.
    ProductSample((1, 1, 1), uses=(*FORWARD_AND_GRADIENTS, "triton")),
    ProductSample((1, 131, 40), uses=(*FORWARD_AND_GRADIENTS, "triton")),
    ProductSample((5, 769, 33), uses=(*FORWARD_AND_GRADIENTS, "triton")),
    ProductSample((16, 200, 96), uses=FORWARD_AND_GRADIENTS),
    ProductSample((37, 64, 70), uses=(*FORWARD_AND_GRADIENTS, "triton")),
    ProductSample((16, 768, 3456), uses=("forward", "other_device")),
    # x every other column of a wider tensor, weight a [N, K] tensor seen through
    # .t() (a linear layer's weight), bias every other element.
    ProductSample((3, 97, 21), "strided", ("strided", "triton_strided")),
    ProductSample((2, 5, 3), uses=("gradcheck", "gradgradcheck", "opcheck")),
    ProductSample((2, 5, 3), "strided", ("gradcheck", "gradgradcheck", "opcheck")),
    ProductSample((2, 5, 4), uses=("bad_inputs",)),
    ProductSample((2, 3, 2), uses=("func",)),
    ProductSample((2, 6, 4), uses=("compile",)),
    ProductSample((3, 19, 4), uses=("compile",)),
    *(ProductSample(shape, uses=("empty",)) for shape in [(0, 5, 4), (3, 0, 4), (3, 5, 0)]),
]


def skinny_addmm_inputs(sample: ProductSample, device, dtype):
    """(bias, x, weight) of a skinny_addmm sample in its layout."""
    M, K, N = sample.shape
    if sample.layout == "strided":
        bias = draw((2 * N,), device, dtype)[::2]
        x = draw((M, 2 * K), device, dtype)[:, ::2]
        weight = draw((N, K), device, dtype).t()
    elif sample.layout == "contiguous":
        bias, x, weight = draw((N,), device, dtype), draw((M, K), device, dtype), draw((K, N), device, dtype)
    else:
        raise ValueError(sample.layout)
    return bias, x, weight


# ---------------------------------------------------------------------------
# mmrec::memory_read: q [B, T, H, d], group [B, nb, G, 2, H d], group_mask [nb, Q, G],
# tokens [B, W - 1 + T, 2, H d], first_token [] int64, window W.


@dataclass(frozen=True)
class MemoryReadSample:
    """One entry of memory_read's table: sizes (B, T, H, d, G, Q, W), layout, the tests
    that use it; `extra_blocks` blocks of group past the last query's (nb Q > T + Q - 1),
    the first `missing` tokens absent (first_token = missing: a sequence's start), and the
    group mask: "random" (drawn; missing <= W - 1, so every query sees its own token) or
    "all" (all True, so that `missing` may reach into the chunk: queries whose own token
    and window are absent, which read their group alone)."""

    shape: tuple[int, int, int, int, int, int, int]
    layout: str = "contiguous"
    uses: tuple[str, ...] = ()
    extra_blocks: int = 0
    missing: int = 0
    masks: str = "random"

    def __post_init__(self):
        B, T, H, d, G, Q, W = self.shape
        assert Q >= 1 and W >= 1 and 0 <= self.missing <= (W - 1 if self.masks == "random" else W - 1 + T), self
        assert self.masks == "random" or G >= 1, "tokens missing in the chunk need a group every query sees"

    @property
    def blocks(self) -> int:
        """nb: the blocks of Q queries covering T, and the extra ones."""
        _, T, _, _, _, Q, _ = self.shape
        return -(-T // Q) + self.extra_blocks

    @property
    def id(self) -> str:
        """B2-T37-H3-d24-G5-Q16-W9, then -nb<nb> (extra blocks), -missing<m>, -allgroup, layout."""
        B, T, H, d, G, Q, W = self.shape
        parts = [f"B{B}", f"T{T}", f"H{H}", f"d{d}", f"G{G}", f"Q{Q}", f"W{W}"]
        if self.extra_blocks:
            parts.append(f"nb{self.blocks}")
        if self.missing:
            parts.append(f"missing{self.missing}")
        if self.masks == "all":
            parts.append("allgroup")
        return "-".join(parts) + LAYOUT_SUFFIX[self.layout]


MEMORY_READ_SAMPLES = [
    # T = 1 in a block of 16; prime T with d = 24 and the first tokens missing; d = 40,
    # Q = 5 and two blocks past the end; d = 64 in one block of 64 queries; no group
    # (G = 0); window 1; window 1 without a group (one key: out = the token's value);
    # windows longer than T, with every earlier token missing (a sequence's first chunk)
    # or some; a block per query (Q = 1) with d = 3; the chunk's first 4 tokens missing too;
    # more candidates and a longer window than one tile of 64 keys.
    MemoryReadSample((3, 1, 2, 16, 4, 16, 4), uses=FORWARD_AND_GRADIENTS),
    MemoryReadSample((2, 37, 3, 24, 5, 16, 9), uses=(*FORWARD_AND_GRADIENTS, "one_output"), missing=3),
    MemoryReadSample((2, 29, 2, 40, 3, 5, 6), uses=FORWARD_AND_GRADIENTS, extra_blocks=2),
    MemoryReadSample((1, 64, 2, 64, 8, 64, 16), uses=(*FORWARD_AND_GRADIENTS, "other_device")),
    MemoryReadSample((2, 23, 2, 24, 0, 8, 5), uses=(*FORWARD_AND_GRADIENTS, "one_output"), extra_blocks=1),
    MemoryReadSample((2, 17, 3, 8, 4, 4, 1), uses=FORWARD_AND_GRADIENTS),
    MemoryReadSample((2, 5, 1, 8, 0, 5, 1), uses=FORWARD_AND_GRADIENTS),
    MemoryReadSample((2, 7, 2, 16, 3, 3, 12), uses=FORWARD_AND_GRADIENTS, missing=11),
    MemoryReadSample((2, 6, 2, 16, 2, 4, 10), uses=FORWARD_AND_GRADIENTS, missing=4),
    MemoryReadSample((2, 11, 1, 3, 2, 1, 3), uses=FORWARD_AND_GRADIENTS),
    MemoryReadSample((2, 19, 2, 16, 4, 7, 6), uses=(*FORWARD_AND_GRADIENTS, "one_output"), missing=9, masks="all"),
    MemoryReadSample((1, 20, 2, 32, 70, 10, 3), uses=FORWARD_AND_GRADIENTS),
    MemoryReadSample((1, 9, 1, 32, 2, 9, 100), uses=FORWARD_AND_GRADIENTS, missing=40),
    # q a [B, H, T, d] tensor seen through .transpose(1, 2); then every input strided
    # (group_mask every other element of a wider mask too).
    MemoryReadSample((2, 21, 3, 24, 5, 8, 6), "BHTd_transposed", ("strided",), missing=2),
    MemoryReadSample((2, 21, 3, 24, 5, 8, 6), "strided", ("strided",), extra_blocks=1, missing=2),
    # Small, for gradcheck (float64), opcheck and torch.func.
    MemoryReadSample((2, 5, 2, 3, 2, 2, 3), uses=("gradcheck",), extra_blocks=1, missing=1),
    MemoryReadSample((1, 4, 2, 3, 3, 3, 2), "strided", ("gradcheck",)),
    MemoryReadSample((2, 3, 1, 4, 0, 4, 5), uses=("gradcheck",), missing=2),
    MemoryReadSample((2, 7, 2, 4, 3, 4, 3), uses=("opcheck",), extra_blocks=1, missing=1),
    MemoryReadSample((2, 5, 2, 4, 2, 3, 2), "strided", ("opcheck",)),
    MemoryReadSample((1, 1, 1, 4, 0, 2, 1), uses=("opcheck",)),
    MemoryReadSample((1, 3, 1, 2, 2, 2, 2), uses=("func",)),
    # Two lengths (and block counts) of one graph, for torch.compile(dynamic=True).
    MemoryReadSample((2, 5, 2, 4, 3, 4, 3), uses=("compile", "bad_inputs")),
    MemoryReadSample((2, 11, 2, 4, 3, 4, 3), uses=("compile",)),
    # Empty time (no blocks, or one block past the end), batch or heads.
    MemoryReadSample((2, 0, 2, 4, 3, 4, 3), uses=("empty",)),
    MemoryReadSample((2, 0, 2, 4, 3, 4, 3), uses=("empty",), extra_blocks=1),
    MemoryReadSample((0, 5, 2, 4, 3, 4, 3), uses=("empty",)),
    MemoryReadSample((2, 5, 0, 4, 3, 4, 3), uses=("empty",)),
    # The Triton kernels under the interpreter (tiny): T = 1; prime T with d = 24, Q = 5,
    # a block past the end and missing tokens; no group with d = 64; window longer than T;
    # window 1; the chunk's first tokens missing; strided; more queries, candidates and
    # window than one tile.
    MemoryReadSample((1, 1, 1, 16, 2, 16, 2), uses=("triton",)),
    MemoryReadSample((2, 13, 2, 24, 3, 5, 4), uses=("triton",), extra_blocks=1, missing=2),
    MemoryReadSample((1, 20, 1, 64, 0, 16, 7), uses=("triton",), missing=6),
    MemoryReadSample((1, 6, 1, 16, 2, 4, 9), uses=("triton",), missing=8),
    MemoryReadSample((2, 9, 1, 16, 4, 3, 1), uses=("triton",)),
    MemoryReadSample((1, 10, 1, 16, 3, 4, 4), uses=("triton",), missing=6, masks="all"),
    MemoryReadSample((1, 11, 2, 16, 3, 4, 3), "strided", ("triton_strided",), missing=1),
    MemoryReadSample((1, 70, 1, 16, 70, 70, 70), uses=("triton_tiles",), missing=30),
    # Windows of several 64-key tiles, with the tokens before the sequence's start missing,
    # and with the chunk's first 40 missing too.
    MemoryReadSample((1, 150, 1, 16, 5, 64, 200), uses=("triton_tiles",), missing=130),
    MemoryReadSample((1, 130, 1, 16, 5, 32, 260), uses=("triton_tiles",), missing=299, masks="all"),
]


def strided_mask(mask):
    """mask as every other element (last dim) of a wider bool tensor, the others its negation."""
    wide = torch.empty((*mask.shape[:-1], 2 * mask.shape[-1]), dtype=torch.bool, device=mask.device)
    wide[..., ::2], wide[..., 1::2] = mask, ~mask
    return wide[..., ::2]


def memory_read_masks(sample: MemoryReadSample, device):
    """(group_mask [nb, Q, G] contiguous, first_token). Every query sees at least one key:
    its own token (with a random group mask) or its whole group. A random group mask has
    (when T >= 2) a row all False (query 0's, and the middle query's) and one all True
    (the last query's)."""
    _, T, _, _, G, Q, _ = sample.shape
    nb = sample.blocks
    if sample.masks == "all":
        group_mask = torch.ones((nb, Q, G), dtype=torch.bool, device=device)
    elif sample.masks == "random":
        group_mask = torch.rand((nb, Q, G), device=device) < 0.5
        if T >= 2 and G > 0:
            rows = group_mask.view(nb * Q, G)
            rows[0], rows[T // 2], rows[T - 1] = False, False, True
    else:
        raise ValueError(sample.masks)
    return group_mask, torch.tensor(sample.missing, device=device)


def memory_read_inputs(sample: MemoryReadSample, device, dtype):
    """(q, group, group_mask, tokens, first_token, window) of a memory_read sample in its
    layout: "BHTd_transposed" q a [B, H, T, d] tensor seen through .transpose(1, 2);
    "strided" that q, group a [B, nb, 2, G, H d] tensor seen through .transpose(2, 3),
    tokens the keys and values of a fused [B, L + 3, 3, H d] projection of a longer
    sequence, and group_mask every other element of a wider one."""
    B, T, H, d, G, Q, W = sample.shape
    nb, L = sample.blocks, W - 1 + T
    group_mask, first_token = memory_read_masks(sample, device)
    if sample.layout in ("contiguous", "BHTd_transposed"):
        if sample.layout == "contiguous":
            q = draw((B, T, H, d), device, dtype)
        else:
            q = draw((B, H, T, d), device, dtype).transpose(1, 2)
        group = draw((B, nb, G, 2, H * d), device, dtype)
        tokens = draw((B, L, 2, H * d), device, dtype)
    elif sample.layout == "strided":
        q = draw((B, H, T, d), device, dtype).transpose(1, 2)
        group = draw((B, nb, 2, G, H * d), device, dtype).transpose(2, 3)
        tokens = draw((B, L + 3, 3, H * d), device, dtype)[:, 2 : L + 2, 1:]
        group_mask = strided_mask(group_mask)
    else:
        raise ValueError(sample.layout)
    return q, group, group_mask, tokens, first_token, W


# ---------------------------------------------------------------------------
# mmrec::segment_read: q [B, T, H, d], segments [B, M, S, 2, H d], segment_ids [B, T, k].


@dataclass(frozen=True)
class SegmentReadSample:
    """One entry of segment_read's table: sizes (B, T, H, d, M, S, k), layout, the tests
    that use it; `empty_queries`: queries 0 and T // 2 read no segment (all their ids -1)."""

    shape: tuple[int, int, int, int, int, int, int]
    layout: str = "contiguous"
    uses: tuple[str, ...] = ()
    empty_queries: bool = False

    @property
    def id(self) -> str:
        """B2-T13-H3-d24-M7-S5-k3, then -empty (queries without a segment), layout."""
        parts = [f"{name}{n}" for name, n in zip(("B", "T", "H", "d", "M", "S", "k"), self.shape)]
        return "-".join(parts + (["empty"] if self.empty_queries else [])) + LAYOUT_SUFFIX[self.layout]


SEGMENT_READ_SAMPLES = [
    # T = 1; prime T with d = 24, S = 5 and k = 3; one token per segment (S = 1), k = 1 and
    # d = 40; the model's segments of 64 tokens with d = 17; more segments than are read.
    SegmentReadSample((3, 1, 2, 16, 4, 8, 2), uses=FORWARD_AND_GRADIENTS),
    SegmentReadSample((2, 13, 3, 24, 7, 5, 3), uses=(*FORWARD_AND_GRADIENTS, "one_output")),
    SegmentReadSample((2, 7, 2, 40, 3, 1, 1), uses=(*FORWARD_AND_GRADIENTS, "one_output")),
    SegmentReadSample((1, 5, 2, 17, 2, 64, 2), uses=(*FORWARD_AND_GRADIENTS, "other_device")),
    # q a [B, H, T, d] tensor seen through .transpose(1, 2), segments a [B, M, 2, S, H d]
    # one through .transpose(2, 3), segment_ids every other element of a wider tensor.
    SegmentReadSample((2, 11, 3, 24, 6, 5, 3), "strided", ("strided",)),
    # Queries that read no segment, among others.
    SegmentReadSample((2, 9, 2, 8, 5, 3, 2), uses=("no_segment",), empty_queries=True),
    SegmentReadSample((1, 6, 1, 24, 4, 7, 3), "strided", ("no_segment",), empty_queries=True),
    # Small, for gradcheck (float64: an lse of -inf has no finite difference), opcheck and
    # torch.func.
    SegmentReadSample((2, 4, 2, 3, 4, 3, 2), uses=("gradcheck",)),
    SegmentReadSample((1, 3, 2, 3, 3, 2, 2), "strided", ("gradcheck",)),
    SegmentReadSample((2, 5, 2, 4, 4, 3, 2), uses=("opcheck",), empty_queries=True),
    SegmentReadSample((2, 3, 2, 4, 3, 2, 2), "strided", ("opcheck",)),
    SegmentReadSample((1, 3, 1, 2, 3, 2, 2), uses=("func",)),
    # Two lengths of one graph, for torch.compile(dynamic=True).
    SegmentReadSample((2, 5, 2, 4, 4, 3, 2), uses=("compile", "bad_inputs")),
    SegmentReadSample((2, 11, 2, 4, 4, 3, 2), uses=("compile",)),
    # Empty time, batch or heads; no segment to read (k = 0, or M = 0: every id -1).
    *(
        SegmentReadSample(shape, uses=("empty",))
        for shape in [(2, 0, 2, 4, 3, 2, 2), (0, 5, 2, 4, 3, 2, 2), (2, 5, 0, 4, 3, 2, 2), (2, 5, 2, 4, 3, 2, 0)]
    ),
    SegmentReadSample((2, 5, 2, 4, 0, 2, 2), uses=("empty",)),
    # The Triton kernels under the interpreter (tiny): T = 1; S odd with k = 3 and queries
    # without a segment; S over two tiles of 64 with d = 17; S = 1; strided.
    SegmentReadSample((1, 1, 1, 16, 2, 4, 1), uses=("triton",)),
    SegmentReadSample((2, 5, 2, 24, 4, 5, 3), uses=("triton",), empty_queries=True),
    SegmentReadSample((1, 3, 1, 17, 3, 70, 2), uses=("triton",)),
    SegmentReadSample((1, 4, 1, 8, 3, 1, 2), uses=("triton",)),
    SegmentReadSample((1, 5, 2, 16, 4, 3, 2), "strided", ("triton_strided",)),
]


def segment_read_ids(sample: SegmentReadSample, device):
    """[B, T, k] int64: distinct segments per query (as a top-k choice gives them), each
    place after the first -1 with probability 1/3; every id -1 for the empty queries
    (and when there are no segments, M = 0)."""
    B, T, _, _, M, _, k = sample.shape
    if M == 0:
        return torch.full((B, T, k), -1, dtype=torch.int64, device=device)
    ids = torch.rand((B, T, max(M, k)), device=device).argsort(-1)[..., :k]
    ids[..., 1:][torch.rand((B, T, max(k - 1, 0)), device=device) < 1 / 3] = -1
    if sample.empty_queries and T > 0:
        ids[:, [0, T // 2]] = -1
    return ids


def segment_read_inputs(sample: SegmentReadSample, device, dtype):
    """(q, segments, segment_ids) of a segment_read sample in its layout: "strided" q a
    [B, H, T, d] tensor seen through .transpose(1, 2), segments a [B, M, 2, S, H d] one
    through .transpose(2, 3), segment_ids every other element of a wider tensor."""
    B, T, H, d, M, S, k = sample.shape
    ids = segment_read_ids(sample, device)
    if sample.layout == "contiguous":
        q = draw((B, T, H, d), device, dtype)
        segments = draw((B, M, S, 2, H * d), device, dtype)
    elif sample.layout == "strided":
        q = draw((B, H, T, d), device, dtype).transpose(1, 2)
        segments = draw((B, M, 2, S, H * d), device, dtype).transpose(2, 3)
        wide = torch.zeros((B, T, 2 * k), dtype=torch.int64, device=device)
        wide[..., ::2] = ids
        ids = wide[..., ::2]
    else:
        raise ValueError(sample.layout)
    return q, segments, ids
