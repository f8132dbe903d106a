"""TAEW2_1: the tiny video decoder for Wan 2.1 latents, in the official `taew2_1.pth` key layout.

Architecture of madebyollin's TAEHV decoder (MIT, github.com/madebyollin/taehv, `taehv.py`), written
anew. The decoder is one `nn.Sequential` whose positional indices are the checkpoint keys
(`decoder.9.conv.0.weight`), so its layout must not be renumbered:

     0 Clamp              tanh(x/3)*3
     1 conv 16 -> 256     3x3, bias           2 ReLU
     3..5 MemBlock(256)   6 Upsample x2       7 TGrow(256, 1)     8 conv 256 -> 128, no bias
     9..11 MemBlock(128) 12 Upsample x2      13 TGrow(128, 2)    14 conv 128 -> 64, no bias
    15..17 MemBlock(64)  18 Upsample x2      19 TGrow(64, 2)     20 conv 64 -> 64, no bias
    21 ReLU              22 conv 64 -> 3      3x3, bias

Time: every MemBlock mixes its input frame with the previous frame's input to that same block (zero
before the first frame); the two stride-2 TGrows turn each latent frame into 4 frames. The decoder
thus emits 4F frames for F latents, and the first 3 are dropped (they prime the memory), giving
Wan's 1 + 4(F-1). Because the only state is "the last input frame of each MemBlock", a stream that
carries those 9 frames across calls decodes exactly what one whole-video pass does, in constant
memory (the official sequential mode keeps the same per-block frame; its parallel mode shifts the
input by one frame).

Latent space: TAEHV applies no scale or shift ("TAEHV encodes / decodes exactly what diffusion models
use", taehv README), i.e. TAEW2_1 takes the Wan DiT's *normalised* latents (z - mean) / std directly -
the Self-Forcing demo feeds the DiT's denoised prediction straight into it. So unlike the Wan VAE
decoder there is no de-normalisation here. Its pixels are in [0, 1]; we return [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TAEConfig:
    """Sizes of the TAEHV decoder. `taew2_1` is the official checkpoint's; `tiny` is for CPU tests."""

    latent_channels: int = 16
    widths: tuple[int, int, int, int] = (256, 128, 64, 64)  # stage 0, 1, 2 widths, then the last conv's
    time_upscale: tuple[int, int, int] = (1, 2, 2)  # TGrow stride per stage
    image_channels: int = 3
    # Derived in __post_init__.
    frames_per_latent: int = field(init=False)  # 4: output frames per latent frame
    frames_to_trim: int = field(init=False)  # 3: leading frames dropped so F latents give 1 + 4(F-1)
    spatial_upscale: int = field(init=False)  # 8: three x2 upsamplings

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "time_upscale", tuple(self.time_upscale))
        if len(self.widths) != 4 or min(self.widths) < 1:
            raise ValueError(f"widths must be 4 positive ints, got {self.widths}")
        if len(self.time_upscale) != 3 or any(s not in (1, 2) for s in self.time_upscale):
            raise ValueError(f"time_upscale must be 3 strides of 1 or 2, got {self.time_upscale}")
        frames = math.prod(self.time_upscale)
        object.__setattr__(self, "frames_per_latent", frames)
        object.__setattr__(self, "frames_to_trim", frames - 1)
        object.__setattr__(self, "spatial_upscale", 8)

    @classmethod
    def from_name(cls, name: str) -> TAEConfig:
        if name not in TAE_PRESETS:
            raise ValueError(f"unknown TAE preset {name!r}; known presets: {sorted(TAE_PRESETS)}")
        return cls(**TAE_PRESETS[name])


TAE_PRESETS: dict[str, dict[str, Any]] = {
    "taew2_1": {},
    # Same layer stack and time structure, narrow channels: CPU-fast.
    "tiny": dict(widths=(16, 8, 8, 8)),
}


def conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block that also sees the previous frame: relu(convs([x, past]) + x).

    Only the decoder's equal-width form exists here (no `skip` conv, so no `skip.*` keys).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(2 * channels, channels),
            nn.ReLU(),
            conv3x3(channels, channels),
            nn.ReLU(),
            conv3x3(channels, channels),
        )

    def forward(self, x: Tensor, past: Tensor) -> Tensor:
        # x, past: [n, C, H, W] -> [n, C, H, W]
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + x)


