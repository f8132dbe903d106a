"""Shared builders for the tests: tiny models with weights under which everything matters."""

from __future__ import annotations

import torch

from longlive_core.config import ModelConfig
from longlive_core.models.transformer_causal_wan import CausalWanTransformer, init_random_weights


def tiny_model(seed: int = 0) -> CausalWanTransformer:
    torch.manual_seed(seed)
    return init_random_weights(CausalWanTransformer(ModelConfig.from_name("tiny")), seed=seed).eval()


def prompt(seed: int, tokens: int = 64, dim: int = 32) -> torch.Tensor:
    return torch.randn(tokens, dim, generator=torch.Generator().manual_seed(1000 + seed))


def padded_prompt(seed: int, text_len: int = 128, tokens: int = 64, dim: int = 32) -> torch.Tensor:
    """The prompt zero-padded to text_len, batch of one: [1, text_len, dim]."""
    out = torch.zeros(1, text_len, dim)
    out[0, :tokens] = prompt(seed, tokens, dim)
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# A tiny training run (longlive_core.training): CPU-fast (~0.05 s a step), every step a generator step.
TINY_TRAINING = dict(
    student="tiny-random",
    teacher="tiny-random",
    size=[48, 32],
    step_blocks=2,
    lora_rank=4,
    lora_alpha=4.0,
    generator_every=1,
    lr=1e-3,
    critic_lr=1e-3,
    gradient_checkpointing=False,
)
