"""Streaming decode time per block (3 latent frames -> 12 video frames at 480x832) on one GPU.

Variants of the Wan VAE decoder (default layout, channels_last_3d, compiled) and TAEW2_1, each
checked against the float32 default-layout decode of the same block (relative error). Writes --out.

    python bench/bench_decoders.py --out bench/results/decoders_h100.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import LATENT_SIZE, timed  # noqa: E402
from bench.report import command_line, emit  # noqa: E402
from longlive_core.models.tae_wan import TAEConfig, TinyVideoDecoder, init_random_tae  # noqa: E402
from longlive_core.models.vae_wan import VAEConfig, WanVAEDecoder, init_random_weights  # noqa: E402


def wan(variant: str) -> torch.nn.Module:
    decoder = init_random_weights(WanVAEDecoder(VAEConfig.from_name("wan2.1")), seed=0).cuda().eval()
    if variant == "fp32":
        return decoder
    decoder = decoder.to(torch.bfloat16)
    if "channels_last" in variant:
        decoder.to_channels_last()
    if "compile" in variant:
        decoder.compile_block()
    return decoder


def run(decoder: torch.nn.Module, blocks: list[torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    """(first block s, median steady block s, video of the first 3 blocks)."""
    dtype = next(decoder.parameters()).dtype
    stream = decoder.new_stream()
    with torch.no_grad():
        outs = []
        first = timed(lambda: outs.append(stream.decode(blocks[0].to(dtype))))
        for b in blocks[1:3]:
            outs.append(stream.decode(b.to(dtype)))
        times = [timed(lambda b=b: stream.decode(b.to(dtype))) for b in blocks[3:]]
    return first, statistics.median(times), torch.cat([o.float() for o in outs], dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants", nargs="+", default=["bf16", "bf16 channels_last", "bf16 channels_last compile"]
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = [torch.randn(1, 16, 3, *LATENT_SIZE, device="cuda", generator=gen) for _ in range(8)]
    _, ref_time, reference = run(wan("fp32"), blocks)
    rows = ["| decoder | first block (ms) | steady block (ms) | rel. err vs fp32 |", "|---|---|---|---|"]
    rows.append(f"| wan vae fp32 | | {ref_time * 1e3:.1f} | 0 |")
    for variant in args.variants:
        first, steady, video = run(wan(variant), blocks)
        err = ((video - reference).norm() / reference.norm()).item()
        rows.append(f"| wan vae {variant} | {first * 1e3:.1f} | {steady * 1e3:.1f} | {err:.2e} |")
        print(rows[-1], flush=True)
    tae = init_random_tae(TinyVideoDecoder(TAEConfig.from_name("taew2_1")), seed=0).to("cuda", torch.bfloat16)
    first, steady, _ = run(tae.eval(), blocks)
    rows.append(f"| taew2_1 bf16 | {first * 1e3:.1f} | {steady * 1e3:.1f} | (other model) |")
    meta = [
        f"- card: {torch.cuda.get_device_name()}; torch {torch.__version__}; cudnn.benchmark on",
        f"- command: `{command_line()}`",
        "- steady block = median over blocks 4..8 of one stream; first block includes warm-up / compile",
    ]
    emit("Streaming decoders", meta, rows, args.out)


if __name__ == "__main__":
    main()
