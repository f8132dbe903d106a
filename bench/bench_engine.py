"""DiT-only speed of the Engine at full size (random weights) on one GPU.

Prints one table and writes it, with card, torch version and command, to bench/results/<name>.md.
Numbers: time per block in the steady state (window full), video frames per second (12 per block
after the first), time of the first block, prompt-switch (recache) cost, peak GPU memory, and the
same at several concurrent sessions.

    python bench/bench_engine.py --sessions 1 2 4 --blocks 12 --out bench/results/engine_eager.md
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    FULL,
    STEADY_FROM,
    build_model,
    fps,
    gpu_kernel_seconds,
    random_prompts,
    run_engine,
)
from bench.report import command_line, emit  # noqa: E402
from longlive_core import GenerationConfig  # noqa: E402
from longlive_core.config import RuntimeConfig  # noqa: E402


def run_sessions(
    model, cfg, sessions: int, blocks: int, text_len: int, runtime: RuntimeConfig, first_frame: int = 0
) -> dict[str, float]:
    run = run_engine(
        model,
        runtime,
        random_prompts(model, 2, text_len),
        sessions=sessions,
        blocks=blocks,
        first_frame=first_frame,
        config=cfg,
    )
    return {
        "sessions": sessions,
        "first_block_ms": run.first_s * 1e3,
        "block_ms": run.block_s * 1e3,
        "fps_per_session": fps(run.block_s),
        "fps_total": fps(run.block_s, sessions),
        "recache_ms": run.recache_s * 1e3,
        "gpu_busy": gpu_kernel_seconds(run.engine.step) / run.block_s,
        "peak_gib": run.peak_gib,
        "cache_gib": run.engine.cache.nbytes / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="wan2.1-t2v-1.3b")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--text-len", type=int, default=40, help="real prompt tokens (padded to 512)")
    parser.add_argument("--rope-mode", default="absolute", choices=["absolute", "relative"])
    parser.add_argument("--attention", default="auto", choices=["auto", "cudnn", "flash", "efficient"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument(
        "--first-frame",
        type=int,
        default=0,
        help="start sessions at this latent frame (957: the 240 s state)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    runtime = RuntimeConfig(attention=args.attention, compile=args.compile)
    model = build_model(torch.bfloat16, replace(FULL, preset=args.preset))
    weights_gib = torch.cuda.memory_allocated() / 2**30
    cfg = GenerationConfig(rope_mode=args.rope_mode)
    rows = []
    for n in args.sessions:
        t0 = time.perf_counter()
        rows.append(run_sessions(model, cfg, n, args.blocks, args.text_len, runtime, args.first_frame))
        print(f"# {n} session(s) done in {time.perf_counter() - t0:.1f} s", flush=True)

    columns = [
        ("sessions", "sessions", "{}"),
        ("block (ms)", "block_ms", "{:.1f}"),
        ("FPS / session", "fps_per_session", "{:.1f}"),
        ("FPS total", "fps_total", "{:.1f}"),
        ("first block, cold (ms)", "first_block_ms", "{:.1f}"),
        ("recache (ms)", "recache_ms", "{:.1f}"),
        ("GPU busy in a block", "gpu_busy", "{:.1%}"),
        ("peak GPU memory (GiB)", "peak_gib", "{:.2f}"),
        ("KV cache (GiB)", "cache_gib", "{:.2f}"),
    ]
    lines = ["| " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[key]) for _, key, fmt in columns) + " |")
    meta = [
        f"- card: {torch.cuda.get_device_name()}",
        f"- torch: {torch.__version__}, bf16, attention {args.attention},"
        f" {'compiled blocks' if args.compile else 'eager'}, no CUDA graphs",
        f"- model: {args.preset}, random weights ({weights_gib:.2f} GiB), latent {FULL.latent},"
        f" rope {args.rope_mode}, sessions start at latent frame {args.first_frame}",
        f"- command: `{command_line()}`",
        f"- bench/harness.py's definitions: block = median over blocks {STEADY_FROM + 1}..{args.blocks}"
        " (window full: every later block costs the same); recache = step with a switch minus a block"
        " (median of 3, after one warm-up switch); peak = weights + KV cache + activations",
    ]
    emit("Engine DiT-only speed", meta, lines, args.out)


if __name__ == "__main__":
    main()
