"""Noise as a pure function of (seed, block index, step): batching, restore and replay agree."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def noise_seed(seed: int, block: int, step: int) -> int:
    """A 63-bit generator seed derived from (seed, block, step), stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}:{block}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def block_noise(seed: int, block: int, step: int, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise [*shape] (float32, CPU) for one block and step of one session.

    Step 0 is the block's initial noise; step i > 0 the renoise before denoising step i.
    Drawn on the CPU so every device and batch composition sees the same values.
    """
    gen = torch.Generator().manual_seed(noise_seed(seed, block, step))
    return torch.randn(shape, generator=gen, dtype=torch.float32)
