"""Long videos end to end on one GPU: DiT + streaming decoder, a prompt switch every 10 s.

Full-size architecture, random weights; --sessions N runs N sessions batched in one engine. Reports time
to the first frame (new sessions on a warm engine), steady end-to-end FPS (aggregate and per session),
prompt-switch cost, and peak GPU memory at 10 s, 60 s and 240 s of video (never reset: flat memory means
they are equal). --jump-to 60 240 reaches those states by starting fresh sessions 10 s before them instead of
generating the whole video. Writes --out (markdown).

    python bench/bench_long_video.py --compile --decoder wan --out bench/results/long_video_h100.md
    python bench/bench_long_video.py --compile --sessions 2 --seconds 20 --jump-to 60 240
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import LATENT_SIZE, STEADY_FROM, build_decoder, build_model, decode  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from longlive_core import Engine, GenerationConfig  # noqa: E402
from longlive_core.config import RuntimeConfig  # noqa: E402
from longlive_core.schedule import blocks_for_seconds, switch_block  # noqa: E402


@dataclass
class Phase:
    block_times: list[float] = field(default_factory=list)
    switch_times: list[float] = field(default_factory=list)
    peaks: dict[float, float] = field(default_factory=dict)
    first_frame: float = 0.0
    wall: float = 0.0


def run_phase(
    engine: Engine,
    decoder: torch.nn.Module,
    prompts: list[torch.Tensor],
    sessions: int,
    blocks: int,
    switches: set[int],
    marks: dict[int, float],
    first_frame: int,
    split: bool,
) -> Phase:
    """`sessions` sessions of `blocks` blocks from latent frame `first_frame`, in step; times every step."""
    phase = Phase()
    ids = [f"s{i}-{first_frame}-{blocks}" for i in range(sessions)]
    start = time.perf_counter()
    for i, sid in enumerate(ids):
        engine.add_session(sid, prompts[0], seed=i, num_blocks=blocks, first_frame=first_frame)
    streams = {sid: decoder.new_stream() for sid in ids}
    for b in range(blocks):
        if b in switches:
            for sid in ids:
                engine.set_prompt(sid, prompts[b % 2])
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = engine.step()
            frames = [decode(streams[sid], latents[sid][None].to(torch.bfloat16), split) for sid in ids]
        sum(f.float().sum() for f in frames).item()  # the frames are on the host side: sync here
        elapsed = time.perf_counter() - t0
        if b == 0:
            phase.first_frame = time.perf_counter() - start
        (phase.switch_times if b in switches else phase.block_times).append(elapsed)
        if b in marks:
            phase.peaks[marks[b]] = torch.cuda.max_memory_allocated() / 2**30
    phase.wall = time.perf_counter() - start
    engine.step()  # the sessions leave
    return phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--switch-every", type=float, default=10)
    parser.add_argument("--decoder", choices=["wan", "tae"], default="wan")
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions, batched")
    parser.add_argument(
        "--jump-to", type=float, nargs="*", default=[], help="also measure memory at these lengths (s)"
    )
    parser.add_argument("--low-memory", action="store_true", help="decode one latent frame per pass")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = build_model(torch.bfloat16)
    torch.backends.cudnn.benchmark = True
    decoder = build_decoder(args.decoder, args.compile).eval()
    runtime = RuntimeConfig(compile=args.compile)
    engine = Engine(model, GenerationConfig(), LATENT_SIZE, max_sessions=args.sessions, runtime=runtime)
    prompts = [torch.randn(40, model.config.text_dim, device="cuda") for _ in range(2)]

    # Warm-up: as many sessions as measured, so every shape (first blocks, full window, recache, batch
    # size) is compiled and autotuned before the clock and the memory peak start.
    warm = run_phase(engine, decoder, prompts, args.sessions, 7, {5}, {}, 0, args.low_memory)
    print(f"# warm-up done, first block {warm.first_frame:.1f} s", flush=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    blocks = blocks_for_seconds(args.seconds, 3)
    switches = {
        switch_block(t, 3) for t in range(int(args.switch_every), int(args.seconds), int(args.switch_every))
    }
    marks = {blocks_for_seconds(s, 3) - 1: s for s in (10, 60, 240) if s <= args.seconds}
    split = args.low_memory
    phase = run_phase(engine, decoder, prompts, args.sessions, blocks, switches, marks, 0, split)
    peaks = phase.peaks
    for end in args.jump_to:
        # The state of a long video without generating it: new sessions start 10 s before `end`.
        start_block = blocks_for_seconds(end - 10, 3)
        tail = blocks_for_seconds(end, 3) - start_block
        jump = run_phase(
            engine, decoder, prompts, args.sessions, tail, set(), {tail - 1: end}, 3 * start_block, split
        )
        peaks |= jump.peaks
    n = args.sessions
    steady = statistics.median(phase.block_times[STEADY_FROM:])
    switched = statistics.median(phase.switch_times)
    frames_total = n * (1 + 4 * (3 * blocks - 1))
    rows = [
        "| metric | value |",
        "|---|---|",
        f"| video | {n} session(s) x {args.seconds:g} s, {blocks} blocks, {frames_total} frames,"
        f" {len(switches)} switches each |",
        f"| time to first frame (new sessions, warm engine) | {phase.first_frame * 1e3:.0f} ms |",
        f"| steady step (all sessions), DiT + {args.decoder} decode | {steady * 1e3:.1f} ms ="
        f" {12 * n / steady:.1f} FPS aggregate, {12 / steady:.1f} FPS per session |",
        f"| step with a switch in every session (recache + block + decode) | {switched * 1e3:.1f} ms |",
        f"| switch cost | {(switched - steady) * 1e3:.1f} ms |",
        f"| whole video | {phase.wall:.1f} s wall = {frames_total / phase.wall:.1f} FPS overall |",
        *[f"| peak GPU memory at {s} s | {gib:.2f} GiB |" for s, gib in sorted(peaks.items())],
    ]
    jumped = "; memory at " + ", ".join(f"{t:g} s" for t in args.jump_to) + " by sessions started 10 s before"
    meta = [
        f"- card: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; latent {LATENT_SIZE};"
        f" {'compiled DiT blocks and decoder' if args.compile else 'eager'}, cuDNN attention first;"
        f" decoder {args.decoder} (Wan VAE: channels_last_3d)",
        f"- command: `{command_line()}`",
        f"- {n} session(s) batched in one engine step, each decoded by its own decoder stream;"
        " DiT and decoder in series on one stream; memory = weights + KV cache + decoder caches + activations"
        + (jumped if args.jump_to else "")
        + ("; low-memory decode (one latent frame per pass)" if split else ""),
    ]
    emit(f"{args.sessions} session(s), long video end to end", meta, rows, args.out)


if __name__ == "__main__":
    main()
