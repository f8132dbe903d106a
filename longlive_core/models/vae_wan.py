"""Wan2.1 VAE decoder (latents -> RGB video) in the original `Wan2.1_VAE.pth` key layout, streamable.

Only the decoding half of the VAE: the post-quant conv `conv2` and the `decoder`. The decoder is causal in
time. Every temporal conv keeps its last two input frames in a `FrameCache`, so decoding a video block by
block (`new_stream().decode(block)`) gives the frames of decoding it whole, with a cache whose size does not
depend on the video's length. Each call runs all its latent frames through each layer at once (Wan runs
one latent frame at a time; the result is the same, the convolutions get more frames per launch).

Sizes: latent frame 0 -> 1 video frame, every later latent frame -> 4 (temporal_scale); 8x in h and w.

Memory traffic (Wan2.1 at 480x832, bf16, a steady block of 3 latent frames = 12 video frames; bytes read
plus written). An activation frame is 76.7 MB at 480x832 x 96 channels, 38.3 MB at 240x416 x 192; those
stages run 7 and 6 temporal 3x3x3 convs on 12 frames. Feeding a conv `cat([cache, x])` and cloning its
last two frames moves 2 (2 + t) + 4 frames: 2.5 GB per conv at 480x832 for t = 12, and ~43 GB per block
when, as in Wan, each call holds one latent frame (t = 4 there). Here the norm + SiLU that feeds a conv
writes into a buffer right after the conv's two cached frames: 8 frames moved, 0.6 GB per conv at
480x832, ~8 GB per block. Norm + SiLU move ~18 bytes per element (bf16 in, float32 maths, bf16 out)
instead of ~44 (upcast copy, normalise, two scalings, downcast, SiLU): ~90 GB per block instead of ~220 GB
over the ~5 G elements normed. Convs pad h and w themselves (no F.pad); 2x upsampling copies in the
activation dtype on the 5D tensor (no float32 round trip, no frame folding). The convs do ~20 T
multiply-adds per block, the floor at ~500 TFLOP/s is ~80 ms. `to_channels_last()` keeps every
activation channels-last (NDHWC) end to end; `compile_block()` fuses the remaining element-wise work.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Temporal conv's module name -> its last input frames [b, c, kernel_t - 1, h, w] (two for every Wan conv).
FrameCache = dict[str, Tensor]

# Per-channel statistics of Wan2.1 latents: the DiT works on (z - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the Wan2.1 VAE decoder. Names follow Wan's; `temporal_upsample` is the reverse of
    Wan's `temperal_downsample` (the decoder's stages run from the smallest resolution up)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_upsample: tuple[bool, ...] = (True, True, False)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    # Derived in __post_init__.
    spatial_scale: int = field(init=False)  # video pixels per latent pixel, per side
    temporal_scale: int = field(init=False)  # video frames per latent frame after the first

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "attn_scales", tuple(float(s) for s in self.attn_scales))
        object.__setattr__(self, "temporal_upsample", tuple(bool(t) for t in self.temporal_upsample))
        object.__setattr__(self, "latents_mean", tuple(float(m) for m in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(s) for s in self.latents_std))
        for name in ("base_dim", "z_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if len(self.dim_mult) < 2 or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult must hold at least 2 positive multipliers, got {self.dim_mult}")
        if any(self.base_dim * m % 2 for m in self.dim_mult):
            raise ValueError(f"base_dim * dim_mult must be even (upsampling halves channels), got {self}")
        if len(self.temporal_upsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_upsample needs one flag per upsampling stage ({len(self.dim_mult) - 1}), "
                f"got {self.temporal_upsample}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} needs z_dim ({self.z_dim}) values, got {len(getattr(self, name))}")
        if min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got {self.latents_std}")
        object.__setattr__(self, "spatial_scale", 2 ** (len(self.dim_mult) - 1))
        object.__setattr__(self, "temporal_scale", 2 ** sum(self.temporal_upsample))

    @classmethod
    def from_name(cls, name: str) -> VAEConfig:
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; known presets: {sorted(VAE_PRESETS)}")
        return cls(**VAE_PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("spatial_scale", "temporal_scale")}

    def video_frames(self, latent_frames: int) -> int:
        """Frames decoded from a video's first `latent_frames` latent frames: 1 + 4 (F - 1) for Wan."""
        return 1 + self.temporal_scale * (latent_frames - 1) if latent_frames > 0 else 0


