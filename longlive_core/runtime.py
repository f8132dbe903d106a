"""Runtime choices applied around the model: the attention kernel and compiled blocks."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import RuntimeConfig
from .models.transformer_causal_wan import CausalWanTransformer
from .quantization import check_linear_mode, quantize_blocks

_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# On an H100, cuDNN reaches ~550 TFLOP/s on 4,680 x 18,720 attention, FlashAttention-2 ~310.
_AUTO_ORDER = ["cudnn", "flash", "efficient", "math"]


@contextlib.contextmanager
def attention_backend(runtime: RuntimeConfig) -> Iterator[None]:
    """SDPA tries the configured kernel first ('auto': the fastest), then the others in speed order,
    so a pass the preferred kernel cannot run (a mask for flash, float32 for cuDNN, the CPU) still runs."""
    first = [] if runtime.attention == "auto" else [runtime.attention]
    names = first + [n for n in _AUTO_ORDER if n not in first]
    with sdpa_kernel([_BACKENDS[n] for n in names], set_priority=True):
        yield


def compile_blocks(model: CausalWanTransformer) -> CausalWanTransformer:
    """Compile each transformer block in place (all blocks share one compiled graph per shape).

    Shapes are static: one graph per batch size x key length (window filling, full, recache), a
    few dozen at most, so the recompile limit is raised above that.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
    for block in model.blocks:
        block.compile(fullgraph=True, dynamic=False)
    return model


def prepare(model: CausalWanTransformer, runtime: RuntimeConfig) -> CausalWanTransformer:
    """The model an engine runs, never changing `model`: `model` itself when the runtime applies nothing,
    else a copy of its module tree that shares every parameter and buffer, with the copy's block linears
    quantized and its blocks compiled. Compiled graphs are cached by code, not by module, so a second
    engine's copy reuses the first's. A quantized copy holds its own fp8/int8 weights beside the caller's.
    Raises ValueError for a linear mode the model's device cannot run (`check_linear_mode`)."""
    check_linear_mode(runtime.linear, model.device, model.dtype, runtime.linear_emulation)
    if runtime.linear == "bf16" and not runtime.compile:
        return model
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    own = copy.deepcopy(model, memo=shared)
    quantize_blocks(own, runtime.linear, runtime.linear_emulation)
    if runtime.compile:
        compile_blocks(own)
    return own