class TGrow(nn.Module):
    """Temporal up-sampling: a 1x1 conv to stride*C channels, split into `stride` consecutive frames."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: [b*t, C, H, W] -> [b*t*stride, C, H, W]; channel group j becomes sub-frame j.
        n, c, h, w = x.shape
        return self.conv(x).reshape(n * self.stride, c, h, w)


class TinyVideoDecoder(nn.Module):
    """TAEHV decoder: normalised Wan latents [b, 16, F, h, w] -> video [b, 3, 1+4(F-1), 8h, 8w] in [-1, 1]."""

    def __init__(self, config: TAEConfig):
        super().__init__()
        self.config = config
        n = config.widths
        layers: list[nn.Module] = [Clamp(), conv3x3(config.latent_channels, n[0]), nn.ReLU()]
        for stage in range(3):
            layers += [MemBlock(n[stage]) for _ in range(3)]
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                TGrow(n[stage], config.time_upscale[stage]),
                conv3x3(n[stage], n[stage + 1], bias=False),
            ]
        layers += [nn.ReLU(), conv3x3(n[3], config.image_channels)]
        self.decoder = nn.Sequential(*layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    def check_latents(self, latents: Tensor, name: str = "latents") -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels or latents.shape[2] < 1:
            raise ValueError(
                f"{name} must have shape [b, {self.config.latent_channels}, frames>=1, h, w], "
                f"got {tuple(latents.shape)}"
            )

    def new_stream(self) -> TAEStream:
        """A decoding stream: feed latent blocks in order, get each block's frames back."""
        return TAEStream(self)

    def decode(self, latents: Tensor) -> Tensor:
        """Whole video: [b, 16, F, h, w] -> [b, 3, 1 + 4(F-1), 8h, 8w] float32 in [-1, 1]."""
        self.check_latents(latents)
        return self.new_stream().decode(latents)

    def run_frames(self, frames: Tensor, memory: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        """Run the stack over frames [b, t, C, h, w], all in parallel, given each MemBlock's past frame.

        memory: per MemBlock, its input at the frame before `frames` ([b, C_i, H_i, W_i]); None = zeros
        (start of the video). Returns raw frames [b, t*4, 3, 8h, 8w] (4 = frames_per_latent; before
        clamping) and the memory after the last frame.
        """
        b = frames.shape[0]
        x = frames.flatten(0, 1)  # [b*t, C, h, w], batch-major so TGrow sub-frames stay in time order
        new_memory: list[Tensor] = []
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                # Each frame's past is the frame before it; the first one's comes from the memory.
                seq = x.unflatten(0, (b, -1))  # [b, t_i, C_i, H_i, W_i]
                if memory is None:
                    first_past = torch.zeros_like(seq[:, :1])
                else:
                    first_past = memory[len(new_memory)][:, None]
                past = torch.cat([first_past, seq[:, :-1]], dim=1).flatten(0, 1)
                new_memory.append(seq[:, -1].clone())  # a copy: a view would pin the whole activation
                x = layer(x, past)
            else:
                x = layer(x)
        return x.unflatten(0, (b, -1)), new_memory


class TAEStream:
    """Decodes a latent video block by block, carrying the decoder's temporal memory between calls.

    State: one frame per MemBlock (9 tensors of fixed size), so memory is constant however long the
    stream runs. Blocks must keep the batch size and latent size of the first one.
    """

    def __init__(self, decoder: TinyVideoDecoder):
        self.decoder = decoder
        self.memory: list[Tensor] | None = None
        self.latent_frames = 0  # latent frames decoded so far
        self._shape: tuple[int, int, int] | None = None  # (b, h, w) fixed by the first block

    @torch.no_grad()
    def decode(self, block: Tensor) -> Tensor:
        """Next latent frames [b, 16, f, h, w] -> video [b, 3, n, 8h, 8w] float32 in [-1, 1].

        n = 1 + 4(f-1) on the first call, 4f afterwards.
        """
        dec = self.decoder
        dec.check_latents(block, "block")
        b, _, f, h, w = block.shape
        if self._shape is not None and (b, h, w) != self._shape:
            raise ValueError(f"block must keep batch and latent size {self._shape}, got {(b, h, w)}")

        # 1. [b, C, f, h, w] -> frames-first [b, f, C, h, w] in the decoder's dtype and device.
        frames = block.to(device=dec.device, dtype=dec.dtype).transpose(1, 2)

        # 2. Decoder stack over the f frames, starting from the memory the last block left.
        out, self.memory = dec.run_frames(frames, self.memory)  # [b, 4f, 3, 8h, 8w]

        # 3. The first block's first 3 frames only prime the memory: drop them (1 + 4(f-1) remain).
        if self.latent_frames == 0:
            out = out[:, dec.config.frames_to_trim :]
        self.latent_frames += f
        self._shape = (b, h, w)

        # 4. [0, 1] pixels -> [-1, 1], channels-first video [b, 3, n, H, W].
        return (out.float().clamp(0, 1) * 2 - 1).transpose(1, 2).contiguous()


def init_random_tae(decoder: TinyVideoDecoder, seed: int = 0) -> TinyVideoDecoder:
    """Deterministic random weights under which the latents and the temporal memory visibly matter.

    Convs ~ U(+-sqrt(3/fan_in)) (unit gain, so activations neither vanish nor blow up through the
    residual stack), biases non-zero; the output bias is centred on 0.5 so pixels mostly stay inside
    the [0, 1] clamp rather than saturating. For tests and the built-in tiny model.
    """
    gen = torch.Generator().manual_seed(seed)
    last = f"decoder.{len(decoder.decoder) - 1}.bias"
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if p.ndim > 1:
                bound = math.sqrt(3.0 / p[0].numel())
                values = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            else:
                values = torch.randn(p.shape, generator=gen) * 0.1 + (0.5 if name == last else 0.0)
            p.copy_(values.to(p.dtype))
    return decoder


def load_tae_decoder(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: TAEConfig | str = "taew2_1",
) -> TinyVideoDecoder:
    """The decoder half of an official TAEHV checkpoint (`taew2_1.pth`: `encoder.*` + `decoder.*` keys)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"TAE checkpoint not found: {path} (taew2_1.pth is in github.com/madebyollin/taehv)"
        )
    if isinstance(config, str):
        config = TAEConfig.from_name(config)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    decoder = TinyVideoDecoder(config)
    # taehv.py's patch_tgrow_layers: a TGrow trained at a larger stride than the one built keeps its
    # last sub-frame's rows. A no-op for taew2_1 (its decoder.7 is already stride 1).
    for i, layer in enumerate(decoder.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in state and state[key].shape[0] > layer.conv.weight.shape[0]:
            state[key] = state[key][-layer.conv.weight.shape[0] :]
    decoder.load_state_dict(state, strict=True)
    return decoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