VAE_PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1": {},
    # Narrow and shallow, CPU-fast; same structure (both temporal upsamplings, shortcuts, mid attention)
    # and z_dim 16 so it pairs with the DiT's latent channels.
    "tiny": dict(base_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
}


# -- building blocks (parameter names are Wan's) ------------------------------------------------------


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout new activations take after `x`: channels-last when x's channels are its innermost dim."""
    return torch.channels_last_3d if x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def _store(cache: FrameCache, key: str, frames: Tensor) -> None:
    """Keep `frames` (a view into a larger input) as `key`'s history: written in place into the cached
    tensor when it has the same shape, so the cache is allocated once per stream."""
    past = cache.get(key)
    if past is not None and past.shape == frames.shape and past.dtype == frames.dtype:
        past.copy_(frames)
    else:
        cache[key] = frames.clone()


class CausalConv3d(nn.Conv3d):
    """3D conv that is causal in time: output frame t sees input frames t - k_t + 1 .. t.

    The k_t - 1 frames before a call's first frame come from `cache` (zeros at the start of a video, as
    Wan's zero padding); the call's last k_t - 1 input frames are stored back for the next call. Without
    a cache the call is a whole clip. The conv pads h and w itself, and never in time.

    `forward(x, cache)` copies x after the history. To skip that copy, the layer producing the input writes
    it into `padded_input(...)[:, :, history:]` and calls `forward_padded`.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int]):
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_dim, out_dim, kernel, padding=(0, kernel[1] // 2, kernel[2] // 2))
        self.history = kernel[0] - 1
        self.cache_key = ""  # its module name, set by WanVAEDecoder

    def padded_input(self, like: Tensor, cache: FrameCache | None) -> Tensor:
        """[b, c_in, history + t, h, w] for an input shaped like `like` ([b, c_in, t, h, w], same dtype,
        device and layout): the cached frames first (zeros at the start of a video), the t new frames left
        unset."""
        b, c, t, h, w = like.shape
        buf = torch.empty(
            (b, c, self.history + t, h, w),
            dtype=like.dtype,
            device=like.device,
            memory_format=_memory_format(like),
        )
        past = cache.get(self.cache_key) if cache is not None else None
        if past is None:
            buf[:, :, : self.history].zero_()
        else:
            buf[:, :, : self.history].copy_(past)
        return buf

    def forward_padded(self, padded: Tensor, cache: FrameCache | None) -> Tensor:
        # padded: [b, c_in, history + t, h, w] from padded_input -> [b, c_out, t, h, w]
        if cache is not None and self.history:
            _store(cache, self.cache_key, padded[:, :, -self.history :])
        return super().forward(padded)

    def forward(self, x: Tensor, cache: FrameCache | None = None) -> Tensor:
        # x: [b, c_in, t, h, w] -> [b, c_out, t, h, w]
        if not self.history:
            return super().forward(x)
        padded = self.padded_input(x, cache)
        padded[:, :, self.history :].copy_(x)
        return self.forward_padded(padded, cache)


class RMSNorm(nn.Module):
    """Wan's RMS_norm over channels (dim 1): x / ||x|| * sqrt(C) * gamma, in float32 (or float64)."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.scale = dim**0.5
        # [C, 1, 1, 1] for video tensors, [C, 1, 1] for images: the shapes stored in the checkpoint.
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def _normalised(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """x / ||x|| * (sqrt(C) gamma), computed in float32 at least from x in any dtype without an upcast
        copy; the last multiplication writes into `out` (any dtype and strides) when given."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        # As F.normalize (eps 1e-12); on CUDA the norm reads bf16 and accumulates in float32.
        denom = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=dtype).clamp_min_(1e-12)
        gamma = self.gamma.view(-1, *([1] * (x.ndim - 2))).to(dtype) * self.scale  # [C, 1, ...], tiny
        y = torch.div(x, denom)
        return y.mul_(gamma) if out is None else torch.mul(y, gamma, out=out)

    def forward(self, x: Tensor) -> Tensor:
        # x: [b, C, ...] (a video or an image) -> same shape and dtype
        return self._normalised(x).type_as(x)

    def silu_into(self, x: Tensor, padded: Tensor) -> Tensor:
        """SiLU(norm(x)) written into the frames after the history of `padded` (a conv's `padded_input`),
        rounded to padded's dtype before the SiLU as `F.silu(norm(x))` is. Returns `padded`."""
        out = padded[:, :, padded.shape[2] - x.shape[2] :]
        if torch.compiler.is_compiling():
            # Dynamo takes no strided `out=`; Inductor fuses this chain and writes into the slice itself.
            out.copy_(F.silu(self._normalised(x).to(out.dtype)))
        else:
            F.silu(self._normalised(x, out=out), inplace=True)
        return padded


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, 3),
            nn.SiLU(),
            nn.Identity(),  # Wan's Dropout(0.0); kept so the parameter indices match the checkpoint
            CausalConv3d(out_dim, out_dim, 3),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        # x: [b, in_dim, t, h, w] -> [b, out_dim, t, h, w]
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        # 1. Norm, SiLU, causal 3x3x3 conv; the activation lands right after the conv's cached frames.
        h = conv1.forward_padded(norm1.silu_into(x, conv1.padded_input(x, cache)), cache)
        # 2. Again (Wan's dropout is the identity).
        h = conv2.forward_padded(norm2.silu_into(h, conv2.padded_input(h, cache)), cache)
        # 3. Shortcut, added in place.
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame; frames do not see each other (they are
    folded into the batch, all frames of a call at once)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        # x: [b, c, t, h, w] -> [b, c, t, h, w]
        b, c, t, h, w = x.shape
        # 1. Pixels as tokens, frames in the batch: [b*t, h*w, c] (a free view when x is channels-last).
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        # 2. q, k, v (the 1x1 conv as a linear layer): [b*t, 1, h*w, c] each (one head).
        q, k, v = (
            F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias).unsqueeze(1).chunk(3, dim=-1)
        )
        # 3. Attention over the frame's pixels, output projection: [b*t, h*w, c].
        out = F.linear(
            F.scaled_dot_product_attention(q, k, v).squeeze(1), self.proj.weight.flatten(1), self.proj.bias
        )
        # 4. Residual, back to [b, c, t, h, w].
        return x + out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Upsample2x(nn.Module):
    """Nearest 2x upsampling of h and w (of every frame of a video). For a factor of 2 "nearest" and Wan's
    "nearest-exact" pick the same pixels, and copying is exact in any dtype: no float32 round trip."""

    def forward(self, x: Tensor) -> Tensor:
        # x: [b, c, t, h, w] -> [b, c, t, 2h, 2w] (or [b, c, h, w] -> [b, c, 2h, 2w])
        scale = (1.0, 2.0, 2.0) if x.ndim == 5 else (2.0, 2.0)
        return F.interpolate(x, scale_factor=scale, mode="nearest")


