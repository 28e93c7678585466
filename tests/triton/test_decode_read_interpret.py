"""The Triton kernels of mmrec::decode_read, run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1), against the float64 reference: a broken CUDA
kernel fails CI, which has no GPU.

The kernels keep the scores, the running softmax and the sums in float32
(float64 for float64), merge the chunks' partials in the same, and round only
the stored output: float32 accumulation and one rounding, output_tolerance.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, INTERPRETER_ONLY
from tests.ops.samples import DECODE_READ_SAMPLES, decode_read_inputs, params
from tests.ops.specs import DECODE_READ, Variant, check_forward

pytestmark = [pytest.mark.triton, INTERPRETER_ONLY]
OP = "decode_read"  # the launchers under test: mmrec_ops.triton.<OP> (the `interpreted` fixture)
H100_SMS = 132  # what the launchers assume for CPU tensors


def check(interpreted, inputs, dtype):
    check_forward(DECODE_READ, inputs, Variant(), dtype, op=interpreted.decode_read)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(DECODE_READ_SAMPLES, "triton"))
def test_decode_read_kernels_match_reference(interpreted, sample, dtype):
    check(interpreted, decode_read_inputs(sample, "cpu", dtype), dtype)


@pytest.mark.parametrize("sample", params(DECODE_READ_SAMPLES, "triton_strided"))
def test_decode_read_kernels_strided(interpreted, sample):
    check(interpreted, decode_read_inputs(sample, "cpu", torch.float32), torch.float32)


@pytest.mark.parametrize("sample", params(DECODE_READ_SAMPLES, "triton_masked_chunks"))
def test_decode_read_kernels_with_whole_chunks_masked(interpreted, sample):
    """A chunk whose every slot is masked (the first one, and one inside) weighs
    nothing in the merge, and writes no NaN."""
    B, H, K, _ = sample.shape
    splits, chunk = interpreted.split_slots(B * H, K, H100_SMS)
    assert splits >= 3, "the sample must split its slots into several chunks"
    q, keys, values, mask = decode_read_inputs(sample, "cpu", torch.float32)
    mask[:chunk] = float("-inf")
    mask[2 * chunk : 3 * chunk] = float("-inf")
    check(interpreted, (q, keys, values, mask), torch.float32)


def test_split_slots_covers_every_slot_once(interpreted):
    """Chunks are whole tiles, none empty, enough for every slot; one row's
    slots split further than many rows'."""
    for rows, K in [(1, 1), (1, 1136), (2, 300), (192, 1136), (4096, 70)]:
        splits, chunk = interpreted.split_slots(rows, K, H100_SMS)
        assert chunk % interpreted.BLOCK_K == 0 and (splits - 1) * chunk < K <= splits * chunk
    assert interpreted.split_slots(1, 1136, H100_SMS)[0] > interpreted.split_slots(192, 1136, H100_SMS)[0]


def test_offsets_past_int32_are_refused(interpreted):
    """A cache spanning 2**31 elements (checked from sizes and strides, nothing allocated)
    is a clear error rather than overflowing offsets."""
    B, H, K, d = 16, 12, 2**18, 64  # 3.2e9 elements of keys
    contiguous = (H * K * d, K * d, d, 1)
    strides = ((H * d, d, 1), contiguous, contiguous, 1, (H * d, d, 1))
    with pytest.raises(ValueError, match=r"keys spans \d+ elements, beyond the kernels' int32 offsets"):
        interpreted.check_offsets(B, H, K, d, strides)
    interpreted.check_offsets(
        1, H, 1136, d, ((H * d, d, 1), (H * 1136 * d, 1136 * d, d, 1), (H * 1136 * d, 1136 * d, d, 1), 1, (H * d, d, 1))
    )
