"""Quantized linear layers, through torchao, with an explicit float32 emulation for tests.

Modes (`RuntimeConfig.linear`, `TextEncoder.quantize`):
- fp8: e4m3 weights, one scale per output channel, and activations quantized at run time, one scale per
  token (torchao `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`). Needs FP8 tensor
  cores (CUDA compute capability >= 8.9) and bf16 weights.
- int8: dynamic W8A8, int8 weights per channel and int8 activations per token
  (`Int8DynamicActivationInt8WeightConfig`).
- int8_weight_only: int8 weights per channel, bf16 activations (`Int8WeightOnlyConfig`): half the weight
  memory (the umT5-XXL text encoder: 11.4 GB in bf16).

`linear_emulation` replaces the torchao layers by `EmulatedQuantizedLinear`: the same quantization, the
product in float32, on any device. It runs only when asked for; nothing falls back to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import LINEAR_MODES, LinearMode

_FP8 = torch.float8_e4m3fn
_QMAX = {"fp8": 448.0, "int8": 127.5}  # scale = amax / this (int8: (127 - -128) / 2, as torchao)
_FP8_CAPABILITY = (8, 9)  # Ada / Hopper and later: the first with FP8 tensor cores


def has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= _FP8_CAPABILITY


def check_linear_mode(mode: str, device: torch.device, dtype: torch.dtype, emulation: bool) -> None:
    """Refuse at start-up a mode the device cannot run, naming what would work (never a silent fallback)."""
    if mode not in LINEAR_MODES:
        raise ValueError(f"linear must be one of {', '.join(LINEAR_MODES)}; got {mode!r}")
    if mode != "fp8" or emulation:
        return
    if not has_fp8_tensor_cores(device):
        where = (
            f"{torch.cuda.get_device_name(device)} (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})"
            if device.type == "cuda"
            else f"the {device.type} device"
        )
        raise ValueError(
            f"linear: fp8 needs FP8 tensor cores (CUDA compute capability >= 8.9: Ada, Hopper or later), "
            f"which {where} lacks. Use linear: int8 (dynamic W8A8) or int8_weight_only, or bf16; "
            "linear_emulation: true runs the fp8 math emulated in float32 (tests, not speed)"
        )
    if dtype != torch.bfloat16:
        raise ValueError(f"linear: fp8 quantizes bf16 weights (rowwise scales); the model is {dtype}")


def _torchao_config(mode: str):
    # Imported here: torchao loads its CUDA extensions on import, which only quantized runs need.
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    # set_inductor_config=False: torchao would otherwise turn on coordinate-descent tuning for every graph
    # the process compiles, which multiplies the warm-up's compile time.
    if mode == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    if mode == "int8":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return Int8WeightOnlyConfig(set_inductor_config=False)


def _quantize_rows(x: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Rows of x [m, k] -> (quantized [m, k], float32 scale [m, 1]) with x ~ q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / _QMAX[mode]
    scaled = x.float() / scale
    if mode == "fp8":
        return scaled.to(_FP8), scale
    return scaled.round().clamp(-128, 127).to(torch.int8), scale


class EmulatedQuantizedLinear(nn.Module):
    """Drop-in for an nn.Linear: y = (q(x) @ q(W)^T) * s_x * s_w + b, in float32 (x unquantized for
    int8_weight_only). The values torchao's kernels multiply, without their accumulation order."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        if mode not in ("fp8", "int8", "int8_weight_only"):
            raise ValueError(f"mode must be 'fp8', 'int8' or 'int8_weight_only', got {mode!r}")
        self.mode = mode
        self.weight_mode = "fp8" if mode == "fp8" else "int8"
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _quantize_rows(linear.weight.detach(), self.weight_mode)
        self.register_buffer("weight", weight)  # [out, in]
        self.register_buffer("weight_scale", scale.view(1, -1))  # [1, out]
        self.bias = linear.bias
        self.out_dtype = linear.weight.dtype

    def forward(self, x: Tensor) -> Tensor:
        # x: [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features)
        if self.mode != "int8_weight_only":
            xq, x_scale = _quantize_rows(rows, self.weight_mode)
            rows = xq.float() * x_scale
        y = (rows.float() @ (self.weight.float() * self.weight_scale.t()).t()).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize_linears(module: nn.Module, mode: LinearMode, emulation: bool = False) -> int:
    """Quantize every nn.Linear inside `module` in place; returns how many. Raises when torchao leaves one
    unquantized (it skips shapes its kernels cannot take) instead of running it in bf16 unseen."""
    if mode == "bf16":
        return 0
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if emulation:
        for name, linear in linears:
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, EmulatedQuantizedLinear(linear, mode))
        return len(linears)
    from torchao.quantization import quantize_

    plain = {name: type(m.weight) for name, m in linears}
    quantize_(module, _torchao_config(mode))
    left = [name for name, m in linears if type(m.weight) is plain[name]]
    if left:
        raise ValueError(f"torchao left {len(left)} linears unquantized in {mode} (e.g. {left[0]!r})")
    return len(linears)


def quantize_blocks(model: nn.Module, mode: LinearMode, emulation: bool = False) -> int:
    """Quantize every nn.Linear inside `model.blocks`; returns how many.

    The embeddings, time projection and head stay in bf16 (they are small and precision-sensitive).
    """
    check_linear_mode(mode, model.device, model.dtype, emulation)
    return quantize_linears(model.blocks, mode, emulation)
