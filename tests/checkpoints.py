"""Write tiny models to disk in the official layouts (original Wan, diffusers, LongLive) for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file

from longlive_core.models.key_mapping import original_to_diffusers
from longlive_core.models.transformer_causal_wan import CausalWanTransformer
from longlive_core.models.vae_wan import WanVAEDecoder, vae_original_to_diffusers
from longlive_core.text_encoder import transformers_to_wan


def diffusers_transformer(model: CausalWanTransformer) -> WanTransformer3DModel:
    """diffusers' WanTransformer3DModel with our model's weights."""
    c = model.config
    ref = WanTransformer3DModel(
        patch_size=c.patch_size,
        num_attention_heads=c.num_heads,
        attention_head_dim=c.head_dim,
        in_channels=c.in_dim,
        out_channels=c.out_dim,
        text_dim=c.text_dim,
        freq_dim=c.freq_dim,
        ffn_dim=c.ffn_dim,
        num_layers=c.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=c.eps,
        rope_max_seq_len=c.rope_max_positions,
    ).eval()
    ref.load_state_dict(original_to_diffusers(model.state_dict()), strict=True)
    return ref


def diffusers_vae(decoder: WanVAEDecoder) -> AutoencoderKLWan:
    """diffusers' AutoencoderKLWan with our decoder's weights (its encoder stays random)."""
    c = decoder.config
    vae = AutoencoderKLWan(
        base_dim=c.base_dim,
        z_dim=c.z_dim,
        dim_mult=list(c.dim_mult),
        num_res_blocks=c.num_res_blocks,
        attn_scales=list(c.attn_scales),
        temperal_downsample=list(reversed(c.temporal_upsample)),
        latents_mean=list(c.latents_mean),
        latents_std=list(c.latents_std),
    ).eval()
    state = vae.state_dict()
    state.update(vae_original_to_diffusers(decoder.state_dict(), c))
    vae.load_state_dict(state, strict=True)
    return vae


def write_original_dit(model: CausalWanTransformer, root: Path) -> Path:
    """The DiT as Wan-AI/Wan2.1-T2V-1.3B ships it: diffusion_pytorch_model.safetensors + config.json."""
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "diffusion_pytorch_model.safetensors")
    (root / "config.json").write_text(json.dumps({"_class_name": "WanModel", **model.config.to_dict()}))
    return root


def write_original_layout(pipe, root: Path) -> Path:
    """Wan-AI/Wan2.1-T2V-1.3B's layout: DiT safetensors + config.json, VAE .pth, umT5 .pth, tokenizer."""
    write_original_dit(pipe.transformer, root)
    torch.save(pipe.vae.state_dict(), root / "Wan2.1_VAE.pth")
    t5 = pipe.text_encoder.model
    torch.save(
        transformers_to_wan(t5.state_dict(), t5.config.num_layers), root / "models_t5_umt5-xxl-enc-bf16.pth"
    )
    pipe.text_encoder.tokenizer.save_pretrained(root / "google" / "umt5-xxl")
    return root


def write_diffusers_layout(pipe, root: Path) -> Path:
    """A …-Diffusers repo: transformer/, vae/, text_encoder/, tokenizer/."""
    diffusers_transformer(pipe.transformer).save_pretrained(root / "transformer")
    # diffusers has no text_len (its pipelines pad prompts to 512): record the tiny model's 128.
    config_path = root / "transformer" / "config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "text_len": pipe.transformer.config.text_len})
    )
    diffusers_vae(pipe.vae).save_pretrained(root / "vae")
    pipe.text_encoder.model.save_pretrained(root / "text_encoder")
    pipe.text_encoder.tokenizer.save_pretrained(root / "tokenizer")
    return root


def write_longlive_checkpoint(model: CausalWanTransformer, root: Path, lora: dict | None = None) -> Path:
    """Efficient-Large-Model/LongLive-1.3B's layout: models/longlive_base.pt (+ models/lora.pt)."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(
        {"generator": {f"model.{k}": v for k, v in model.state_dict().items()}},
        root / "models" / "longlive_base.pt",
    )
    if lora is not None:
        torch.save({"generator_lora": lora}, root / "models" / "lora.pt")
    return root
