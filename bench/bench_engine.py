"""DiT-only speed of the Engine at full size (random weights) on one GPU.

Prints one table and writes it, with card, torch version and command, to bench/results/<name>.md.
Numbers: time per block in the steady state (window full), video frames per second (12 per block
after the first), time of the first block, prompt-switch (recache) cost, peak GPU memory, and the
same at several concurrent sessions.

    python bench/bench_engine.py --sessions 1 2 4 --blocks 12 --out bench/results/engine_eager.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, emit  # noqa: E402
from longlive_core import CausalWanTransformer, Engine, GenerationConfig  # noqa: E402
from longlive_core.config import RuntimeConfig  # noqa: E402
from longlive_core.random_models import random_transformer  # noqa: E402

VIDEO_FRAMES_PER_BLOCK = 12  # 3 latent frames x 4 (the first block gives 9)
LATENT_SIZE = (60, 104)  # 480 x 832 video


def build_model(preset: str, dtype: torch.dtype) -> CausalWanTransformer:
    """Full-size model with random weights, built directly on the GPU (speed does not depend on values)."""
    return random_transformer(preset, "cuda").to(dtype).eval()


def timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def gpu_kernel_seconds(fn) -> float:
    """Summed GPU time of the kernels and copies `fn` runs (CUPTI). Over the step's wall time it is the
    share of the step the GPU works: what CUDA graphs (which remove launch gaps only) could at most save
    is the rest."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e6


def run_sessions(
    model, cfg, sessions: int, blocks: int, text_len: int, runtime: RuntimeConfig, first_frame: int = 0
) -> dict[str, float]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(model, cfg, LATENT_SIZE, max_sessions=sessions, runtime=runtime)
    prompts = [torch.randn(text_len, model.config.text_dim, device="cuda") for _ in range(2)]
    prompt = prompts[0]
    for i in range(sessions):
        engine.add_session(f"s{i}", prompt, seed=i, first_frame=first_frame)
    first = timed(engine.step)
    steady = []
    for _ in range(blocks):
        steady.append(timed(engine.step))
    steady = steady[4:]  # the window fills after 4 blocks; later blocks all have the same cost
    block_s = statistics.median(steady)
    busy_s = gpu_kernel_seconds(engine.step)
    switches = []
    for k in range(4):  # the first switch warms up the recache shapes; median of the other three
        engine.set_prompt("s0", prompts[(k + 1) % 2])
        switches.append(timed(engine.step) - block_s)
    peak = torch.cuda.max_memory_allocated()
    return {
        "sessions": sessions,
        "first_block_ms": first * 1e3,
        "block_ms": block_s * 1e3,
        "fps_per_session": VIDEO_FRAMES_PER_BLOCK / block_s,
        "fps_total": sessions * VIDEO_FRAMES_PER_BLOCK / block_s,
        "recache_ms": statistics.median(switches[1:]) * 1e3,
        "gpu_busy": busy_s / block_s,
        "peak_gib": peak / 2**30,
        "cache_gib": engine.cache.nbytes / 2**30,
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
    model = build_model(args.preset, torch.bfloat16)
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
        f"- model: {args.preset}, random weights ({weights_gib:.2f} GiB), latent {LATENT_SIZE},"
        f" rope {args.rope_mode}, sessions start at latent frame {args.first_frame}",
        f"- command: `{command_line()}`",
        f"- block = median over blocks 5..{args.blocks} (window full: every later block costs the same);"
        " recache = step with a switch minus a block (median of 3, after one warm-up switch);"
        " peak = weights + KV cache + activations",
    ]
    emit("Engine DiT-only speed", meta, lines, args.out)


if __name__ == "__main__":
    main()
