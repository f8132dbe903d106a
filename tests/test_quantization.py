"""Quantized linears (longlive_core.quantization): torchao where it runs on the CPU, the explicit float32
emulation everywhere, each within a stated tolerance of the float model; a wrong scale fails it; an fp8
the device cannot run is refused at start-up.

Random weights lack the outlier activations of trained ones: these bounds say the quantization is wired
right, not how a real checkpoint degrades (bench/bench_kernels.py measures that beside the speed).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from longlive_core.config import GenerationConfig, RuntimeConfig
from longlive_core.engine import Engine
from longlive_core.quantization import EmulatedQuantizedLinear, check_linear_mode, quantize_linears
from longlive_core.text_encoder import TextEncoder
from tests.helpers import prompt, rel_err, tiny_model

SIZE = (4, 6)
# One linear layer against its float product: e4m3 keeps 3 mantissa bits (a relative step of 2^-4 per
# element, averaged down over a dot product); int8 steps are amax / 127.5.
LAYER_TOLERANCE = {"fp8": 4e-2, "int8": 1.5e-2, "int8_weight_only": 1e-2}
# Three blocks of the tiny model (2 blocks of 10 linears, 5 passes a block) against the float32 engine
# (measured: fp8 6.9e-3, int8 1.4e-3, int8_weight_only 0.9e-3).
MODEL_TOLERANCE = {"fp8": 2.5e-2, "int8": 1e-2, "int8_weight_only": 1e-2}
# The tiny umT5 encoder's output (measured: int8 2.2e-2, int8_weight_only 1.6e-2; d_model 32 averages
# little rounding away).
TEXT_TOLERANCE = {"int8": 5e-2, "int8_weight_only": 4e-2}
QUANTIZED = list(LAYER_TOLERANCE)
ON_CPU = ["int8", "int8_weight_only"]  # torchao's FP8 needs CUDA capability >= 8.9
FP8_SKIP = "torchao's fp8 (Float8DynamicActivationFloat8WeightConfig) needs FP8 tensor cores (CUDA >= 8.9)"


def _layer_and_input() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    linear = init_linear(nn.Linear(64, 48))
    x = torch.randn(5, 7, 64) * torch.linspace(0.1, 10, 7)[:, None]  # rows of very different scales
    return linear, x


def init_linear(linear: nn.Linear) -> nn.Linear:
    """U(+-1/sqrt(fan_in)) weights and non-zero biases, as the repo's random models."""
    bound = linear.in_features**-0.5
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound)
        linear.bias.normal_(0, 0.1)
    return linear


def _blocks(runtime: RuntimeConfig, blocks: int = 3, tamper=None) -> list[torch.Tensor]:
    engine = Engine(tiny_model(seed=0), GenerationConfig(), SIZE, runtime=runtime)
    if tamper is not None:
        tamper(engine.model)
    engine.add_session("s", prompt(0), seed=1)
    return [engine.step()["s"] for _ in range(blocks)]


def _model_error(runtime: RuntimeConfig, tamper=None) -> float:
    reference = _blocks(RuntimeConfig())
    return max(rel_err(a, b) for a, b in zip(_blocks(runtime, tamper=tamper), reference, strict=True))


# -- one layer ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", QUANTIZED)
def test_emulated_linear_is_within_tolerance_of_the_float_product(mode):
    linear, x = _layer_and_input()
    layer = EmulatedQuantizedLinear(linear, mode)
    assert layer.weight.dtype == (torch.float8_e4m3fn if mode == "fp8" else torch.int8)
    err = rel_err(layer(x), linear(x).detach())
    assert 1e-4 < err < LAYER_TOLERANCE[mode]  # the quantization is real, and close

    # Negative control: weight scales 10% off fail the same bound.
    with torch.no_grad():
        layer.weight_scale.mul_(1.1)
    assert rel_err(layer(x), linear(x).detach()) > LAYER_TOLERANCE[mode]


@pytest.mark.parametrize("mode", ON_CPU)
def test_torchao_linear_is_within_tolerance_of_the_float_product(mode):
    linear, x = _layer_and_input()
    quantized = nn.Sequential(init_linear(nn.Linear(64, 48)))
    quantized[0].load_state_dict(linear.state_dict())
    assert quantize_linears(quantized, mode) == 1
    weight = quantized[0].weight
    assert weight.qdata.dtype == torch.int8  # torchao's Int8Tensor, not a float weight
    err = rel_err(quantized(x), linear(x).detach())
    assert 1e-4 < err < LAYER_TOLERANCE[mode]

    with torch.no_grad():
        weight.scale.mul_(1.1)  # negative control
    assert rel_err(quantized(x), linear(x).detach()) > LAYER_TOLERANCE[mode]


def test_torchao_fp8_linear_on_an_fp8_device():
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        pytest.skip(FP8_SKIP)
    linear, x = _layer_and_input()
    linear, x = linear.to("cuda", torch.bfloat16), x.to("cuda", torch.bfloat16)
    quantized = nn.Sequential(nn.Linear(64, 48)).to("cuda", torch.bfloat16)
    quantized[0].load_state_dict(linear.state_dict())
    quantize_linears(quantized, "fp8")
    assert 1e-4 < rel_err(quantized(x).float(), linear(x).float().detach()) < LAYER_TOLERANCE["fp8"]


