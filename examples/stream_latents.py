"""Stream latent blocks from the built-in tiny random model, switching prompt half way.

Prints one line per block: frames done, the prompt in force and block statistics. Real text
encoding, VAE decoding and MP4 output come with `longlive generate`.
"""

from __future__ import annotations

import argparse
import time

import torch

from longlive_core import (
    CausalWanTransformer,
    GenerationConfig,
    GenerationSession,
    ModelConfig,
    init_random_weights,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=8, help="latent blocks to generate")
    parser.add_argument("--switch-at", type=int, default=4, help="block before which the prompt changes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = init_random_weights(CausalWanTransformer(ModelConfig.from_name("tiny"))).eval()
    text_dim = model.config.text_dim
    prompts = [torch.randn(8, text_dim, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    session = GenerationSession(model, GenerationConfig(), (8, 14), prompts[0], seed=args.seed)
    start = time.perf_counter()
    for block in range(args.blocks):
        if block == args.switch_at:
            session.set_prompt(prompts[1])
        latents = session.next_block()
        print(
            f"block {block:3d}  latent frames {session.frames_done:4d}  prompt {int(block >= args.switch_at)}"
            f"  mean {latents.mean():+.4f}  std {latents.std():.4f}"
        )
    elapsed = time.perf_counter() - start
    print(f"{args.blocks} blocks in {elapsed:.2f} s ({args.blocks / elapsed:.1f} blocks/s)")


if __name__ == "__main__":
    main()
