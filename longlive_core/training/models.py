"""The three DiTs of DMD training: the student (causal, LoRA), the teacher (frozen) and the critic (LoRA)."""

from __future__ import annotations

import copy

import torch

from ..models.transformer_causal_wan import CausalWanTransformer
from ..random_models import RANDOM_MODELS, random_dit
from ..weights import load_transformer, resolve_model_files


def load_dit(source: str, seed: int, device: torch.device | str, dtype: torch.dtype) -> CausalWanTransformer:
    """A DiT from a built-in name (random weights drawn from `seed`), a model name, a local directory or a
    hub repo id (its LoRA, if any, merged)."""
    if source in RANDOM_MODELS:
        model = random_dit(source, device, seed)
    else:
        model = load_transformer(resolve_model_files(source), device, dtype)
    return model.to(device, dtype)


def critic_from(teacher: CausalWanTransformer) -> CausalWanTransformer:
    """DMD's fake score starts as the real one: a copy of the teacher."""
    return copy.deepcopy(teacher)
