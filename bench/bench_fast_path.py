"""Fast-path variants of the engine on one GPU (full-size architecture, random weights), in one call.

1. SDPA backends on the real attention shape (4,680 queries x 18,720 keys, 12 heads x 128): TFLOP/s.
2. DiT-only block time per runtime variant (eager default SDPA = the naive baseline, cuDNN attention,
   compiled blocks + cuDNN), with the relative error of its latents against the float32 eager path;
   the script fails when a bf16 variant is beyond tolerance.
3. Decoder time per block (the Wan VAE compiled and channels_last_3d, as every end-to-end figure has it,
   and TAEW2_1) and the resulting end-to-end FPS (DiT + decode, in series). Definitions: bench/harness.py.
Writes the report to --out (markdown) with card, torch version and command.

    python bench/bench_fast_path.py --out bench/results/fast_path_h100.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (  # noqa: E402
    LATENT_SIZE,
    STEADY_FROM,
    build_decoder,
    build_model,
    decode_block_seconds,
    fps,
    random_prompts,
    run_engine,
    timed,
)
from bench.report import command_line, emit  # noqa: E402
from longlive_core.config import RuntimeConfig  # noqa: E402

BF16_TOLERANCE = 0.05  # relative error of bf16 latents vs float32 after a 4-step block
# Quantized variants: their own bound, reported beside bf16.
TOLERANCE = {"fp8": 0.1, "int8": 0.05, "int8_weight_only": 0.05}


def bench_sdpa(rows: list[str]) -> None:
    q = torch.randn(1, 12, 4680, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 12, 18720, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flop = 4 * 12 * 4680 * 18720 * 128
    for name, backend in [
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]:
        try:
            with sdpa_kernel(backend):
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v)
                times = [timed(lambda: F.scaled_dot_product_attention(q, k, v)) for _ in range(10)]
            ms = statistics.median(times) * 1e3
            rows.append(f"| {name} | {ms:.2f} | {flop / (ms / 1e3) / 1e12:.0f} |")
        except RuntimeError as exc:
            rows.append(f"| {name} | n/a ({str(exc)[:60]}) | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument(
        "--variants", nargs="+", default=["eager", "cudnn", "compile", "compile+fp8", "compile+int8"]
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sdpa_rows = ["| SDPA backend | ms | TFLOP/s |", "|---|---|---|"]
    bench_sdpa(sdpa_rows)
    print("\n".join(sdpa_rows), flush=True)

    model = build_model(torch.float32)
    prompts = random_prompts(model)
    reference = run_engine(model, RuntimeConfig(attention="auto"), prompts, blocks=2, keep=3).outputs
    model = model.to(torch.bfloat16)
    runtimes = {
        "eager": RuntimeConfig(attention="flash"),  # PyTorch's default pick on this shape
        "cudnn": RuntimeConfig(attention="cudnn"),
        "compile": RuntimeConfig(attention="cudnn", compile=True),
        "compile+fp8": RuntimeConfig(attention="cudnn", compile=True, linear="fp8"),
        "compile+int8": RuntimeConfig(attention="cudnn", compile=True, linear="int8"),
        "compile+int8_weight_only": RuntimeConfig(attention="cudnn", compile=True, linear="int8_weight_only"),
    }
    results = {}
    for name in args.variants:  # each engine quantizes / compiles its own copy: `model` stays bf16 eager
        run = run_engine(model, runtimes[name], prompts, blocks=args.blocks, keep=3)
        block, recache, first = run.block_s, run.recache_s, run.first_s
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(run.outputs, reference, strict=True))
        results[name] = (block, recache, err, first)
        del run
        print(
            f"# {name}: block {block * 1e3:.1f} ms, recache {recache * 1e3:.1f} ms, err {err:.2e}", flush=True
        )
    del model
    torch.cuda.empty_cache()

    decoders = {
        "wan vae (compiled, channels_last_3d)": decode_block_seconds(build_decoder("wan", compile=True)),
        "taew2_1": decode_block_seconds(build_decoder("tae", compile=False)),
    }
    for name, t in decoders.items():
        print(f"# decoder {name}: {t * 1e3:.1f} ms per block", flush=True)

    rows = [
        "| variant | DiT block (ms) | DiT-only FPS | recache (ms) | first block incl. warm-up (s) "
        "| rel. err vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for name, (block, recache, err, first) in results.items():
        rows.append(
            f"| {name} | {block * 1e3:.1f} | {fps(block):.1f} | {recache * 1e3:.1f} "
            f"| {first:.1f} | {err:.2e} |"
        )
    e2e = ["| DiT variant + decoder | ms per block | end-to-end FPS |", "|---|---|---|"]
    for name, (block, *_rest) in results.items():
        for dec, t in decoders.items():
            e2e.append(f"| {name} + {dec} | {(block + t) * 1e3:.1f} | {fps(block + t):.1f} |")
    meta = [
        f"- card: {torch.cuda.get_device_name()}; torch {torch.__version__}; bf16; 1 session;"
        f" latent {LATENT_SIZE}",
        f"- command: `{command_line()}`",
        f"- bench/harness.py's definitions: DiT block = median of blocks {STEADY_FROM + 1}..{args.blocks}"
        " (window full); recache = a switch's step minus a block (median of 3 after a warm-up switch);"
        " 'eager' = flash SDPA first, no compile: the naive baseline of our own code; end-to-end = DiT +"
        " decoder in series (no overlap), the Wan VAE compiled per block and channels_last_3d",
        "- rel. err = max over the first 3 blocks of |latents - fp32 eager| / |fp32 eager|"
        f" (fails above {BF16_TOLERANCE}; fp8 {TOLERANCE['fp8']}, int8 {TOLERANCE['int8']})",
    ]
    emit("Fast path on one GPU", meta, [*sdpa_rows, "", *rows, "", *e2e], args.out)
    bad = {
        n: r[2] for n, r in results.items() if not r[2] < TOLERANCE.get(runtimes[n].linear, BF16_TOLERANCE)
    }
    if bad:
        sys.exit(f"variants beyond tolerance ({BF16_TOLERANCE} bf16, {TOLERANCE} quantized): {bad}")


if __name__ == "__main__":
    main()
