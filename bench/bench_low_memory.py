"""The whole pipeline, umT5-XXL text encoder included, inside 24 GB of GPU memory.

Full-size DiT, Wan VAE and umT5-XXL encoder (random weights, byte tokenizer). First the default mode
(encoder resident on the GPU) as the baseline, then low-memory mode (`RuntimeConfig(low_memory=True)`:
encoder in pinned host memory between prompts, VAE one latent frame per pass) under a hard cap of
--cap-gib on PyTorch's allocator, so going over it fails the run. Every --switch-every seconds a new
prompt (a text-encoder cache miss) is applied. Reports FPS, prompt encode cost and peak memory.

    python bench/bench_low_memory.py --out bench/results/low_memory_h100.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import build_model  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from longlive_core import LongLivePipeline, TextEncoder  # noqa: E402
from longlive_core.config import RuntimeConfig  # noqa: E402
from longlive_core.models.vae_wan import VAEConfig, WanVAEDecoder, init_random_weights  # noqa: E402
from longlive_core.random_models import random_umt5_xxl  # noqa: E402
from longlive_core.schedule import PromptChange  # noqa: E402

GIB = 2**30


def build_umt5_xxl() -> TextEncoder:
    return random_umt5_xxl("cuda", torch.bfloat16, cache_size=0)  # random init on the GPU: seconds


def run(pipe: LongLivePipeline, seconds: float, switch_every: float, tag: str) -> dict[str, float]:
    schedule = [
        PromptChange(at=t, prompt=f"{tag} scene {i}: a red robot walks through a rainy neon city, shot {i}")
        for i, t in enumerate(np.arange(0, seconds, switch_every))
    ]
    torch.cuda.synchronize()
    start = time.perf_counter()
    stream = pipe.stream(schedule=schedule, seconds=seconds, seed=1)
    frames = len(next(stream))
    first = time.perf_counter() - start
    frames += sum(len(chunk) for chunk in stream)
    wall = time.perf_counter() - start
    return {"frames": frames, "wall": wall, "fps": frames / wall, "first_ms": first * 1e3}


def encode_ms(encoder: TextEncoder, n: int = 5) -> float:
    times = []
    for i in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        encoder.encode(f"an encode timing prompt number {i} about a cat on a boat")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--baseline-seconds", type=float, default=20)
    parser.add_argument("--switch-every", type=float, default=10)
    parser.add_argument("--cap-gib", type=float, default=22.0, help="allocator cap (a 24 GB card, less CUDA)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True

    transformer = build_model(torch.bfloat16)
    encoder = build_umt5_xxl()
    vae = init_random_weights(WanVAEDecoder(VAEConfig.from_name("wan2.1")), seed=0).to("cuda", torch.bfloat16)
    vae.eval().to_channels_last().compile_block()
    rows = [
        "| mode | video | wall (s) | end-to-end FPS | first chunk (ms) | encode a new prompt (ms) |"
        " peak allocated (GiB) | peak reserved (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    for low_memory in (False, True):
        runtime = RuntimeConfig(attention="cudnn", compile=True, low_memory=low_memory)
        if low_memory:
            encoder.offload("cuda")
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / total)
        pipe = LongLivePipeline(transformer, encoder, vae, runtime=runtime)
        run(pipe, 4, 2, f"warm-{low_memory}")  # compile / autotune every shape, incl. a recache
        torch.cuda.reset_peak_memory_stats()
        encode = encode_ms(encoder)
        result = run(pipe, args.seconds if low_memory else args.baseline_seconds, args.switch_every, "go")
        name = f"low memory, capped at {args.cap_gib:g} GiB" if low_memory else "default (encoder on GPU)"
        rows.append(
            f"| {name} | {result['frames']} frames | {result['wall']:.1f} | {result['fps']:.1f} |"
            f" {result['first_ms']:.0f} | {encode:.0f} | {torch.cuda.max_memory_allocated() / GIB:.2f} |"
            f" {torch.cuda.max_memory_reserved() / GIB:.2f} |"
        )
        print(rows[-1], flush=True)
    meta = [
        f"- card: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; 832x480;"
        " compiled DiT blocks (cuDNN attention) and compiled channels_last_3d Wan VAE;"
        " umT5-XXL encoder (5.7B, random weights)",
        f"- command: `{command_line()}`",
        f"- a new prompt every {args.switch_every:g} s (encoder cache off: every switch encodes);"
        " peak memory covers encoder, DiT, KV cache and VAE over the whole run",
    ]
    emit("Low-memory mode: whole pipeline within 24 GB", meta, rows, args.out)


if __name__ == "__main__":
    main()