# -- the whole tiny model -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", QUANTIZED)
def test_emulated_engine_is_within_tolerance_of_float(mode):
    assert 1e-4 < _model_error(RuntimeConfig(linear=mode, linear_emulation=True)) < MODEL_TOLERANCE[mode]


@pytest.mark.parametrize("mode", ON_CPU)
def test_torchao_engine_is_within_tolerance_of_float(mode):
    assert 1e-4 < _model_error(RuntimeConfig(linear=mode)) < MODEL_TOLERANCE[mode]


def _wrong_scale(model) -> None:
    """Every block linear with its weight scales doubled (torchao's Int8Tensor or the emulation's)."""
    with torch.no_grad():
        for layer in model.blocks.modules():
            if isinstance(layer, EmulatedQuantizedLinear):
                layer.weight_scale.mul_(2)
            elif isinstance(layer, nn.Linear):
                layer.weight.scale.mul_(2)


@pytest.mark.parametrize(
    "runtime", [RuntimeConfig(linear="int8"), RuntimeConfig(linear="fp8", linear_emulation=True)]
)
def test_a_wrong_scale_breaks_the_model_tolerance(runtime):
    assert _model_error(runtime, tamper=_wrong_scale) > MODEL_TOLERANCE[runtime.linear]


def test_blocks_only_are_quantized_and_the_callers_model_is_not():
    from torchao.utils import TorchAOBaseTensor

    model = tiny_model(seed=0)
    engine = Engine(model, GenerationConfig(), SIZE, runtime=RuntimeConfig(linear="int8_weight_only"))
    block_linears = [m for m in engine.model.blocks.modules() if isinstance(m, nn.Linear)]
    assert len(block_linears) == 2 * 10  # q, k, v, o of both attentions and the FFN's two, per block
    assert all(isinstance(m.weight, TorchAOBaseTensor) for m in block_linears)
    assert not isinstance(engine.model.head.head.weight, TorchAOBaseTensor)  # the head stays float
    assert not any(isinstance(p, TorchAOBaseTensor) for p in model.parameters())


# -- bad input ------------------------------------------------------------------------------------------
def test_fp8_on_the_cpu_fails_at_start_up_naming_what_works():
    with pytest.raises(ValueError, match="FP8 tensor cores") as caught:
        Engine(tiny_model(seed=0), GenerationConfig(), SIZE, runtime=RuntimeConfig(linear="fp8"))
    assert "linear: int8" in str(caught.value) and "linear_emulation: true" in str(caught.value)


@pytest.mark.parametrize(
    "capability, refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)]
)
def test_fp8_on_cuda_needs_capability_8_9(monkeypatch, capability, refused):
    # No GPU here: the CUDA queries answer as a card of that capability would.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test card")
    cuda = torch.device("cuda", 0)
    if refused:
        named = rf"a test card \(compute capability {capability[0]}\.{capability[1]}\)"
        with pytest.raises(ValueError, match=named):
            check_linear_mode("fp8", cuda, torch.bfloat16, emulation=False)
    else:
        check_linear_mode("fp8", cuda, torch.bfloat16, emulation=False)
    check_linear_mode("fp8", cuda, torch.bfloat16, emulation=True)  # emulation asked for: always allowed
    check_linear_mode("int8", cuda, torch.bfloat16, emulation=False)


def test_fp8_needs_bf16_weights(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match="bf16 weights"):
        check_linear_mode("fp8", torch.device("cuda", 0), torch.float32, emulation=False)


def test_linear_config_validation():
    with pytest.raises(ValueError, match="linear must be one of"):
        RuntimeConfig(linear="fp4")
    with pytest.raises(ValueError, match="linear_emulation"):
        RuntimeConfig(linear_emulation=True)  # nothing to emulate in bf16


# -- the text encoder -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ON_CPU)
def test_int8_text_encoder_is_within_tolerance(mode):
    from torchao.utils import TorchAOBaseTensor

    text = "a red robot in a rainy city"
    reference = TextEncoder.tiny_random(d_model=32).encode(text)
    encoder = TextEncoder.tiny_random(d_model=32).quantize(mode)
    linears = [m for m in encoder.model.encoder.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m.weight, TorchAOBaseTensor) for m in linears)
    assert not isinstance(encoder.model.shared.weight, TorchAOBaseTensor)  # the embedding: a lookup
    assert 1e-4 < rel_err(encoder.encode(text), reference) < TEXT_TOLERANCE[mode]

    with torch.no_grad():
        for m in linears:
            m.weight.scale.mul_(2)  # negative control: scales doubled
    encoder.clear_cache()
    assert rel_err(encoder.encode(text), reference) > TEXT_TOLERANCE[mode]


def test_text_encoder_quantize_refuses_bad_input():
    with pytest.raises(ValueError, match="int8_weight_only"):
        TextEncoder.tiny_random(d_model=32).quantize("fp8")
    with pytest.raises(ValueError, match="before offload"):
        TextEncoder.tiny_random(d_model=32).offload("cpu").quantize()