class Resample(nn.Module):
    """2x spatial upsampling (nearest, then a 3x3 conv that halves the channels); when `temporal`, first
    2x in time: a causal (3, 1, 1) conv makes two output frames per input frame, except for the video's
    very first frame, which passes through once."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        # x: [b, c, t, h, w] -> [b, c/2, t', 2h, 2w]; t' = 2t, or 1 + 2 (t - 1) for the video's first call
        # 1. Temporal 2x.
        if self.temporal:
            x = self._upsample_time(x, cache)
        # 2. Spatial 2x of every frame: the 3x3 conv as a (1, 3, 3) conv over the video (no frame folding).
        upsample, conv = self.resample
        return F.conv3d(upsample(x), conv.weight.unsqueeze(2), conv.bias, padding=(0, 1, 1))

    def _upsample_time(self, x: Tensor, cache: FrameCache) -> Tensor:
        b, c, t, h, w = x.shape
        conv = self.time_conv
        # 1. The video's first frame is not doubled (hence 1 + 4 (F - 1) frames): it only starts the time
        #    conv, whose history stays zeros, so the call's later frames see a zero past as in Wan.
        first = int(conv.cache_key not in cache)
        if first:
            cache[conv.cache_key] = x.new_zeros(b, c, conv.history, h, w)
            if t == 1:
                return x
        # 2. Time conv of the frames that are doubled: [b, 2c, t - first, h, w], channel halves are the
        #    output frames 2i and 2i + 1.
        doubled = conv(x[:, :, first:], cache)
        # 3. Interleave the halves into time, after the passed-through first frame:
        #    [b, c, first + 2 (t - first), h, w].
        n = t - first
        out = torch.empty(
            (b, c, first + 2 * n, h, w), dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
        )
        if first:
            out[:, :, :1].copy_(x[:, :, :1])
        out[:, :, first:].view(b, c, n, 2, h, w).copy_(
            doubled.view(b, 2, c, n, h, w).permute(0, 2, 3, 1, 4, 5)
        )
        return out


def _run(layers: nn.Sequential, x: Tensor, cache: FrameCache) -> Tensor:
    """Apply `layers` in order, handing the frame cache to those that keep temporal state."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


