"""Preallocated KV cache for many sessions: one row per session slot, written in place."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import GenerationConfig, ModelConfig
from .models.transformer_causal_wan import ContextKV, RopeTables, SelfAttentionCache


class KVCache:
    """Self-attention K/V (sink + window) and prompt cross-attention K/V for `max_sessions` slots.

    Allocated once at full size; a session's memory is the same after 8 blocks or 8,000.
    Layer i self-attention: [max_sessions, window_frames * tokens_per_frame, heads, head_dim].
    Layer i cross-attention: [max_sessions, text_len, heads, head_dim].
    """

    def __init__(
        self,
        model_config: ModelConfig,
        config: GenerationConfig,
        max_sessions: int,
        tokens_per_frame: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        heads, head_dim = model_config.num_heads, model_config.head_dim
        self.tokens_per_frame = tokens_per_frame
        self.window_frames = config.window_frames
        shape = (max_sessions, config.window_frames * tokens_per_frame, heads, head_dim)
        ctx_shape = (max_sessions, model_config.text_len, heads, head_dim)
        layers = range(model_config.num_layers)
        kw = dict(device=device, dtype=dtype)
        self.keys = [torch.zeros(shape, **kw) for _ in layers]
        self.values = [torch.zeros(shape, **kw) for _ in layers]
        self.context_keys = [torch.zeros(ctx_shape, **kw) for _ in layers]
        self.context_values = [torch.zeros(ctx_shape, **kw) for _ in layers]

    def tensors(self) -> list[Tensor]:
        return [*self.keys, *self.values, *self.context_keys, *self.context_values]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def self_attention(
        self,
        rows: slice,
        write_index: Tensor,
        key_len: int,
        key_mask: Tensor | None,
        key_rope: RopeTables | None,
    ) -> SelfAttentionCache:
        """A pass's view of the cache rows `rows` (a slice: views, never copies)."""
        return SelfAttentionCache(
            keys=[k[rows] for k in self.keys],
            values=[v[rows] for v in self.values],
            write_index=write_index,
            key_len=key_len,
            key_mask=key_mask,
            key_rope=key_rope,
        )

    def context(self, rows: slice) -> ContextKV:
        return ContextKV(
            keys=[k[rows] for k in self.context_keys], values=[v[rows] for v in self.context_values]
        )

    def set_context(self, row: int, context: ContextKV) -> None:
        """Store a prompt's cross-attention K/V ([1, text_len, H, D] per layer) in slot `row`."""
        for dst, src in zip(self.context_keys, context.keys, strict=True):
            dst[row].copy_(src[0])
        for dst, src in zip(self.context_values, context.values, strict=True):
            dst[row].copy_(src[0])

    def move_row(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (compaction after a session leaves; rare)."""
        for t in self.tensors():
            t[dst].copy_(t[src])
