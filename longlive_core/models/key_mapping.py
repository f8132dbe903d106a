"""Rename Wan DiT checkpoint keys between the original layout (ours) and diffusers' layout."""

from __future__ import annotations

import re

from torch import Tensor

# (original, diffusers) name fragments; block-level entries apply under `blocks.<i>.`.
_TOP_LEVEL = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("patch_embedding.", "patch_embedding."),
]
_IN_BLOCK = [
    ("self_attn.q.", "attn1.to_q."),
    ("self_attn.k.", "attn1.to_k."),
    ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."),
    ("self_attn.norm_q.", "attn1.norm_q."),
    ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."),
    ("cross_attn.k.", "attn2.to_k."),
    ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."),
    ("cross_attn.norm_q.", "attn2.norm_q."),
    ("cross_attn.norm_k.", "attn2.norm_k."),
    # Wan's cross-attention norm is norm3; diffusers calls it norm2 (and its FFN norm norm3).
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
]
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.*)$")


def _rename(key: str, pairs_top: list[tuple[str, str]], pairs_block: list[tuple[str, str]]) -> str:
    match = _BLOCK_KEY.match(key)
    if match:
        index, rest = match.groups()
        for src, dst in pairs_block:
            if rest.startswith(src):
                return f"blocks.{index}.{dst}{rest[len(src) :]}"
        raise KeyError(f"unknown block parameter {key!r}")
    for src, dst in pairs_top:
        if key.startswith(src):
            return dst + key[len(src) :]
    raise KeyError(f"unknown parameter {key!r}")


def original_to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original Wan DiT keys -> diffusers `WanTransformer3DModel` keys."""
    return {_rename(k, _TOP_LEVEL, _IN_BLOCK): v for k, v in state_dict.items()}


def diffusers_to_original(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers `WanTransformer3DModel` keys -> original Wan DiT keys (the layout our model uses)."""
    flip = [(d, o) for o, d in _TOP_LEVEL]
    flip_block = [(d, o) for o, d in _IN_BLOCK]
    # Diffusers' `norm2.` (cross-attn norm) must not be caught by a shorter prefix first.
    return {_rename(k, flip, flip_block): v for k, v in state_dict.items()}
