"""The fast path (compiled blocks, preferred attention kernels) computes the same function on CPU."""

from __future__ import annotations

import pytest

from longlive_core.config import GenerationConfig, RuntimeConfig
from longlive_core.engine import Engine
from tests.helpers import prompt, rel_err, tiny_model

SIZE = (4, 6)


def _blocks(runtime: RuntimeConfig, blocks: int = 6, switch_before: int = 5):
    engine = Engine(tiny_model(seed=0), GenerationConfig(), SIZE, runtime=runtime)
    engine.add_session("s", prompt(0), seed=1)
    out = []
    for b in range(blocks):
        if b == switch_before:
            engine.set_prompt("s", prompt(1))
        out.append(engine.step()["s"])
    return out


def test_compiled_blocks_equal_eager():
    """Window filling (prefix keys), full window, and a recache: every shape the step takes."""
    eager = _blocks(RuntimeConfig())
    compiled = _blocks(RuntimeConfig(compile=True))
    assert max(rel_err(a, b) for a, b in zip(compiled, eager, strict=True)) < 1e-5


def test_preferred_kernel_falls_back_where_it_cannot_run():
    # Flash attention has no CPU kernel and no masks: the step still runs (on the next kernel in line).
    eager = _blocks(RuntimeConfig(), blocks=3)
    flash_first = _blocks(RuntimeConfig(attention="flash"), blocks=3)
    assert max(rel_err(a, b) for a, b in zip(flash_first, eager, strict=True)) < 1e-6


def test_runtime_config_validation():
    with pytest.raises(ValueError, match="attention"):
        RuntimeConfig(attention="fastest")


def _module_snapshot(model) -> list[tuple[str, type, bool]]:
    return [(name, type(m), "_compiled_call_impl" in vars(m)) for name, m in model.named_modules()]


def test_the_engine_leaves_its_callers_model_alone():
    """Compiling and quantizing apply to the engine's own copy: the caller's model keeps its modules,
    parameters and function. Control: the engine's model is quantized and compiled."""
    import torch
    from torchao.utils import TorchAOBaseTensor

    model = tiny_model(seed=0)
    modules = _module_snapshot(model)
    params = {name: (p.data_ptr(), p.detach().clone()) for name, p in model.state_dict().items()}
    engine = Engine(model, GenerationConfig(), SIZE, runtime=RuntimeConfig(compile=True, linear="int8"))
    assert _module_snapshot(model) == modules
    assert all(
        p.data_ptr() == params[name][0] and torch.equal(p, params[name][1])
        for name, p in model.state_dict().items()
    )
    assert engine.model is not model
    assert isinstance(engine.model.blocks[0].ffn[0].weight, TorchAOBaseTensor)
    assert all("_compiled_call_impl" in vars(block) for block in engine.model.blocks)
    # Unquantized parameters are shared, not copied.
    assert engine.model.patch_embedding.weight is model.patch_embedding.weight
    assert Engine(model, GenerationConfig(), SIZE).model is model  # nothing to apply: the model itself
