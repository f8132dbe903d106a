"""Causal (frame-autoregressive) Wan2.1 text-to-video DiT, in the original Wan checkpoint key layout.

One self-contained file: RoPE, norms, attention, the transformer block and the model. Two ways to run it:

- uncached: all frames of `latents` attend to each other (the bidirectional Wan forward);
- cached: the pass's own K/V are written into a preallocated cache (`SelfAttentionCache`) and the
  queries attend to whatever that cache holds (frame sink + window + the pass's own frames), with an
  optional key mask. What a pass reads and writes is decided outside the model (`cache_plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..config import ModelConfig

RopeTables = tuple[Tensor, Tensor]  # cos, sin: [b, tokens, 1, head_dim // 2], float32


@dataclass
class ContextKV:
    """Cross-attention keys and values of a prompt, per layer: [b, text_len, heads, head_dim]."""

    keys: list[Tensor]
    values: list[Tensor]


@dataclass
class SelfAttentionCache:
    """Where a cached pass writes its self-attention K/V and what it reads back.

    `keys[i]` / `values[i]` are views of the engine's preallocated cache rows for layer i,
    shaped [b, cache_tokens, heads, head_dim]; they are written in place, never copied.
    """

    keys: list[Tensor]
    values: list[Tensor]
    write_index: Tensor  # [b * query_tokens] long: flat index into keys[i].view(-1, H, D) per query token
    key_len: int  # attend to the first key_len cached tokens (a view: the cache fills slots in order)
    key_mask: Tensor | None  # bool [b, 1, 1 or query_tokens, key_len]; None: all key_len tokens visible
    key_rope: RopeTables | None  # relative mode: tables for the cached keys (stored un-rotated); else None
    # False (training): the pass's K/V replace their slots in a copy, so autograd reaches them and no
    # tensor saved for backward is ever written over (the commit pass writes the cache later).
    in_place: bool = True

    def for_autograd(self, snapshot: bool) -> SelfAttentionCache:
        """This view for a pass that runs with autograd: out of place; with `snapshot`, over a copy of the
        cache (a checkpointed block recomputes in backward and must read what the forward read, not what
        later blocks wrote)."""
        if not snapshot:
            return replace(self, in_place=False)
        keys, values = [k.clone() for k in self.keys], [v.clone() for v in self.values]
        return replace(self, keys=keys, values=values, in_place=False)


def sinusoidal_embedding(dim: int, timesteps: Tensor) -> Tensor:
    """[n] timesteps -> [n, dim] float32 embedding, [cos, sin] halves, computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timesteps.device) / half)
    args = timesteps.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def rope_tables(
    config: ModelConfig, frame_positions: Tensor, grid: tuple[int, int], device: torch.device
) -> RopeTables:
    """Cos/sin tables for tokens laid out frame-major over an (h, w) patch grid.

    frame_positions: [b, frames] integer temporal positions (absolute latent frame index, or the
    position inside the window in relative mode). Returns tables shaped [b, frames*h*w, 1, head_dim/2].
    """
    t_dim, h_dim, w_dim = config.rope_dims
    h, w = grid

    def angles(positions: Tensor, axis_dim: int) -> Tensor:
        inv_freq = 1.0 / config.rope_theta ** (
            torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim
        )
        return positions.to(device=device, dtype=torch.float64)[..., None] * inv_freq

    b, frames = frame_positions.shape
    t_angles = angles(frame_positions, t_dim)  # [b, f, t_dim/2]
    h_angles = angles(torch.arange(h, device=device), h_dim)  # [h, h_dim/2]
    w_angles = angles(torch.arange(w, device=device), w_dim)  # [w, w_dim/2]
    full = torch.cat(
        [
            t_angles[:, :, None, None, :].expand(b, frames, h, w, -1),
            h_angles[None, None, :, None, :].expand(b, frames, h, w, -1),
            w_angles[None, None, None, :, :].expand(b, frames, h, w, -1),
        ],
        dim=-1,
    ).reshape(b, frames * h * w, 1, -1)
    return torch.cos(full).float(), torch.sin(full).float()


