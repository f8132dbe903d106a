"""Where a steady block and a recache spend their GPU time (issue 20, item 1), per linear mode.

One engine, one session, compiled blocks (harness definitions), warmed up through a full window and a
switch; then torch.profiler (CUDA activity only) records one steady step and one step with a recache.
Per step: wall time (CUDA events), the kernels' summed time by kind (GEMM, attention, activation
quantization, other Triton / fused elementwise, other aten kernels, copies), the kernel count (each a
launch), and the time no kernel ran (the host launching too late).

Hypotheses this profile tests: the bf16 block is GEMM + attention bound (elementwise a minor share);
fp8 pays for its faster GEMMs with activation-quantization kernels (amax, scale, cast) unless the
compiler fuses them into the preceding norm / modulation; recache is one pass over 9 frames at block cost.

    python bench/bench_kernel_profile.py --modes bf16 fp8 --out bench/results/kernel_profile_h200.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import build_model, random_prompts, run_engine, timed  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from longlive_core.config import LINEAR_MODES, RuntimeConfig  # noqa: E402

KINDS = ("GEMM", "attention", "activation quantization", "Triton / fused elementwise", "other aten", "copies")


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "cutlass", "cublas", "xmma", "nvjet", "matmul", "scaled_mm")):
        return "GEMM"
    if any(k in lowered for k in ("flash", "fmha", "attention", "cudnn", "sdpa")):
        return "attention"
    if "memcpy" in lowered or "memset" in lowered or "copy" in lowered:
        return "copies"
    # Inductor names a kernel by the ops it fuses: amax + a cast to float8 / int8 is an activation's
    # quantization (alone, or fused into the norm before it).
    if lowered.startswith("triton") and "amax" in lowered:
        return "activation quantization"
    if lowered.startswith("triton") or "fused" in lowered:
        return "Triton / fused elementwise"
    return "other aten"


def profile_step(step) -> tuple[float, dict[str, float], int]:
    """(wall seconds, kernel seconds by kind, kernels launched) of one call of `step`."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = timed(step)
    by_kind: dict[str, float] = defaultdict(float)
    launches = 0
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            by_kind[kernel_kind(event.key)] += event.self_device_time_total / 1e6
            launches += event.count
    return wall, by_kind, launches


def rows_for(name: str, wall: float, by_kind: dict[str, float], launches: int) -> list[str]:
    busy = sum(by_kind.values())
    rows = [f"| {name}: wall | {wall * 1e3:.1f} | 100% | {launches} kernels |"]
    rows += [
        f"| {name}: {kind} | {by_kind[kind] * 1e3:.1f} | {by_kind[kind] / wall:.1%} | |"
        for kind in KINDS
        if by_kind.get(kind)
    ]
    rows.append(
        f"| {name}: no kernel running (launch gaps) | {max(wall - busy, 0) * 1e3:.1f} |"
        f" {max(wall - busy, 0) / wall:.1%} | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=LINEAR_MODES, default=["bf16", "fp8"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model = build_model(torch.bfloat16)
    prompts = random_prompts(model)
    rows = ["| step: kind | ms | share of the step | |", "|---|---|---|---|"]
    for mode in args.modes:
        run = run_engine(model, RuntimeConfig(compile=True, linear=mode), prompts, blocks=6)
        engine = run.engine
        rows += rows_for(f"{mode} steady block", *profile_step(engine.step))
        engine.set_prompt("s0", prompts[1])
        rows += rows_for(f"{mode} block + recache", *profile_step(engine.step))
        print("\n".join(rows), flush=True)
        del run, engine
    meta = [
        f"- card: {torch.cuda.get_device_name()}; torch {torch.__version__}; full size, random weights;"
        " compiled blocks, cuDNN attention first; 1 session; warmed up (6 blocks and 4 switches)",
        f"- command: `{command_line()}`",
        "- kinds by kernel name (bench/bench_kernel_profile.py `kernel_kind`); a share is of the step's wall"
        " time; 'no kernel running' = wall minus the kernels' summed time (one stream: they do not overlap)",
    ]
    emit("Profile of a steady block and a recache", meta, rows, args.out)


if __name__ == "__main__":
    main()