class Decoder3d(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        mult = config.dim_mult
        # Stage widths, from the latent resolution up: the middle runs at dims[0].
        dims = [config.base_dim * m for m in (mult[-1], *reversed(mult))]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])
        )
        # One flat list, as in Wan: per stage, num_res_blocks + 1 residual blocks (each followed by
        # attention when the stage's scale is in attn_scales), then an upsampling except after the last.
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(mult) - 2)
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if stage > 0:
                in_dim //= 2  # the previous stage's upsampling conv halved the channels
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                if scale in config.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if stage < len(mult) - 1:
                layers.append(Resample(out_dim, temporal=config.temporal_upsample[stage]))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, x: Tensor, cache: FrameCache) -> Tensor:
        """x: [b, z_dim, f, h, w], the next f latent frames -> [b, 3, 4f (1 + 4 (f - 1) first), 8h, 8w]."""
        # 1. Latent channels -> the widest features.
        x = self.conv1(x, cache)
        # 2. Middle: residual block, per-frame attention, residual block.
        x = _run(self.middle, x, cache)
        # 3. Upsampling stages: 2x in h and w each, 2x in time where flagged (not for the first frame).
        x = _run(self.upsamples, x, cache)
        # 4. Head: norm, SiLU, conv to RGB.
        norm, _, conv = self.head
        return conv.forward_padded(norm.silu_into(x, conv.padded_input(x, cache)), cache)


# -- the decoder and its stream -----------------------------------------------------------------------