def apply_rope(x: Tensor, rope: RopeTables) -> Tensor:
    """Rotate adjacent channel pairs of x [b, tokens, heads, head_dim] by the tables (in float32)."""
    cos, sin = rope
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return rotated.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input and weight dtypes (as Wan does)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)

    def forward(
        self,
        x: Tensor,
        rope: RopeTables,
        cache_keys: Tensor | None = None,
        cache_values: Tensor | None = None,
        plan: SelfAttentionCache | None = None,
    ) -> Tensor:
        # x: [b, s, dim] -> [b, s, dim]
        b, s, _ = x.shape
        # 1. Projections, q/k RMSNorm over all heads, split heads: [b, s, H, D].
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        q = apply_rope(q, rope)
        mask = None
        if plan is None:
            k = apply_rope(k, rope)
        else:
            # 2. Cached pass: write this pass's K/V into its slots, then attend to the whole cache.
            #    Absolute mode stores keys rotated; relative mode stores them raw and rotates on read.
            if plan.key_rope is None:
                k = apply_rope(k, rope)
            if plan.in_place:
                cache_keys.view(-1, *k.shape[2:]).index_copy_(0, plan.write_index, k.flatten(0, 1))
                cache_values.view(-1, *v.shape[2:]).index_copy_(0, plan.write_index, v.flatten(0, 1))
                k, v = cache_keys[:, : plan.key_len], cache_values[:, : plan.key_len]
            else:
                k = _with_rows(cache_keys, plan.write_index, k)[:, : plan.key_len]
                v = _with_rows(cache_values, plan.write_index, v)[:, : plan.key_len]
            if plan.key_rope is not None:
                k = apply_rope(k, plan.key_rope)
            mask = plan.key_mask
        # 3. Attention: [b, H, s, D] layout for SDPA.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        )
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


def _with_rows(cache: Tensor, index: Tensor, rows: Tensor) -> Tensor:
    """A copy of cache [b, n, H, D] whose flat token rows `index` hold rows [b, s, H, D] (autograd-safe)."""
    flat = cache.reshape(-1, *cache.shape[2:]).index_copy(0, index, rows.flatten(0, 1).to(cache.dtype))
    return flat.view(cache.shape)


class CrossAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.num_heads = config.num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, config.eps)
        self.norm_k = RMSNorm(dim, config.eps)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        # context: [b, text_len, dim] -> k, v [b, text_len, H, D]
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        # x: [b, s, dim]; unmasked attention over the (zero-padded) prompt tokens.
        b, s, _ = x.shape
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class CausalWanBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.dim
        self.norm1 = LayerNorm(dim, config.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(config)
        self.norm3 = LayerNorm(dim, config.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(config)
        self.norm2 = LayerNorm(dim, config.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        rope: RopeTables,
        context_k: Tensor,
        context_v: Tensor,
        cache_keys: Tensor | None = None,
        cache_values: Tensor | None = None,
        plan: SelfAttentionCache | None = None,
    ) -> Tensor:
        # x: [b, f, tokens, dim] float32 residual stream; e0: [b, f, 6, dim] float32 per-frame modulation.
        b, f, tokens, dim = x.shape
        dtype = self.modulation.dtype  # the model's compute dtype (linears may hold fp8 / int8 weights)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unsqueeze(3).unbind(2)

        # 1. Self-attention on the modulated norm, gated residual.
        h = (self.norm1(x) * (1 + scale1) + shift1).to(dtype).reshape(b, f * tokens, dim)
        h = self.self_attn(h, rope, cache_keys, cache_values, plan)
        x = x + h.float().view(b, f, tokens, dim) * gate1

        # 2. Cross-attention to the prompt (affine norm3, no modulation).
        h = self.norm3(x).to(dtype).reshape(b, f * tokens, dim)
        x = x + self.cross_attn(h, context_k, context_v).float().view(b, f, tokens, dim)

        # 3. Feed-forward on the modulated norm, gated residual.
        h = (self.norm2(x) * (1 + scale2) + shift2).to(dtype)
        return x + self.ffn(h).float() * gate2


class Head(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = nn.Linear(config.dim, config.patch_channels)
        self.modulation = nn.Parameter(torch.zeros(1, 2, config.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # x: [b, f, l, dim]; e: [b, f, dim] -> [b, f, l, patch_channels]
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head((self.norm(x) * (1 + scale) + shift).to(self.head.weight.dtype))


class CausalWanTransformer(nn.Module):
    """Wan2.1 T2V DiT with per-frame timesteps and an optional sink + window KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([CausalWanBlock(config) for _ in range(config.num_layers)])
        self.head = Head(config)
        self.gradient_checkpointing = False  # training: recompute each block's activations in backward

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (height, width) -> patch grid (h, w); raises ValueError when not divisible."""
        _, ph, pw = self.config.patch_size
        if height % ph or width % pw:
            raise ValueError(f"latent size {height}x{width} must be divisible by the patch size {ph}x{pw}")
        return height // ph, width // pw

    def encode_context(self, text_embeds: Tensor) -> ContextKV:
        """Prompt embeddings [b, text_len, text_dim] (zero-padded) -> per-layer cross-attention K/V."""
        context = self.text_embedding(text_embeds.to(self.dtype))
        pairs = [block.cross_attn.context_kv(context) for block in self.blocks]
        return ContextKV(keys=[k for k, _ in pairs], values=[v for _, v in pairs])

    def forward(
        self,
        latents: Tensor,
        timestep: Tensor,
        context: ContextKV,
        rope: RopeTables | None = None,
        cache: SelfAttentionCache | None = None,
    ) -> Tensor:
        """Flow prediction v for `latents` [b, C, f, H, W] at per-frame `timestep` [b, f].

        rope: tables for the pass's tokens (default: positions 0..f-1). cache: when given, the pass
        writes its K/V there and attends to the cache; otherwise the frames attend to each other.
        """
        b, _, frames, height, width = latents.shape
        pt, ph, pw = self.config.patch_size
        if timestep.shape != (b, frames // pt):
            raise ValueError(f"timestep must have shape {(b, frames // pt)}, got {tuple(timestep.shape)}")
        grid = self.patch_grid(height, width)

        # 1. Patchify: [b, C, f, H, W] -> [b, f, h*w, dim] float32 residual stream.
        x = self.patch_embedding(latents.to(self.dtype))
        f, h, w = x.shape[2:]
        x = x.flatten(3).permute(0, 2, 3, 1).float()

        # 2. Per-frame time embedding e [b, f, dim] and block modulation e0 [b, f, 6, dim], float32.
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, timestep.flatten()).to(self.dtype))
        e0 = self.time_projection(e).float().view(b, f, 6, -1)
        e = e.float().view(b, f, -1)
        if rope is None:
            positions = torch.arange(f, device=latents.device).expand(b, f)
            rope = rope_tables(self.config, positions, grid, latents.device)

        # 3. Transformer blocks.
        for i, block in enumerate(self.blocks):
            cache_k = cache.keys[i] if cache is not None else None
            cache_v = cache.values[i] if cache is not None else None
            args = (x, e0, rope, context.keys[i], context.values[i], cache_k, cache_v, cache)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)

        # 4. Head and unpatchify: [b, f, h*w, pt*ph*pw*C] -> [b, C, f*pt, H, W].
        out = self.head(x, e).float()
        out = out.view(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, f * pt, h * ph, w * pw)


def init_random_weights(model: CausalWanTransformer, seed: int = 0) -> CausalWanTransformer:
    """Random weights under which RoPE, the prompt and the timestep all visibly matter.

    Matrices ~ U(+-1/sqrt(fan_in)) (unit-scale activations), biases and modulations non-zero,
    norm weights around 1. Used by the built-in `tiny-random` model and by the tests.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "modulation" not in name:
                bound = 1.0 / math.sqrt(p[0].numel())
                values = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            elif "modulation" in name:
                values = torch.randn(p.shape, generator=gen) * 0.2
            elif name.endswith("weight"):  # norm scales
                values = 1.0 + torch.randn(p.shape, generator=gen) * 0.1
            else:  # biases
                values = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(values.to(p.dtype))
    return model
