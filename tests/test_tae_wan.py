"""TAEW2_1 tiny decoder: streaming equals whole-video decoding and an independent frame-by-frame
reference; frame counts; the official checkpoint key layout loads by plain load_state_dict."""

from __future__ import annotations

import copy

import pytest
import torch

from longlive_core.models.tae_wan import (
    MemBlock,
    TAEConfig,
    TGrow,
    TinyVideoDecoder,
    init_random_tae,
    load_tae_decoder,
)
from tests.helpers import rel_err

TOL = 1e-5  # float32 chunked vs float32 whole / float64 reference (measured ~5e-7)
LATENT_HW = (4, 6)


@pytest.fixture(scope="module")
def decoder() -> TinyVideoDecoder:
    return init_random_tae(TinyVideoDecoder(TAEConfig.from_name("tiny")), seed=0).eval()


def latents(frames: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 16, frames, *LATENT_HW, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sequential_reference(decoder: TinyVideoDecoder, z: torch.Tensor) -> torch.Tensor:
    """taehv.py's sequential mode, transcribed: one frame at a time through the layer list, each
    MemBlock remembering its last input, each TGrow pushing its sub-frames on in order; float64."""
    layers = list(copy.deepcopy(decoder).double().decoder)
    memory: dict[int, torch.Tensor] = {}
    out: list[torch.Tensor] = []

    def push(x: torch.Tensor, i: int) -> None:
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, MemBlock):
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                x = layer(x, past)
            elif isinstance(layer, TGrow):
                for sub in layer.conv(x).chunk(layer.stride, dim=1):
                    push(sub, i + 1)
                return
            else:
                x = layer(x)
            i += 1
        out.append(x)

    for t in range(z.shape[2]):
        push(z[:, :, t].double(), 0)
    video = torch.stack(out, dim=2)[:, :, decoder.config.frames_to_trim :]
    return video.clamp(0, 1) * 2 - 1


def test_frame_count_and_size(decoder):
    for frames in (1, 2, 5):
        video = decoder.decode(latents(frames, batch=2))
        assert video.shape == (2, 3, 1 + 4 * (frames - 1), 8 * LATENT_HW[0], 8 * LATENT_HW[1])
        assert video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1


def test_whole_decode_matches_sequential_reference(decoder):
    z = latents(4)
    video = decoder.decode(z)
    assert rel_err(video.double(), sequential_reference(decoder, z)) < TOL
    # The random weights make the output informative: mostly unclamped, and it follows the input.
    assert ((video > -1) & (video < 1)).float().mean() > 0.5
    assert rel_err(decoder.decode(latents(4, seed=2)), video) > 0.1


@pytest.mark.parametrize("blocks", [2, 3])
def test_streaming_equals_whole_decode(decoder, blocks):
    z = latents(3 * blocks, batch=2)
    whole = decoder.decode(z)
    stream = decoder.new_stream()
    parts = [stream.decode(z[:, :, 3 * i : 3 * i + 3]) for i in range(blocks)]
    assert [p.shape[2] for p in parts] == [9] + [12] * (blocks - 1)  # 1 + 4(f-1), then 4f
    assert stream.latent_frames == 3 * blocks
    assert rel_err(torch.cat(parts, dim=2), whole) < TOL

    # Negative control: a fresh stream per block forgets the past frames (and trims again).
    for i in range(1, blocks):
        fresh = decoder.new_stream().decode(z[:, :, 3 * i : 3 * i + 3])
        assert fresh.shape[2] == 9
        assert rel_err(fresh, parts[i][:, :, 3:]) > 100 * TOL


def test_stream_memory_is_constant(decoder):
    stream = decoder.new_stream()
    z = latents(9)
    sizes = []
    for i in range(3):
        stream.decode(z[:, :, 3 * i : 3 * i + 3])
        sizes.append([tuple(m.shape) for m in stream.memory])
        assert all(m._base is None for m in stream.memory)  # copies, not views of the activations
    assert len(sizes[0]) == 9 and sizes[0] == sizes[1] == sizes[2]


def test_stream_rejects_bad_blocks(decoder):
    stream = decoder.new_stream()
    with pytest.raises(ValueError, match="block"):
        stream.decode(torch.zeros(1, 8, 2, *LATENT_HW))
    stream.decode(latents(2))
    with pytest.raises(ValueError, match="block"):
        stream.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="latents"):
        decoder.decode(torch.zeros(1, 16, 0, *LATENT_HW))


def test_official_layout_keys_and_shapes():
    state = TinyVideoDecoder(TAEConfig.from_name("taew2_1")).state_dict()
    expected = {
        "decoder.1.weight": (256, 16, 3, 3),
        "decoder.1.bias": (256,),
        "decoder.3.conv.0.weight": (256, 512, 3, 3),
        "decoder.5.conv.4.bias": (256,),
        "decoder.7.conv.weight": (256, 256, 1, 1),  # TGrow stride 1
        "decoder.8.weight": (128, 256, 3, 3),
        "decoder.11.conv.2.weight": (128, 128, 3, 3),
        "decoder.13.conv.weight": (256, 128, 1, 1),  # TGrow stride 2
        "decoder.14.weight": (64, 128, 3, 3),
        "decoder.15.conv.0.weight": (64, 128, 3, 3),
        "decoder.19.conv.weight": (128, 64, 1, 1),
        "decoder.20.weight": (64, 64, 3, 3),
        "decoder.22.weight": (3, 64, 3, 3),
        "decoder.22.bias": (3,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k in state for k in ("decoder.8.bias", "decoder.14.bias", "decoder.20.bias"))
    assert not any(".skip." in k for k in state)
    assert len(state) == 1 * 2 + 9 * 6 + 3 + 3 + 2  # convs 1, 22; 9 MemBlocks; 3 TGrows; 3 projections


def test_load_checkpoint_in_official_layout(decoder, tmp_path):
    # An official-style file: encoder.* (ignored) and decoder.* keys, as taehv.py's TAEHV saves them.
    gen = torch.Generator().manual_seed(5)
    state = {
        "encoder.0.weight": torch.randn(64, 3, 3, 3, generator=gen),
        "encoder.0.bias": torch.randn(64, generator=gen),
        "encoder.4.conv.0.weight": torch.randn(64, 128, 3, 3, generator=gen),
    }
    state.update(decoder.state_dict())
    path = tmp_path / "taew2_1.pth"
    torch.save(state, path)

    loaded = load_tae_decoder(path, "cpu", torch.float32, config="tiny")
    z = latents(5)
    assert torch.equal(loaded.decode(z), decoder.decode(z))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_load_trims_a_wider_tgrow(decoder, tmp_path):
    # taehv.py's patch_tgrow_layers: a stride-2 TGrow weight loaded into a stride-1 layer keeps its last rows.
    state = decoder.state_dict()
    extra = torch.randn_like(state["decoder.7.conv.weight"])
    state["decoder.7.conv.weight"] = torch.cat([extra, state["decoder.7.conv.weight"]])
    torch.save(state, tmp_path / "wide.pth")
    loaded = load_tae_decoder(tmp_path / "wide.pth", config="tiny")
    assert torch.equal(loaded.decoder[7].conv.weight, decoder.decoder[7].conv.weight)


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope" / "taew2_1.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tae_decoder(path, "cpu", torch.float32)


def test_presets():
    cfg = TAEConfig.from_name("taew2_1")
    assert (cfg.latent_channels, cfg.frames_per_latent, cfg.frames_to_trim, cfg.spatial_upscale) == (
        16,
        4,
        3,
        8,
    )
    with pytest.raises(ValueError, match="preset"):
        TAEConfig.from_name("taew2_2")
