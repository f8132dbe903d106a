"""Merge a LongLive LoRA (peft state dict under `generator_lora`) into the DiT's linear weights.

LongLive wraps every nn.Linear inside the 30 causal blocks with peft (rank 256, alpha 256) and saves
`get_peft_model_state_dict`, keys like `base_model.model.blocks.0.self_attn.q.lora_A.weight`.
Merging W += (alpha / rank) * B @ A once at load time makes inference cost exactly the base model's.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

_LORA_KEY = re.compile(r"(?:^|\.)(blocks\.\d+\..+?)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def parse_lora_state_dict(state_dict: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """peft keys -> {linear module path (e.g. 'blocks.0.self_attn.q'): (A [r, in], B [out, r])}."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        match = _LORA_KEY.search(key)
        if match is None:
            raise ValueError(f"not a LoRA weight of a transformer block: {key!r}")
        module, which = match.groups()
        pairs.setdefault(module, {})[which] = value
    incomplete = sorted(m for m, ab in pairs.items() if set(ab) != {"A", "B"})
    if incomplete:
        raise ValueError(f"LoRA has lora_A without lora_B (or the reverse) for: {incomplete[:5]}")
    return {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}


@torch.no_grad()
def merge_lora(model: nn.Module, state_dict: dict[str, Tensor], alpha: float, rank: int | None = None) -> int:
    """Add (alpha / rank) * B @ A to each targeted Linear's weight, in float32; returns layers merged.

    rank defaults to the rank found in the weights. Raises ValueError for a module the model lacks or
    a shape that does not fit.
    """
    modules = dict(model.named_modules())
    pairs = parse_lora_state_dict(state_dict)
    for name, (a, b) in pairs.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LoRA targets {name!r}, which is not a Linear layer of this model")
        r = rank if rank is not None else a.shape[0]
        delta = (alpha / r) * (b.float() @ a.float())
        if delta.shape != linear.weight.shape:
            raise ValueError(
                f"LoRA for {name!r} has shape {tuple(delta.shape)}, the layer {tuple(linear.weight.shape)}"
            )
        linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
    return len(pairs)
