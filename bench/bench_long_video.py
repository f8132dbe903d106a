"""One 240 s session end to end on one GPU: DiT + streaming decoder, a prompt switch every 10 s.

Full-size architecture, random weights. Reports time to the first frame (a new session on a warm
engine), steady end-to-end FPS, prompt-switch cost, and peak GPU memory at 10 s, 60 s and 240 s of
video (never reset: flat memory means the three are equal). Writes --out (markdown).

    python bench/bench_long_video.py --compile --decoder wan --out bench/results/long_video_h100.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import LATENT_SIZE, build_model  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from longlive_core import Engine, GenerationConfig  # noqa: E402
from longlive_core.config import RuntimeConfig  # noqa: E402
from longlive_core.models.tae_wan import TAEConfig, TinyVideoDecoder, init_random_tae  # noqa: E402
from longlive_core.models.vae_wan import VAEConfig, WanVAEDecoder, init_random_weights  # noqa: E402
from longlive_core.schedule import blocks_for_seconds, switch_block  # noqa: E402

FPS = 16


def build_decoder(name: str, compile: bool) -> torch.nn.Module:
    if name == "tae":
        tae = init_random_tae(TinyVideoDecoder(TAEConfig.from_name("taew2_1")), seed=0)
        return tae.to("cuda", torch.bfloat16)
    vae = init_random_weights(WanVAEDecoder(VAEConfig.from_name("wan2.1")), seed=0).to("cuda", torch.bfloat16)
    vae.to_channels_last()
    return vae.compile_block() if compile else vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--switch-every", type=float, default=10)
    parser.add_argument("--decoder", choices=["wan", "tae"], default="wan")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model = build_model("wan2.1-t2v-1.3b", torch.bfloat16)
    torch.backends.cudnn.benchmark = True
    decoder = build_decoder(args.decoder, args.compile).eval()
    runtime = RuntimeConfig(compile=args.compile)
    engine = Engine(model, GenerationConfig(), LATENT_SIZE, max_sessions=1, runtime=runtime)
    prompts = [torch.randn(40, model.config.text_dim, device="cuda") for _ in range(2)]

    # Warm-up session: compiles / autotunes every shape (first blocks, full window, recache).
    engine.add_session("warm", prompts[0], num_blocks=7)
    warm_stream = decoder.new_stream()
    for b in range(7):
        if b == 5:
            engine.set_prompt("warm", prompts[1])
        with torch.no_grad():
            warm_stream.decode(engine.step()["warm"][None].to(torch.bfloat16))
    engine.step()  # the warm session leaves
    del warm_stream
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    blocks = blocks_for_seconds(args.seconds, 3)
    switches = {
        switch_block(t, 3) for t in range(int(args.switch_every), int(args.seconds), int(args.switch_every))
    }
    marks = {blocks_for_seconds(s, 3) - 1: s for s in (10, 60, 240) if s <= args.seconds}
    peaks: dict[int, float] = {}
    block_times, switch_times = [], []
    start = time.perf_counter()
    engine.add_session("s", prompts[0], seed=0, num_blocks=blocks)
    stream = decoder.new_stream()
    first_frame = None
    for b in range(blocks):
        if b in switches:
            engine.set_prompt("s", prompts[b % 2])
        t0 = time.perf_counter()
        with torch.no_grad():
            frames = stream.decode(engine.step()["s"][None].to(torch.bfloat16))
        frames.float().sum().item()  # the frames are on the host side of the pipeline: sync here
        elapsed = time.perf_counter() - t0
        if first_frame is None:
            first_frame = time.perf_counter() - start
        (switch_times if b in switches else block_times).append(elapsed)
        if b in marks:
            peaks[marks[b]] = torch.cuda.max_memory_allocated() / 2**30
    total = time.perf_counter() - start
    steady = statistics.median(block_times[4:])
    switched = statistics.median(switch_times)
    frames_total = 1 + 4 * (3 * blocks - 1)
    rows = [
        "| metric | value |",
        "|---|---|",
        f"| video | {args.seconds:g} s, {blocks} blocks, {frames_total} frames, {len(switches)} switches |",
        f"| time to first frame (new session, warm engine) | {first_frame * 1e3:.0f} ms |",
        f"| steady block, DiT + {args.decoder} decode | {steady * 1e3:.1f} ms = {12 / steady:.1f} FPS |",
        f"| block with a switch (recache + block + decode) | {switched * 1e3:.1f} ms |",
        f"| switch cost | {(switched - steady) * 1e3:.1f} ms |",
        f"| whole video | {total:.1f} s wall = {frames_total / total:.1f} FPS overall |",
        *[f"| peak GPU memory at {s} s | {gib:.2f} GiB |" for s, gib in sorted(peaks.items())],
    ]
    meta = [
        f"- card: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; latent {LATENT_SIZE};"
        f" {'compiled DiT blocks and decoder' if args.compile else 'eager'}, cuDNN attention first;"
        f" decoder {args.decoder} (Wan VAE: channels_last_3d)",
        f"- command: `{command_line()}`",
        "- DiT and decoder in series on one stream;"
        " memory = weights + KV cache + decoder cache + activations",
    ]
    emit("240 s session end to end", meta, rows, args.out)


if __name__ == "__main__":
    main()
