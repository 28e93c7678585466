"""What the contract (tests/ops/test_contract.py) does not check of torch.ops.mmrec.decode_read:
a row whose every slot is masked."""

from __future__ import annotations

import pytest
import torch

import mmrec_ops
from tests.helpers import DEVICES
from tests.ops.samples import ReadSample, decode_read_inputs


@pytest.mark.ops
@pytest.mark.parametrize("device", DEVICES)
def test_decode_read_all_slots_masked_gives_nan(device):
    """As softmax over nothing but -inf: NaN, not an arbitrary value."""
    q, keys, values, mask = decode_read_inputs(ReadSample((2, 3, 9, 8)), device, torch.float32)
    out = mmrec_ops.decode_read(q, keys, values, torch.full_like(mask, float("-inf")))
    assert out.isnan().all()
