"""Configuration: presets, derived fields, validation errors that name the problem."""

from __future__ import annotations

import pytest

from longlive_core.config import GenerationConfig, ModelConfig
from longlive_core.models.transformer_causal_wan import CausalWanTransformer
from longlive_core.sampler import FlowMatchSampler


def test_full_size_preset_matches_wan21_t2v_13b():
    c = ModelConfig.from_name("wan2.1-t2v-1.3b")
    assert (c.dim, c.num_layers, c.num_heads, c.head_dim, c.ffn_dim) == (1536, 30, 12, 128, 8960)
    assert c.rope_dims == (44, 42, 42)
    with __import__("torch").device("meta"):
        model = CausalWanTransformer(c)
    assert sum(p.numel() for p in model.parameters()) == 1_418_996_800


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.from_name("wan-99b")


def test_config_round_trips_through_a_dict():
    c = ModelConfig.from_name("tiny")
    assert ModelConfig(**c.to_dict()) == c
    g = GenerationConfig(rope_mode="relative")
    assert GenerationConfig(**g.to_dict()) == g


def test_warped_steps_match_the_reference_schedule():
    sampler = FlowMatchSampler(GenerationConfig())
    assert sampler.timesteps == pytest.approx((1000.0, 937.5, 833.3333, 625.0), rel=1e-6)
    assert sampler.sigmas == pytest.approx((1.0, 0.9375, 0.8333333, 0.625), rel=1e-6)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"window_frames": 2}, "smaller than a block"),
        ({"sink_frames": 10}, "sink_frames"),
        ({"block_frames": 0}, "block_frames"),
        ({"denoising_steps": (250.0, 500.0)}, "decreasing"),
        ({"denoising_steps": ()}, "empty"),
        ({"shift": 0.0}, "shift"),
        ({"rope_mode": "sideways"}, "rope_mode"),
        ({"recache": "sometimes"}, "recache"),
    ],
)
def test_generation_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**changes)


def test_model_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(dim=100, num_heads=12)