class WanVAEDecoder(nn.Module):
    """Decoding half of the Wan2.1 VAE: DiT-space latents [b, 16, F, h, w] -> video [b, 3, 1+4(F-1), 8h, 8w].

    Parameters are named as in `Wan2.1_VAE.pth` (`conv2.*`, `decoder.*`): its decoder keys load as is.
    On GPU: `to_channels_last()` (cuDNN's NDHWC kernels, no layout conversions between layers),
    `torch.backends.cudnn.benchmark = True`, and optionally `compile_block()`.
    """

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        self.conv2 = CausalConv3d(self.config.z_dim, self.config.z_dim, 1)  # post-quant conv
        self.decoder = Decoder3d(self.config)
        for name, module in self.named_modules():
            if isinstance(module, CausalConv3d):
                module.cache_key = name
        self.channels_last = False  # activations in NDHWC; see to_channels_last
        self._compiled_block: Any = None  # set by compile_block

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def to_channels_last(self) -> WanVAEDecoder:
        """Channels-last (NDHWC) conv weights and activations, for cuDNN's tensor-core kernels.

        The latents are converted once per call; every layer then keeps the layout: padded conv inputs and
        time-upsampled frames are allocated channels-last, element-wise ops and 2x upsampling follow their
        input, and attention folds frames into tokens by a view. Same results as the default layout (up to
        the summation order of the convs). The decoded video comes back in that layout too (its frames as
        [T, H, W, 3] are then a free view). Returns self.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                layout = torch.channels_last_3d if module.weight.ndim == 5 else torch.channels_last
                module.weight.data = module.weight.data.contiguous(memory_format=layout)
        self.channels_last = True
        return self

    def compile_block(self, **options: Any) -> WanVAEDecoder:
        """torch.compile the per-block step (de-normalise, decoder, clamp) that `decode` and every stream
        run; `options` go to torch.compile. A video's first block (empty cache) and later blocks of another
        size are separate graphs: warm up with a first block and a steady-state block before timing.
        Returns self."""
        self._compiled_block = torch.compile(self._decode_block, **options)
        return self

    def new_stream(self) -> DecoderStream:
        """A fresh video: decode its latent frames block by block with `stream.decode(block)`."""
        return DecoderStream(self)

    def decode(self, latents: Tensor, block_frames: int | None = 3) -> Tensor:
        """Whole video: latents [b, z_dim, F, h, w] in the DiT's normalised space -> float32 video
        [b, 3, 1 + 4 (F - 1), 8h, 8w] in [-1, 1].

        Decoded `block_frames` latent frames per pass (None: all at once). The result does not depend on
        it; the peak memory grows with it."""
        _check_latents(latents, self.config, "latents")
        if block_frames is not None and block_frames < 1:
            raise ValueError(f"block_frames must be >= 1 or None, got {block_frames}")
        step = block_frames or latents.shape[2]
        stream = self.new_stream()
        parts = [stream.decode(latents[:, :, i : i + step]) for i in range(0, latents.shape[2], step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def forward(self, latents: Tensor) -> Tensor:
        return self.decode(latents)

    @torch.no_grad()
    def _decode_frames(self, latents: Tensor, cache: FrameCache) -> Tensor:
        """Decode latent frames that continue the video whose state `cache` holds (empty: a new video)."""
        step = self._compiled_block if self._compiled_block is not None else self._decode_block
        return step(latents, cache)

    def _decode_block(self, latents: Tensor, cache: FrameCache) -> Tensor:
        # latents: [b, z_dim, f, h, w] -> [b, 3, 4f (1 + 4 (f - 1) for a new video), 8h, 8w]
        # 1. De-normalise in float32: DiT space -> the VAE's latent space, z * std + mean.
        stats = dict(device=latents.device, dtype=torch.float32)
        std = torch.tensor(self.config.latents_std, **stats).view(1, -1, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, **stats).view(1, -1, 1, 1, 1)
        z = (latents.float() * std + mean).to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last_3d)

        # 2. Post-quant 1x1x1 conv.
        z = self.conv2(z)

        # 3. Decoder, all f latent frames through each layer at once: each temporal conv reads and writes
        #    its last two input frames in the cache, so where the block boundaries fall does not change the
        #    result.
        video = self.decoder(z, cache)

        # 4. Clamped to the video range, float32: [b, 3, T, 8h, 8w].
        return video.float().clamp_(-1.0, 1.0)


class DecoderStream:
    """One video decoded block by block. Holds the decoder's frame cache between calls: two input frames
    per temporal conv, a fixed size whatever the video's length."""

    def __init__(self, decoder: WanVAEDecoder):
        self.decoder = decoder
        self.cache: FrameCache = {}
        self.latent_frames = 0  # latent frames decoded so far
        self._size: tuple[int, int, int] | None = None  # (b, h, w) fixed by the first block

    def decode(self, block: Tensor) -> Tensor:
        """Next latent frames [b, z_dim, f, h, w] (DiT space) -> float32 video frames [b, 3, T, 8h, 8w] in
        [-1, 1]: T = 1 + 4 (f - 1) for the video's first block, 4 f after."""
        _check_latents(block, self.decoder.config, "block")
        size = (block.shape[0], block.shape[3], block.shape[4])
        if self._size is not None and size != self._size:
            raise ValueError(
                f"block has batch and latent size (b, h, w) = {size}, but this stream started with "
                f"{self._size}; start a new stream for another video"
            )
        out = self.decoder._decode_frames(block, self.cache)
        self._size = size
        self.latent_frames += block.shape[2]
        return out

    def reset(self) -> None:
        """Forget the video: the next block starts a new one."""
        self.cache.clear()
        self.latent_frames = 0
        self._size = None

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())


def _check_latents(latents: Tensor, config: VAEConfig, name: str) -> None:
    if latents.ndim != 5 or latents.shape[1] != config.z_dim or latents.shape[2] < 1:
        raise ValueError(
            f"{name} must be [b, {config.z_dim}, frames >= 1, h, w] latents, got {tuple(latents.shape)}"
        )


