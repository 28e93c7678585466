"""The Triton kernels of mmrec::skinny_addmm, run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1), against the float64 reference: a broken CUDA
kernel fails CI, which has no GPU.

The kernels multiply and sum in float32 (float64 for float64), add the parts'
partial sums in the same, and round only the stored output: float32
accumulation and one rounding, output_tolerance.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import DTYPES, INTERPRETER_ONLY
from tests.ops.samples import SKINNY_ADDMM_SAMPLES, params, skinny_addmm_inputs
from tests.ops.specs import SKINNY_ADDMM, Variant, check_forward

pytestmark = [pytest.mark.triton, INTERPRETER_ONLY]
OP = "skinny_addmm"  # the launchers under test: mmrec_ops.triton.<OP> (the `interpreted` fixture)


def check(interpreted, inputs, dtype):
    check_forward(SKINNY_ADDMM, inputs, Variant(), dtype, op=interpreted.skinny_addmm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sample", params(SKINNY_ADDMM_SAMPLES, "triton"))
def test_skinny_addmm_kernels_match_reference(interpreted, sample, dtype):
    check(interpreted, skinny_addmm_inputs(sample, "cpu", dtype), dtype)


@pytest.mark.parametrize("sample", params(SKINNY_ADDMM_SAMPLES, "triton_strided"))
def test_skinny_addmm_kernels_strided(interpreted, sample):
    check(interpreted, skinny_addmm_inputs(sample, "cpu", torch.float32), torch.float32)


def test_split_k_covers_every_row_of_the_weight_once(interpreted):
    """Parts are whole tiles, none empty, enough for all of K; a long K splits, a short one
    does not."""
    for K in [1, 31, 32, 192, 193, 384, 768, 769, 3072, 10007]:
        parts, per_part = interpreted.split_k(K)
        assert per_part % interpreted.BLOCK_K == 0 and (parts - 1) * per_part < K <= parts * per_part
        assert 1 <= parts <= interpreted.MAX_PARTS
    assert interpreted.split_k(32)[0] == 1 and interpreted.split_k(768)[0] == 4


def test_offsets_past_int32_are_refused(interpreted):
    """A weight spanning 2**31 elements, or more rows than the grid holds (checked from
    sizes and strides, nothing allocated), is a clear error rather than a wrong launch."""
    M, K, N = 16, 2**16, 2**15 + 1
    with pytest.raises(ValueError, match=r"weight spans \d+ elements, beyond the kernels' int32 offsets"):
        interpreted.check_offsets(M, K, N, 4, ((K, 1), (N, 1), 1))
    interpreted.check_offsets(16, 768, 3456, 4, ((768, 1), (3456, 1), 1))
    rows = interpreted.MAX_ROWS + 1
    with pytest.raises(ValueError, match=rf"x has {rows} rows, more than the kernel's grid holds"):
        interpreted.check_offsets(rows, 8, 8, 1, ((8, 1), (8, 1), 1))
