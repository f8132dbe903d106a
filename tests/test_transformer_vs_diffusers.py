"""Our causal Wan DiT, run uncached on one block of frames, equals diffusers' WanTransformer3DModel."""

from __future__ import annotations

import pytest
import torch

from longlive_core.models.key_mapping import diffusers_to_original, original_to_diffusers
from longlive_core.models.transformer_causal_wan import rope_tables
from tests.checkpoints import diffusers_transformer
from tests.helpers import padded_prompt, rel_err, tiny_model

TOL = 1e-5


@pytest.fixture(scope="module")
def models():
    ours = tiny_model(seed=0)
    ref = diffusers_transformer(ours)
    return ours, ref


def _inputs(frames: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, frames, 6, 8, generator=g)
    timestep = torch.tensor([[900.0, 700.0, 400.0, 50.0][:frames]])
    return latents, timestep, padded_prompt(seed)


def _ours(model, latents, timestep, text, rope=None):
    with torch.no_grad():
        return model(latents, timestep, model.encode_context(text), rope)


def _reference(ref, latents, timestep, text):
    # Diffusers takes per-token timesteps: expand our per-frame ones over each frame's tokens.
    tokens_per_frame = (latents.shape[3] // 2) * (latents.shape[4] // 2)
    per_token = timestep.repeat_interleave(tokens_per_frame, dim=1)
    with torch.no_grad():
        return ref(latents, per_token, text, return_dict=False)[0]


def test_key_mapping_round_trips(models):
    ours, _ = models
    sd = ours.state_dict()
    back = diffusers_to_original(original_to_diffusers(sd))
    assert back.keys() == sd.keys()


def test_matches_diffusers(models):
    ours, ref = models
    latents, timestep, text = _inputs()
    expected = _reference(ref, latents, timestep, text)
    got = _ours(ours, latents, timestep, text)
    assert got.shape == latents.shape
    assert rel_err(got, expected) < TOL


def test_negative_controls_move_output_far_beyond_tolerance(models):
    """Each compared ingredient matters: dropping RoPE, another prompt, other timesteps."""
    ours, ref = models
    latents, timestep, text = _inputs()
    expected = _reference(ref, latents, timestep, text)
    c = ours.config
    no_rope = rope_tables(c, torch.zeros(1, 4, dtype=torch.long), (3, 4), latents.device)
    no_rope = (torch.ones_like(no_rope[0]), torch.zeros_like(no_rope[1]))
    spread_rope = rope_tables(c, torch.arange(4)[None] * 2, (3, 4), latents.device)
    variants = {
        "no rope": _ours(ours, latents, timestep, text, no_rope),
        "temporal positions 0,2,4,6": _ours(ours, latents, timestep, text, spread_rope),
        "other prompt": _ours(ours, latents, timestep, padded_prompt(seed=7)),
        "other timesteps": _ours(ours, latents, timestep.flip(1), text),
    }
    for name, out in variants.items():
        assert rel_err(out, expected) > 1000 * TOL, name


def test_rejects_bad_timestep_shape(models):
    ours, _ = models
    latents, timestep, text = _inputs()
    with pytest.raises(ValueError, match="timestep"):
        _ours(ours, latents, timestep[:, :2], text)


def test_rope_is_relative(models):
    """Shifting every temporal position by the same amount leaves the output unchanged.

    This is what lets the relative ('infinity') mode renumber positions inside the window.
    """
    ours, ref = models
    latents, timestep, text = _inputs()
    shifted = rope_tables(ours.config, torch.arange(4)[None] + 500, (3, 4), latents.device)
    expected = _reference(ref, latents, timestep, text)
    assert rel_err(_ours(ours, latents, timestep, text, shifted), expected) < TOL
