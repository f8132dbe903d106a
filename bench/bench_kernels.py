"""Kernels on one GPU (issue 20): speed, memory and accuracy of each linear mode, by bench/harness.py's
definitions, full-size architecture with random weights.

Sections (--sections):
- dit: per mode (bf16, fp8, int8, int8_weight_only; compiled blocks), 1 and 2 sessions batched: steady
  block, DiT-only FPS, recache, peak memory.
- e2e: per mode, one session, DiT + Wan VAE decode in series (compiled, channels_last_3d): FPS; the
  VAE's decode of a block alone.
- card16: the "16 GB card" configuration: INT8 weight-only DiT, INT8 weight-only umT5-XXL on the GPU,
  TAEW2_1: peak memory over a run that encodes two prompts and switches, end-to-end FPS, encode time.
- accuracy: each quantized mode beside bf16 from the same seeds and prompts over --accuracy-seconds of
  video (a switch every 10 s): per-block relative error of the latents and PSNR of the Wan-VAE-decoded
  frames, at the first block, at 60 s and at the end (errors compound through the KV cache).
Random weights lack the outlier activations of trained ones: the accuracy figures bound the wiring and
the rounding, not a real checkpoint's degradation.

    python bench/bench_kernels.py --out bench/results/kernels_h200.md
    python bench/bench_kernels.py --size tiny --no-compile --modes bf16 int8 --accuracy-seconds 2  # CPU
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    SIZES,
    STEADY_FROM,
    Size,
    build_decoder,
    build_model,
    decode_block_seconds,
    fps,
    peak_gib,
    random_prompts,
    reset_peak,
    run_end_to_end,
    run_engine,
    timed,
)
from bench.report import command_line, emit  # noqa: E402
from longlive_core import Engine, GenerationConfig  # noqa: E402
from longlive_core.config import LINEAR_MODES, RuntimeConfig  # noqa: E402
from longlive_core.schedule import blocks_for_seconds, switch_block  # noqa: E402

SECTIONS = ("dit", "e2e", "card16", "accuracy")


def runtime(mode: str, compile: bool) -> RuntimeConfig:
    return RuntimeConfig(compile=compile, linear=mode)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of frames in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def dit_section(model, prompts, args, size: Size) -> list[str]:
    rows = [
        "| mode | sessions | block (ms) | DiT-only FPS (total) | recache (ms) | peak (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for mode in args.modes:
        for n in args.sessions:
            run = run_engine(
                model, runtime(mode, args.compile), prompts, size, sessions=n, blocks=args.blocks
            )
            rows.append(
                f"| {mode} | {n} | {run.block_s * 1e3:.1f} | {fps(run.block_s, n):.1f} |"
                f" {run.recache_s * 1e3:.1f} | {run.peak_gib:.2f} |"
            )
            print(rows[-1], flush=True)
            del run
            gc.collect()
    return rows


def e2e_section(model, prompts, args, size: Size) -> list[str]:
    decoder = build_decoder("wan", args.compile, size)
    decode_s = decode_block_seconds(decoder, size)
    rows = [
        "| mode | step: DiT + Wan VAE decode (ms) | end-to-end FPS | peak (GiB) |",
        "|---|---|---|---|",
    ]
    for mode in args.modes:
        reset_peak()
        engine = Engine(model, GenerationConfig(), size.latent, runtime=runtime(mode, args.compile))
        engine.add_session("s0", prompts[0], seed=0)
        step_s, _ = run_end_to_end(engine, decoder, args.blocks)
        rows.append(f"| {mode} | {step_s * 1e3:.1f} | {fps(step_s):.1f} | {peak_gib():.2f} |")
        print(rows[-1], flush=True)
        del engine
        gc.collect()
    rows.append(f"| Wan VAE decode of a block alone | {decode_s * 1e3:.1f} | | |")
    return rows


def card16_section(args, size: Size) -> list[str]:
    """INT8 DiT + INT8 text encoder on the GPU + TAE; the caller's bf16 DiT is dropped once the engine
    holds its quantized copy, as a 16 GB replica would load it."""
    from longlive_core.random_models import random_umt5_xxl
    from longlive_core.text_encoder import TextEncoder

    reset_peak()
    if size.preset == "tiny":
        encoder = TextEncoder.tiny_random(d_model=32, device=size.device)
    else:
        encoder = random_umt5_xxl(size.device, torch.bfloat16, cache_size=0)
    encoder.quantize("int8_weight_only")
    model = build_model(torch.bfloat16 if size.device.type == "cuda" else torch.float32, size)
    engine = Engine(model, GenerationConfig(), size.latent, runtime=runtime("int8_weight_only", args.compile))
    del model
    gc.collect()
    decoder = build_decoder("tae", args.compile, size)
    reset_peak()  # building (the bf16 weights before quantization) is not the serving peak
    texts = ["a red robot walks through a rainy neon city", "the robot walks into a forest at dawn"]
    encoded = []
    encode_ms = [timed(lambda t=t: encoded.append(encoder.encode(t))) * 1e3 for t in texts]
    engine.add_session("s0", encoded[0], seed=0)
    step_s, _ = run_end_to_end(engine, decoder, args.blocks)
    engine.set_prompt("s0", encoded[1])
    switch_s, _ = run_end_to_end(engine, decoder, 1)
    return [
        "| metric | value |",
        "|---|---|",
        f"| peak GPU memory (encoder, DiT, KV cache, TAE, activations) | {peak_gib():.2f} GiB |",
        f"| end to end, steady (DiT + TAE decode in series) | {step_s * 1e3:.1f} ms ="
        f" {fps(step_s):.1f} FPS |",
        f"| step with a switch (recache + block + decode) | {switch_s * 1e3:.1f} ms |",
        f"| encode a new prompt (INT8 umT5) | {statistics.median(encode_ms):.1f} ms |",
    ]


def accuracy_section(model, prompts, args, size: Size) -> list[str]:
    blocks = blocks_for_seconds(args.accuracy_seconds, 3)
    switches = {switch_block(t, 3) for t in range(10, int(args.accuracy_seconds), 10)}
    marks = {0: "first block", blocks_for_seconds(60, 3) - 1: "60 s", blocks - 1: "end"}
    marks = {i: name for i, name in marks.items() if i < blocks}
    decoder = build_decoder("wan", args.compile, size)
    rows = [
        f"| mode | latent rel. err: {' / '.join(marks.values())} / max | decoded PSNR (dB):"
        f" {' / '.join(marks.values())} / min |",
        "|---|---|---|",
    ]
    reference = Engine(model, GenerationConfig(), size.latent, runtime=runtime("bf16", args.compile))
    for mode in [m for m in args.modes if m != "bf16"]:
        quantized = Engine(model, GenerationConfig(), size.latent, runtime=runtime(mode, args.compile))
        engines = {"ref": reference, "q": quantized}
        sid = f"acc-{mode}"
        streams = {}
        for name, engine in engines.items():
            engine.add_session(sid, prompts[0], seed=7, num_blocks=blocks)
            streams[name] = decoder.new_stream()
        errors, psnrs = [], []
        for b in range(blocks):
            out = {}
            for name, engine in engines.items():
                if b in switches:
                    engine.set_prompt(sid, prompts[b % 2])
                latents = engine.step()[sid]
                with torch.no_grad():
                    frames = streams[name].decode(latents[None].to(next(decoder.parameters()).dtype))
                out[name] = (latents.float(), frames)
            errors.append(((out["q"][0] - out["ref"][0]).norm() / out["ref"][0].norm()).item())
            psnrs.append(psnr(out["q"][1], out["ref"][1]))
        for engine in engines.values():
            engine.step()  # the finished sessions leave
        rows.append(
            f"| {mode} | {' / '.join(f'{errors[i]:.2e}' for i in marks)} / {max(errors):.2e} |"
            f" {' / '.join(f'{psnrs[i]:.1f}' for i in marks)} / {min(psnrs):.1f} |"
        )
        print(rows[-1], flush=True)
        del quantized, engines
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--modes", nargs="+", choices=LINEAR_MODES, default=list(LINEAR_MODES))
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--blocks", type=int, default=10, help="timed blocks per run (steady from the 5th)")
    parser.add_argument("--accuracy-seconds", type=float, default=240)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="tiny: the CPU smoke test")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    cuda = size.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    model = build_model(torch.bfloat16 if cuda else torch.float32, size)
    prompts = random_prompts(model)
    body: list[str] = []
    for section in args.sections:
        if section == "dit":
            body += ["## DiT only", "", *dit_section(model, prompts, args, size), ""]
        elif section == "e2e":
            body += ["## End to end, Wan VAE", "", *e2e_section(model, prompts, args, size), ""]
        elif section == "card16":
            body += [
                '## "16 GB card": INT8 DiT + INT8 text encoder + TAE',
                "",
                *card16_section(args, size),
                "",
            ]
        else:
            body += [f"## Accuracy against bf16, {args.accuracy_seconds:g} s", ""]
            body += [*accuracy_section(model, prompts, args, size), ""]
    import torchao

    device = torch.cuda.get_device_name() if cuda else "CPU"
    meta = [
        f"- card: {device}; torch {torch.__version__}; torchao {torchao.__version__}; {args.size} size,"
        f" latent {size.latent}; {'compiled blocks' if args.compile else 'eager'}, cuDNN attention first",
        f"- command: `{command_line()}`",
        f"- bench/harness.py's definitions: block = median of blocks {STEADY_FROM + 1}..{args.blocks};"
        " recache = a switch's step minus a block; end to end = DiT + decode in series, the Wan VAE"
        " compiled per block and channels_last_3d; peak = torch.cuda.max_memory_allocated over the run",
        "- modes: RuntimeConfig.linear through torchao (fp8: rowwise dynamic activations, PerRow; int8:"
        " dynamic W8A8; int8_weight_only); the embeddings, time projection and head stay bf16",
        "- accuracy: random weights lack the outlier activations of trained ones; a switch every 10 s",
    ]
    return emit("Kernels: linear modes, speed, memory, accuracy", meta, body, args.out)


if __name__ == "__main__":
    main()
