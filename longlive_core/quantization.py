"""FP8 (Hopper) and INT8 linear layers for the transformer blocks: weights quantized once per output
channel, activations per token at run time. On CUDA the product runs on the fp8 / int8 tensor cores
(`torch._scaled_mm`, `torch._int_mm`); elsewhere the same quantized values are multiplied in float32,
so CPU tests check the function the GPU computes (up to accumulation order).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

LinearMode = Literal["bf16", "fp8", "int8"]
_FP8 = torch.float8_e4m3fn
_QMAX = {"fp8": 448.0, "int8": 127.0}  # largest representable magnitude


def _quantize(x: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Rows of x [m, k] -> (quantized [m, k], float32 scale [m, 1]) with x ~ q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / _QMAX[mode]
    scaled = x.float() / scale
    if mode == "fp8":
        return scaled.to(_FP8), scale
    return scaled.round().clamp(-127, 127).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """Drop-in for an nn.Linear: y = (q(x) @ q(W)^T) * s_x * s_w + b."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        if mode not in _QMAX:
            raise ValueError(f"mode must be 'fp8' or 'int8', got {mode!r}")
        self.mode = mode
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _quantize(linear.weight.detach(), mode)
        self.register_buffer("weight", weight)  # [out, in]
        self.register_buffer("weight_scale", scale.view(1, -1))  # [1, out]
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype

    def _matmul(self, xq: Tensor, x_scale: Tensor) -> Tensor:
        if xq.is_cuda and self.mode == "fp8":
            return torch._scaled_mm(
                xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=self.out_dtype
            )
        if xq.is_cuda and xq.shape[0] > 16:  # _int_mm needs more than 16 rows
            return (torch._int_mm(xq, self.weight.t()).float() * x_scale * self.weight_scale).to(
                self.out_dtype
            )
        dequant_w = self.weight.float() * self.weight_scale.t()
        return ((xq.float() * x_scale) @ dequant_w.t()).to(self.out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        xq, x_scale = _quantize(x.reshape(-1, self.in_features), self.mode)
        y = self._matmul(xq, x_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_blocks(model: nn.Module, mode: LinearMode) -> int:
    """Replace every nn.Linear inside `model.blocks` by a QuantizedLinear; returns how many.

    The embeddings, time projection and head stay in bf16 (they are small and precision-sensitive).
    """
    if mode == "bf16":
        return 0
    count = 0
    for parent in list(model.blocks.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, attr, QuantizedLinear(child, mode))
                count += 1
    return count