def init_random_weights(model: WanVAEDecoder, seed: int = 0) -> WanVAEDecoder:
    """Random weights under which every layer visibly matters: conv weights ~ U(+-1/sqrt(fan_in)),
    biases ~ N(0, 0.1), norm gammas ~ 1 + N(0, 0.1). For tests and tiny built-in models."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                values = 1.0 + torch.randn(p.shape, generator=gen) * 0.1
            elif name.endswith("bias"):
                values = torch.randn(p.shape, generator=gen) * 0.1
            else:
                bound = 1.0 / math.sqrt(p[0].numel())
                values = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            p.copy_(values.to(p.dtype))
    return model


# -- key mapping: original Wan <-> diffusers AutoencoderKLWan -----------------------------------------

# Inside a residual block (Wan's `residual` is an nn.Sequential): (original, diffusers).
_RESIDUAL_KEYS = [
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
]
# (original prefix, diffusers prefix, is a residual block) for modules outside the upsampling stages.
_FIXED_PREFIXES = [
    ("conv2.", "post_quant_conv.", False),
    ("decoder.conv1.", "decoder.conv_in.", False),
    ("decoder.middle.0.", "decoder.mid_block.resnets.0.", True),
    ("decoder.middle.1.", "decoder.mid_block.attentions.0.", False),
    ("decoder.middle.2.", "decoder.mid_block.resnets.1.", True),
    ("decoder.head.0.", "decoder.norm_out.", False),
    ("decoder.head.2.", "decoder.conv_out.", False),
]


def _prefixes(config: VAEConfig) -> list[tuple[str, str, bool]]:
    """All decoder module prefixes. Wan's `upsamples` is one flat list; diffusers groups it into
    `up_blocks.<stage>` of `resnets.<j>` and one `upsamplers.0`."""
    if config.attn_scales:
        raise ValueError("attn_scales: diffusers' Wan decoder has no attention in its upsampling stages")
    table = list(_FIXED_PREFIXES)
    index = 0
    for stage in range(len(config.dim_mult)):
        for j in range(config.num_res_blocks + 1):
            table.append((f"decoder.upsamples.{index}.", f"decoder.up_blocks.{stage}.resnets.{j}.", True))
            index += 1
        if stage < len(config.dim_mult) - 1:
            table.append((f"decoder.upsamples.{index}.", f"decoder.up_blocks.{stage}.upsamplers.0.", False))
            index += 1
    return table


def _rename(key: str, config: VAEConfig, to_diffusers: bool) -> str:
    for original, diffusers, residual in _prefixes(config):
        src, dst = (original, diffusers) if to_diffusers else (diffusers, original)
        if not key.startswith(src):
            continue
        rest = key[len(src) :]
        if not residual:
            return dst + rest
        for inner_original, inner_diffusers in _RESIDUAL_KEYS:
            inner_src, inner_dst = (
                (inner_original, inner_diffusers) if to_diffusers else (inner_diffusers, inner_original)
            )
            if rest.startswith(inner_src):
                return dst + inner_dst + rest[len(inner_src) :]
        raise KeyError(f"unknown residual block parameter {key!r}")
    raise KeyError(f"unknown VAE decoder parameter {key!r}")


def vae_original_to_diffusers(state_dict: dict[str, Tensor], config: VAEConfig) -> dict[str, Tensor]:
    """Our (original Wan) decoder keys -> diffusers `AutoencoderKLWan` keys (`post_quant_conv.*`,
    `decoder.*`)."""
    return {_rename(k, config, to_diffusers=True): v for k, v in state_dict.items()}


def vae_diffusers_to_original(state_dict: dict[str, Tensor], config: VAEConfig) -> dict[str, Tensor]:
    """Diffusers `AutoencoderKLWan` decoder keys -> original Wan keys. Encoder keys are not accepted."""
    return {_rename(k, config, to_diffusers=False): v for k, v in state_dict.items()}


# -- loading --------------------------------------------------------------------------------------------


def config_from_diffusers(raw: dict[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers `AutoencoderKLWan` config.json."""
    if raw.get("is_residual") or raw.get("patch_size") or raw.get("out_channels", 3) != 3:
        raise ValueError(
            "only the Wan2.1 VAE is supported (this config.json is another Wan VAE, e.g. Wan2.2)"
        )
    defaults = VAEConfig()
    return VAEConfig(
        base_dim=raw.get("decoder_base_dim") or raw.get("base_dim", defaults.base_dim),
        z_dim=raw.get("z_dim", defaults.z_dim),
        dim_mult=raw.get("dim_mult", defaults.dim_mult),
        num_res_blocks=raw.get("num_res_blocks", defaults.num_res_blocks),
        attn_scales=(),  # diffusers' decoder ignores attn_scales (its encoder does not)
        temporal_upsample=tuple(reversed(raw.get("temperal_downsample", (False, True, True)))),
        latents_mean=raw.get("latents_mean", defaults.latents_mean),
        latents_std=raw.get("latents_std", defaults.latents_std),
    )


