"""MMRecConfig: presets, serialisation, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmrec_model import MMRecConfig, MMRecModel

pytestmark = pytest.mark.model


def count_parameters(config: MMRecConfig) -> int:
    with torch.device("meta"):  # shapes only: base is 400 MB of float32
        return MMRecModel(config).num_parameters()


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_preset_round_trips_through_asdict(name):
    config = MMRecConfig.preset(name)
    assert config.vocab_size == 256 and config.mode == "exact"
    assert (config.segment_len, config.memory_tokens, config.top_k, config.persistent_slots) == (64, 65536, 4, 16)
    assert MMRecConfig(**dataclasses.asdict(config)) == config


def test_preset_sizes():
    tiny, small, base = (count_parameters(MMRecConfig.preset(n)) for n in ("tiny", "small", "base"))
    assert tiny < 2e6 < small < 50e6
    assert 90e6 < base < 110e6, base


def test_preset_overrides_and_unknown_names():
    config = MMRecConfig.preset("tiny", mode="parallel", n_layers=1)
    assert (config.mode, config.n_layers, config.dim) == ("parallel", 1, MMRecConfig.preset("tiny").dim)
    with pytest.raises(ValueError, match="expected name in"):
        MMRecConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown field"):
        MMRecConfig.preset("tiny", width=3)


BAD_FIELDS = [
    ("vocab_size", 0),
    ("dim", -8),
    ("n_layers", 0),
    ("n_heads", 2.0),
    ("segment_len", 0),
    ("top_k", -1),
    ("window", -2),
    ("memory_tokens", True),
    ("memory_tokens", 100),
    ("persistent_slots", 0),
    ("ffn_mult", 0),
    ("norm_eps", 0.0),
    ("init_std", -1.0),
    ("mode", "fast"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f for f, _ in BAD_FIELDS])
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"MMRecConfig.{field}"):
        MMRecConfig(**{field: value})


def test_dim_must_split_into_heads():
    with pytest.raises(ValueError, match=r"MMRecConfig.dim: expected a multiple of n_heads \(3\)"):
        MMRecConfig(dim=128, n_heads=3)
