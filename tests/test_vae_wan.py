"""Wan2.1 VAE decoder: streaming equals whole decoding and diffusers' AutoencoderKLWan; both formats load;
channels-last and compiled decoding give the same video."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from torch.utils._python_dispatch import TorchDispatchMode

from longlive_core.models.vae_wan import (
    VAEConfig,
    WanVAEDecoder,
    config_from_original,
    init_random_weights,
    load_vae_decoder,
    vae_diffusers_to_original,
    vae_original_to_diffusers,
)
from tests.checkpoints import diffusers_vae
from tests.helpers import rel_err

TOL = 1e-5
BLOCK = 3  # latent frames per streamed block, as the engine produces them


def _denormalise(latents: torch.Tensor, config: VAEConfig) -> torch.Tensor:
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    return latents * std + mean


@pytest.fixture(scope="module")
def decoder() -> WanVAEDecoder:
    return init_random_weights(WanVAEDecoder(VAEConfig.from_name("tiny")), seed=0).eval()


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    # Batch 2, three blocks of 3 latent frames (33 video frames), 4x6 latents (32x48 video).
    return torch.randn(2, 16, 3 * BLOCK, 4, 6, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def whole(decoder, latents) -> torch.Tensor:
    """All latent frames through each layer in one pass."""
    return decoder.decode(latents, block_frames=None)


def _stream(decoder: WanVAEDecoder, latents: torch.Tensor, split: tuple[int, ...]) -> list[torch.Tensor]:
    stream, parts, start = decoder.new_stream(), [], 0
    for size in split:
        parts.append(stream.decode(latents[:, :, start : start + size]))
        start += size
    return parts


@pytest.fixture(scope="module")
def reference(decoder) -> AutoencoderKLWan:
    """Diffusers' VAE with our decoder weights (its encoder stays random)."""
    mapped = vae_original_to_diffusers(decoder.state_dict(), decoder.config)
    vae = diffusers_vae(decoder)
    assert set(mapped) == {k for k in vae.state_dict() if k.startswith(("decoder.", "post_quant_conv."))}
    return vae


def test_whole_decode_shape_and_range(decoder, latents, whole):
    b, _, frames, h, w = latents.shape
    assert whole.shape == (b, 3, 1 + 4 * (frames - 1), 8 * h, 8 * w)
    assert whole.dtype == torch.float32
    assert whole.abs().max() <= 1.0
    # Random weights must give a video that is neither flat nor saturated, or the comparisons are empty.
    assert whole.std() > 0.1
    assert (whole.abs() == 1.0).float().mean() < 0.05
    assert decoder.config.video_frames(frames) == whole.shape[2]


def test_matches_diffusers(decoder, reference, latents, whole):
    """Diffusers' decode takes un-normalised latents: de-normalise as its pipeline does."""
    with torch.no_grad():
        expected = reference.decode(_denormalise(latents, decoder.config)).sample
    assert expected.shape == whole.shape
    assert rel_err(whole, expected) < TOL


# Blocks as the engine makes them; uneven ones; one latent frame per call (Wan's own loop); a first block
# of 2, where the temporal upsamplers pass frame 0 through and double frame 1 in the same call.
@pytest.mark.parametrize("split", [(BLOCK, BLOCK, BLOCK), (1, 4, 2, 2), (1,) * 9, (2, 7)])
def test_streaming_equals_whole_with_a_fixed_size_cache(decoder, latents, whole, split):
    stream = decoder.new_stream()
    parts, cache_bytes, keys = [], [], []
    start = 0
    for size in split:
        parts.append(stream.decode(latents[:, :, start : start + size]))
        start += size
        cache_bytes.append(stream.cache_bytes)
        keys.append(set(stream.cache))
        # Only the last two input frames of every temporal conv are kept.
        assert all(t.shape[2] == 2 for t in stream.cache.values())
    assert [p.shape[2] for p in parts] == [1 + 4 * (split[0] - 1)] + [4 * s for s in split[1:]]
    assert rel_err(torch.cat(parts, dim=2), whole) < TOL
    assert len(set(cache_bytes)) == 1 and all(k == keys[0] for k in keys)
    assert stream.latent_frames == latents.shape[2]