def config_from_original(state_dict: dict[str, Tensor]) -> VAEConfig:
    """VAEConfig from the shapes of original-layout decoder weights (the latent statistics are Wan2.1's).

    Only the stage widths base_dim * dim_mult are fixed by the weights: base_dim is taken as the last
    stage's width (dim_mult[0] = 1, as in Wan).
    """
    if "conv2.weight" not in state_dict:
        raise ValueError("no VAE decoder weights: `conv2.weight` is missing")
    widths: list[int] = []  # per stage: width of its residual blocks
    blocks: list[int] = [0]  # per stage: number of residual blocks
    temporal: list[bool] = []
    attention_stages: set[int] = set()
    indices = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.upsamples.")})
    for index in indices:
        prefix = f"decoder.upsamples.{index}."
        if prefix + "resample.1.weight" in state_dict:
            temporal.append(prefix + "time_conv.weight" in state_dict)
            blocks.append(0)
        elif prefix + "to_qkv.weight" in state_dict:
            attention_stages.add(len(blocks) - 1)
        else:
            if blocks[-1] == 0:
                widths.append(state_dict[prefix + "residual.6.weight"].shape[0])
            blocks[-1] += 1
    if len(set(blocks)) != 1 or not widths or len(widths) != len(blocks):
        raise ValueError(f"unexpected VAE decoder layout: residual blocks per stage {blocks}")
    base = widths[-1]
    if any(w % base for w in widths):
        raise ValueError(f"stage widths {widths} are not multiples of the last one ({base})")
    first_scale = 1.0 / 2 ** (len(widths) - 2)
    return VAEConfig(
        base_dim=base,
        z_dim=state_dict["conv2.weight"].shape[0],
        dim_mult=tuple(w // base for w in reversed(widths)),
        num_res_blocks=blocks[0] - 1,
        attn_scales=tuple(first_scale * 2**stage for stage in sorted(attention_stages)),
        temporal_upsample=tuple(temporal),
    )


def _unwrap(raw: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors of a checkpoint that may be wrapped ({"state_dict": ...}) or prefixed ("module.")."""
    for name in ("state_dict", "model", "vae"):
        if isinstance(raw.get(name), dict):
            raw = raw[name]
    for prefix in ("module.", "model.", "vae."):
        if raw and all(k.startswith(prefix) for k in raw):
            raw = {k[len(prefix) :]: v for k, v in raw.items()}
    return {k: v for k, v in raw.items() if isinstance(v, Tensor)}


def _read_original(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: dict[str, Any] = load_file(str(path))
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    sd = _unwrap(raw)
    if any(k.startswith("post_quant_conv.") for k in sd):
        raise ValueError(f"{path} holds diffusers keys: pass its diffusers vae/ directory (with config.json)")
    # The encoder half (`encoder.*`, `conv1.*`) is not needed for decoding.
    return {k: v for k, v in sd.items() if k.startswith(("conv2.", "decoder."))}


def load_vae_decoder(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: VAEConfig | None = None,
) -> WanVAEDecoder:
    """Load the decoder from `Wan2.1_VAE.pth` (original keys, possibly wrapped) or a diffusers `vae/`
    directory (`config.json` + `diffusion_pytorch_model.safetensors`).

    The config comes from config.json or the weights' shapes unless `config` is given. Built on the meta
    device and loaded by assignment, so the file's tensors are not copied twice.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"VAE weights not found: {path} (expected Wan2.1_VAE.pth or a diffusers vae/ dir)"
        )
    if path.is_dir():
        config_path, weights_path = path / "config.json", path / "diffusion_pytorch_model.safetensors"
        for needed in (config_path, weights_path):
            if not needed.exists():
                raise FileNotFoundError(f"diffusers VAE directory {path} has no {needed.name} ({needed})")
        from safetensors.torch import load_file

        config = config or config_from_diffusers(json.loads(config_path.read_text()))
        raw = load_file(str(weights_path))
        decoder_keys = {k: v for k, v in raw.items() if k.startswith(("post_quant_conv.", "decoder."))}
        state_dict = vae_diffusers_to_original(decoder_keys, config)
    else:
        state_dict = _read_original(path)
        config = config or config_from_original(state_dict)

    with torch.device("meta"):
        model = WanVAEDecoder(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"VAE weights in {path} do not fit the decoder ({config}): "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device=device, dtype=dtype).eval()
