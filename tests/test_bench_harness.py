"""The benchmarks' shared harness on the CPU with the tiny model: it times what the Engine computes (no
other function), and the GPU benches import and run their code path (a smoke run of bench_kernels)."""

from __future__ import annotations

import importlib

import pytest
import torch

from bench import bench_kernels
from bench.harness import TINY, build_model, random_prompts, run_engine
from longlive_core import Engine, GenerationConfig
from longlive_core.config import RuntimeConfig

BENCHES = ["bench_engine", "bench_fast_path", "bench_long_video", "bench_kernel_profile", "bench_live"]


def test_run_engine_times_the_engines_own_blocks():
    model = build_model(torch.float32, TINY)
    prompts = random_prompts(model)
    run = run_engine(model, RuntimeConfig(), prompts, TINY, blocks=5, keep=3)
    assert len(run.block_times) == 5 and run.first_s > 0 and run.block_s > 0
    assert len(run.outputs) == 3
    # The same session stepped directly: the harness changed nothing it computes.
    engine = Engine(model, GenerationConfig(), TINY.latent)
    engine.add_session("s0", prompts[0], seed=0)
    direct = [engine.step()["s0"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(run.outputs, direct, strict=True))
    # Control: another seed gives other blocks (the comparison can fail).
    other = Engine(model, GenerationConfig(), TINY.latent)
    other.add_session("s0", prompts[0], seed=1)
    assert not torch.equal(other.step()["s0"], direct[0])


@pytest.mark.parametrize("name", BENCHES)
def test_the_benches_import_the_harness(name):
    importlib.import_module(f"bench.{name}")


def test_bench_kernels_smoke_run_on_the_tiny_model():
    # The DiT section is run_engine (above); the 16 GB card and the accuracy run have code of their own.
    report = bench_kernels.main(
        ["--size", "tiny", "--no-compile", "--modes", "bf16", "int8_weight_only", "--blocks", "5"]
        + ["--accuracy-seconds", "1", "--sections", "card16", "accuracy"]
    )
    accuracy = next(line for line in report.splitlines() if line.startswith("| int8_weight_only | "))
    errors = [float(e) for e in accuracy.split("|")[2].split(" / ")]
    assert all(1e-5 < e < 1e-2 for e in errors)  # quantized, and close to bf16 (tiny model, float32)
    assert "encode a new prompt (INT8 umT5)" in report