def test_negative_control_cache_reset_between_blocks(decoder, latents, whole):
    """A fresh cache per block loses the history: frames far beyond tolerance from the whole decode."""
    errors = []
    for k in range(1, latents.shape[2] // BLOCK):
        out = decoder.new_stream().decode(latents[:, :, k * BLOCK : (k + 1) * BLOCK])
        # The block's latent frames 1..2 give its last 8 frames; in the whole video they are these.
        first = 1 + 4 * (k * BLOCK)
        errors.append(rel_err(out[:, :, 1:], whole[:, :, first : first + 4 * (BLOCK - 1)]))
    assert min(errors) > 1000 * TOL


def test_stream_reset_starts_a_new_video(decoder, latents, whole):
    stream = decoder.new_stream()
    stream.decode(latents[:, :, BLOCK:])
    stream.reset()
    assert stream.cache_bytes == 0
    assert rel_err(stream.decode(latents[:, :, :BLOCK]), whole[:, :, : 1 + 4 * (BLOCK - 1)]) < TOL


@pytest.mark.parametrize("frames", [1, 2, 3])
def test_first_block_temporal_upsampling_matches_diffusers(decoder, reference, latents, frames):
    """A video's first call holds latent frame 0 (1 video frame, not doubled in time) and later frames
    (4 each): diffusers decodes it one latent frame at a time."""
    ours = decoder.new_stream().decode(latents[:, :, :frames])
    with torch.no_grad():
        expected = reference.decode(_denormalise(latents[:, :, :frames], decoder.config)).sample
    assert ours.shape == expected.shape == (latents.shape[0], 3, 1 + 4 * (frames - 1), 32, 48)
    assert rel_err(ours, expected) < TOL


def test_decode_in_blocks_equals_one_pass(decoder, latents, whole):
    for block_frames in (1, 2, BLOCK, 100):
        assert rel_err(decoder.decode(latents, block_frames=block_frames), whole) < TOL
    with pytest.raises(ValueError, match="block_frames"):
        decoder.decode(latents, block_frames=0)


def test_cache_is_allocated_once_and_written_in_place(decoder, latents):
    stream = decoder.new_stream()
    stream.decode(latents[:, :, :BLOCK])
    stream.decode(latents[:, :, BLOCK : 2 * BLOCK])
    pointers = {k: v.data_ptr() for k, v in stream.cache.items()}
    stream.decode(latents[:, :, 2 * BLOCK :])
    assert {k: v.data_ptr() for k, v in stream.cache.items()} == pointers


class _ConvLayouts(TorchDispatchMode):
    """Records, for every convolution, whether its input and output are channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.layouts: list[tuple[bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default and args[0].ndim == 5:
            cl = torch.channels_last_3d
            self.layouts.append(
                (args[0].is_contiguous(memory_format=cl), out.is_contiguous(memory_format=cl))
            )
        return out


def test_channels_last_keeps_the_layout_and_the_result(decoder, latents, whole):
    fast = WanVAEDecoder(decoder.config).eval()
    fast.load_state_dict(decoder.state_dict())
    fast.to_channels_last()
    with _ConvLayouts() as mode:
        parts = _stream(fast, latents, (BLOCK, BLOCK, BLOCK))
    # Every conv reads and writes NDHWC: no layout conversion anywhere between the layers.
    assert mode.layouts and all(i and o for i, o in mode.layouts)
    assert rel_err(torch.cat(parts, dim=2), whole) < TOL
    # Negative control: the default layout is not channels-last.
    with _ConvLayouts() as mode:
        _stream(decoder, latents, (BLOCK,))
    assert not any(i for i, _ in mode.layouts)


def test_compiled_block_step_traces_whole_and_decodes_the_same(decoder, latents, whole):
    """The per-block step traces as one graph (fullgraph) for a first and a later block; the eager-backend
    compile keeps CPU test time low and checks what torch.compile sees."""
    compiled = WanVAEDecoder(decoder.config).eval()
    compiled.load_state_dict(decoder.state_dict())
    compiled.compile_block(backend="aot_eager", fullgraph=True)
    parts = _stream(compiled, latents, (BLOCK, BLOCK, BLOCK))
    assert rel_err(torch.cat(parts, dim=2), whole) < TOL


def test_key_mapping_round_trips(decoder):
    sd = decoder.state_dict()
    back = vae_diffusers_to_original(vae_original_to_diffusers(sd, decoder.config), decoder.config)
    assert back.keys() == sd.keys()


def test_full_size_layout_is_the_original_checkpoints():
    """Wan2.1 size: our parameter names and shapes are those diffusers' own converter expects from
    Wan2.1_VAE.pth, our mapping agrees with that converter, and the config is read back from shapes."""
    config = VAEConfig.from_name("wan2.1")
    with torch.device("meta"):
        ours = WanVAEDecoder(config)
        vae = AutoencoderKLWan()
    sd = ours.state_dict()
    expected = {
        k: v.shape for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))
    }
    converted = {k: v.shape for k, v in convert_wan_vae_to_diffusers(sd).items()}
    assert converted == expected
    assert {k: v.shape for k, v in vae_original_to_diffusers(sd, config).items()} == expected
    assert config_from_original(sd) == config


def test_loads_original_pth_without_encoder(decoder, latents, whole, tmp_path):
    sd = dict(decoder.state_dict())
    # The full checkpoint also holds the encoder half, which decoding drops.
    sd["encoder.conv1.weight"] = torch.randn(16, 3, 3, 3, 3)
    sd["conv1.weight"] = torch.randn(32, 32, 1, 1, 1)
    sd["conv1.bias"] = torch.randn(32)
    plain, wrapped = tmp_path / "Wan2.1_VAE.pth", tmp_path / "wrapped.pth"
    torch.save(sd, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    for path in (plain, wrapped):
        loaded = load_vae_decoder(path)
        assert loaded.config == decoder.config  # inferred from the tensor shapes
        assert rel_err(loaded.decode(latents), whole) < TOL


def test_loads_diffusers_directory(decoder, reference, latents, whole, tmp_path):
    reference.save_pretrained(tmp_path / "vae")
    loaded = load_vae_decoder(tmp_path / "vae")
    assert loaded.config == decoder.config
    assert rel_err(loaded.decode(latents), whole) < TOL


def test_bfloat16_decode_is_close(decoder, latents, whole, tmp_path):
    path = tmp_path / "vae.pth"
    torch.save(decoder.state_dict(), path)
    loaded = load_vae_decoder(path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    out = loaded.decode(latents[:1, :, :2])
    assert out.dtype == torch.float32
    assert rel_err(out, whole[:1, :, : out.shape[2]]) < 0.05


def test_missing_files_name_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "Wan2.1_VAE.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vae_decoder(missing)
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae_decoder(tmp_path / "vae")


def test_rejects_bad_latents(decoder, latents):
    with pytest.raises(ValueError, match="latents"):
        decoder.decode(latents[:, :8])
    stream = decoder.new_stream()
    stream.decode(latents[:, :, :1])
    with pytest.raises(ValueError, match="block"):
        stream.decode(latents[:, :, 1:2, :2])
    with pytest.raises(ValueError, match="unknown VAE preset"):
        VAEConfig.from_name("huge")
