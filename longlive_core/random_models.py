"""Built-in models with random weights: `tiny-random` (CPU tests, the embedded default) and
`random-1.3b` (the full-size architecture, for benchmarks of the service where no weights exist).

Speed does not depend on weight values, so `random-1.3b` measures what LongLive-1.3B costs: the 1.3B
DiT, the 5.7B umT5-XXL encoder (with a byte tokenizer: no files) and the Wan VAE decoder or TAEW2_1.
Its weights are drawn on the target device (seconds on a GPU; the CPU would take minutes).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .models.transformer_causal_wan import CausalWanTransformer, init_random_weights
from .text_encoder import TextEncoder, TextEncoderConfig, tiny_tokenizer

RANDOM_MODELS = ("tiny-random", "random-1.3b")


def random_dit(name: str, device: torch.device | str, seed: int = 0) -> CausalWanTransformer:
    """The DiT of a built-in model (float32): `tiny-random` drawn on the CPU, `random-1.3b` on `device`."""
    if name == "tiny-random":
        return init_random_weights(CausalWanTransformer(ModelConfig.from_name("tiny")), seed=seed)
    if name == "random-1.3b":
        return random_transformer("wan2.1-t2v-1.3b", device, seed=seed)
    raise ValueError(f"{name!r} is not a built-in random model; known: {list(RANDOM_MODELS)}")


def tiny_random(decoder: str) -> tuple[CausalWanTransformer, TextEncoder, nn.Module]:
    transformer = random_dit("tiny-random", "cpu")
    tiny = transformer.config
    text_encoder = TextEncoder.tiny_random(d_model=tiny.text_dim, seed=0, text_len=tiny.text_len)
    return transformer, text_encoder, _random_decoder(decoder, "tiny")


def random_full_size(
    decoder: str, device: torch.device, dtype: torch.dtype
) -> tuple[CausalWanTransformer, TextEncoder, nn.Module]:
    transformer = random_dit("random-1.3b", device)
    return transformer, random_umt5_xxl(device, dtype), _random_decoder(decoder, "full")


def random_transformer(preset: str, device: torch.device | str, seed: int = 0) -> CausalWanTransformer:
    """The DiT of `preset` with the values init_random_weights draws (matrices ~ U(+-1/sqrt(fan_in)),
    non-zero modulations and biases), drawn on `device` (float32)."""
    with torch.device(device):
        model = CausalWanTransformer(ModelConfig.from_name(preset))
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "modulation" not in name:
                p.uniform_(-1, 1, generator=gen).mul_(p[0].numel() ** -0.5)
            elif "modulation" in name or not name.endswith("weight"):
                p.normal_(0, 0.1, generator=gen)
            else:
                p.fill_(1.0)
    return model


def random_umt5_xxl(
    device: torch.device | str,
    dtype: torch.dtype,
    cache_size: int = 64,
    seed: int = 0,
    preset: str = "umt5-xxl",
) -> TextEncoder:
    """umT5-XXL (5.7B) with random weights drawn on `device` from `seed` (so every build of it encodes
    alike: a resumed training run must see the prompts as the saved one did), and a byte tokenizer."""
    from transformers import UMT5EncoderModel

    device = torch.device(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.manual_seed(seed)  # transformers' init draws from the global generators
        model = UMT5EncoderModel(TextEncoderConfig.from_name(preset).to_umt5()).to(dtype)
    text_len = ModelConfig.from_name("wan2.1-t2v-1.3b").text_len
    return TextEncoder(model, tiny_tokenizer(text_len), text_len=text_len, cache_size=cache_size)


def _random_decoder(decoder: str, size: str) -> nn.Module:
    preset = "tiny" if size == "tiny" else {"tae": "taew2_1", "wan": "wan2.1"}[decoder]
    if decoder == "tae":
        from .models.tae_wan import TAEConfig, TinyVideoDecoder, init_random_tae

        return init_random_tae(TinyVideoDecoder(TAEConfig.from_name(preset)), 0)
    from .models.vae_wan import VAEConfig, WanVAEDecoder
    from .models.vae_wan import init_random_weights as init_vae

    return init_vae(WanVAEDecoder(VAEConfig.from_name(preset)), seed=0)
