"""LoRA in LongLive's format: merge one into the DiT for inference, train one, save it as `lora.pt`.

LongLive wraps every nn.Linear inside the 30 causal blocks with peft (rank 256, alpha 256) and saves
`get_peft_model_state_dict`, keys like `base_model.model.blocks.0.self_attn.q.lora_A.weight`.
Merging W += (alpha / rank) * B @ A once at load time makes inference cost exactly the base model's.
Training wraps the same Linears in `LoRALinear` (peft's init: A kaiming-uniform, B zero, so training
starts exactly at the base model) and saves the same keys.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

PEFT_PREFIX = "base_model.model."

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


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: y = base(x) + (alpha / rank) * B(A(x)).

    The update runs in the LoRA weights' dtype (float32 master weights beside a bf16 base)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = dict(bias=False, device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)
        a = torch.empty(self.lora_A.weight.shape)  # drawn on the CPU: the same on every device and worker
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        update = self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scale
        return self.base(x) + update.to(x.dtype)


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Freeze `model` and wrap every Linear inside its transformer blocks in a LoRALinear (LongLive's
    targets), A drawn from `seed` (data-parallel workers must start alike); returns the wrapped paths."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    model.requires_grad_(False)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and ".lora_" not in name
    ]
    generator = torch.Generator().manual_seed(seed)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, generator))
    return targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The wrapped layers' A/B weights under peft's keys (what LongLive's `lora.pt` holds)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().clone()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().clone()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Set the wrapped layers' A/B weights (resume); ValueError when the layers or ranks differ."""
    layers = lora_layers(model)
    pairs = parse_lora_state_dict(state_dict)
    if set(pairs) != set(layers):
        raise ValueError(f"LoRA layers differ: {sorted(set(pairs) ^ set(layers))[:5]}")
    for name, (a, b) in pairs.items():
        if a.shape != layers[name].lora_A.weight.shape or b.shape != layers[name].lora_B.weight.shape:
            raise ValueError(f"LoRA for {name!r} has rank {a.shape[0]}, the layer {layers[name].rank}")
        layers[name].lora_A.weight.copy_(a)
        layers[name].lora_B.weight.copy_(b)
