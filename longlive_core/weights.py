"""Find and load weights: model names, local directories and hub repos, in every official layout.

Layouts of a local directory (or a downloaded hub snapshot):
- original Wan (Wan-AI/Wan2.1-T2V-1.3B): `diffusion_pytorch_model.safetensors` (+ `config.json`),
  `Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`, tokenizer in `google/umt5-xxl/`;
- diffusers (…-Diffusers repos): `transformer/`, `vae/`, `text_encoder/`, `tokenizer/`;
- LongLive (Efficient-Large-Model/LongLive-1.3B): `models/longlive_base.pt` ({"generator": {"model.<key>"}})
  and `models/lora.pt` ({"generator_lora": peft keys}), on top of a Wan base.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig
from .hub import BASE_FILES, BUILTIN_MODELS, LONGLIVE_FILES, NAMED_MODELS, TAE_FILES, MissingWeightsError
from .lora import merge_lora
from .models.key_mapping import diffusers_to_original
from .models.transformer_causal_wan import CausalWanTransformer

LORA_ALPHA = 256.0  # LongLive's released adapter: rank 256, alpha 256


@dataclass(frozen=True)
class ModelFiles:
    """Where each part of a model lives on disk."""

    transformer: Path  # original safetensors file, diffusers `transformer/` dir, or longlive_base.pt
    transformer_config: Path | None  # config.json of the base (original or diffusers)
    lora: Path | None  # LongLive lora.pt
    vae: Path  # Wan2.1_VAE.pth or diffusers `vae/` dir
    text_encoder: Path  # models_t5_umt5-xxl-enc-bf16.pth or diffusers `text_encoder/` dir
    tokenizer: Path
    tae: Path | None = None  # taew2_1.pth, the optional tiny decoder


def _missing(what: str, where: Path | str, model: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"{what} not found in {where}. Get the weights with `longlive download {model}` "
        "(or pass --model with a local directory that holds them)."
    )


def _first_existing(root: Path, candidates: list[str]) -> Path | None:
    for name in candidates:
        path = root / name
        if path.exists():
            return path
    return None


def find_files(
    base: Path, longlive: Path | None = None, model: str = "MODEL", tae_dir: Path | None = None
) -> ModelFiles:
    """Locate every part in a base directory (original or diffusers layout), a LongLive directory and
    a directory with the tiny decoder (each defaults to the base directory)."""
    longlive = longlive or base
    tae_dir = tae_dir or base
    if not base.is_dir():
        raise _missing("model directory", base, model)
    if (base / "transformer").is_dir():  # diffusers layout
        transformer, config = base / "transformer", base / "transformer" / "config.json"
        vae, text_encoder, tokenizer = base / "vae", base / "text_encoder", base / "tokenizer"
    else:
        shards = sorted(base.glob("diffusion_pytorch_model*.safetensors"))
        index = base / "diffusion_pytorch_model.safetensors.index.json"
        transformer = index if index.exists() else (shards[0] if len(shards) == 1 else base / "missing")
        config = base / "config.json" if (base / "config.json").exists() else None
        vae = base / "Wan2.1_VAE.pth"
        text_encoder = base / "models_t5_umt5-xxl-enc-bf16.pth"
        tokenizer = base / "google" / "umt5-xxl"
    base_pt = _first_existing(longlive, ["models/longlive_base.pt", "longlive_base.pt"])
    lora = _first_existing(longlive, ["models/lora.pt", "lora.pt"])
    if base_pt is not None:
        transformer = base_pt
    for what, path in [
        ("the DiT weights (diffusion_pytorch_model.safetensors or transformer/)", transformer),
        ("the VAE (Wan2.1_VAE.pth or vae/)", vae),
        ("the text encoder (models_t5_umt5-xxl-enc-bf16.pth or text_encoder/)", text_encoder),
        ("the tokenizer (google/umt5-xxl/ or tokenizer/)", tokenizer),
    ]:
        if not path.exists():
            raise _missing(what, path.parent, model)
    tae = _first_existing(tae_dir, ["taew2_1.pth"])
    return ModelFiles(transformer, config, lora, vae, text_encoder, tokenizer, tae)


def _snapshot(repo: str, patterns: tuple[str, ...], model: str, required: bool = True) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=list(patterns), local_files_only=True))
    except LocalEntryNotFoundError:
        if not required:
            return None
        raise _missing(f"hub repo {repo}", "the local Hugging Face cache", model) from None


def resolve_model_files(name_or_path: str) -> ModelFiles:
    """A model name (`longlive-1.3b`), a local directory, or a hub repo id -> its files on disk.

    Never downloads: a missing model raises MissingWeightsError that says how to fetch it.
    """
    if name_or_path in BUILTIN_MODELS:
        raise ValueError(f"{name_or_path!r} is built in and has no files")
    if name_or_path in NAMED_MODELS:
        spec = NAMED_MODELS[name_or_path]
        base = _snapshot(spec.base_repo, BASE_FILES, name_or_path)
        longlive = _snapshot(spec.longlive_repo, LONGLIVE_FILES, name_or_path) if spec.longlive_repo else None
        tae = _snapshot(spec.tae_repo, TAE_FILES, name_or_path, required=False) if spec.tae_repo else None
        return find_files(base, longlive, name_or_path, tae)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return find_files(path, model=name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        return find_files(_snapshot(name_or_path, ("*",), name_or_path), model=name_or_path)
    known = ", ".join([*BUILTIN_MODELS, *NAMED_MODELS])
    raise MissingWeightsError(
        f"model {name_or_path!r} is neither a known name ({known}), a local directory, nor a hub repo id; "
        "fetch a known model with `longlive download NAME`"
    )


# -- the DiT ----------------------------------------------------------------------------------------

_DIFFUSERS_CONFIG = {  # diffusers config name -> ours
    "attention_head_dim": None,  # combined with num_attention_heads below
    "num_attention_heads": "num_heads",
    "ffn_dim": "ffn_dim",
    "freq_dim": "freq_dim",
    "text_dim": "text_dim",
    "num_layers": "num_layers",
    "in_channels": "in_dim",
    "out_channels": "out_dim",
    "eps": "eps",
    "patch_size": "patch_size",
    "rope_max_seq_len": "rope_max_positions",
    "text_len": "text_len",  # not a diffusers field (its pipelines pad to 512); honoured when present
}


def transformer_config(config_path: Path | None, state_dict: dict[str, Tensor]) -> ModelConfig:
    """Model config from a config.json (original Wan or diffusers) or, failing that, tensor shapes."""
    fields = set(ModelConfig().to_dict())
    if config_path is not None and config_path.exists():
        raw = json.loads(config_path.read_text())
        if "num_attention_heads" in raw:  # diffusers
            kwargs = {ours: raw[k] for k, ours in _DIFFUSERS_CONFIG.items() if ours and k in raw}
            kwargs["dim"] = raw["num_attention_heads"] * raw["attention_head_dim"]
        else:
            kwargs = {k: v for k, v in raw.items() if k in fields}
        return ModelConfig(**kwargs)
    # No config: the shapes give everything but the head count (Wan uses 128-dim heads).
    dim, in_dim = state_dict["patch_embedding.weight"].shape[:2]
    layers = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    return ModelConfig(
        dim=dim,
        in_dim=in_dim,
        num_layers=layers,
        num_heads=max(1, dim // 128),
        ffn_dim=state_dict["blocks.0.ffn.0.weight"].shape[0],
        text_dim=state_dict["text_embedding.0.weight"].shape[1],
        freq_dim=state_dict["time_embedding.0.weight"].shape[1],
        out_dim=state_dict["head.head.weight"].shape[0] // 4,
    )


def _load_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.name.endswith(".index.json"):
        from safetensors.torch import load_file

        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_file(str(path.parent / shard)))
        return out
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def transformer_state_dict(path: Path) -> dict[str, Tensor]:
    """DiT weights in the original Wan key layout, from any of the supported files."""
    if path.is_dir():  # diffusers transformer/ folder
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        index = path / "diffusion_pytorch_model.safetensors.index.json"
        if not files:
            raise MissingWeightsError(f"no diffusion_pytorch_model*.safetensors in {path}")
        sd = _load_file(index) if index.exists() else _load_file(files[0])
        return diffusers_to_original(sd)
    raw = _load_file(path)
    if "generator" in raw or "generator_ema" in raw:  # LongLive checkpoint
        raw = raw["generator"] if "generator" in raw else raw["generator_ema"]
        raw = {k.removeprefix("model."): v for k, v in raw.items()}
    if any(k.startswith("condition_embedder.") for k in raw):
        raw = diffusers_to_original(raw)
    return raw


def load_transformer(
    files: ModelFiles,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    lora_alpha: float = LORA_ALPHA,
) -> CausalWanTransformer:
    """Build the DiT on the meta device, load its weights (mmap, assign) and merge the LoRA if any."""
    state_dict = transformer_state_dict(files.transformer)
    config = transformer_config(files.transformer_config, state_dict)
    with torch.device("meta"):
        model = CausalWanTransformer(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"DiT weights in {files.transformer} do not fit the {config.num_layers}-layer model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model = model.to(device=device, dtype=torch.float32)
    if files.lora is not None:
        merge_lora_file(model, files.lora, lora_alpha)
    return model.to(dtype).eval()


def merge_lora_file(model: CausalWanTransformer, path: Path, alpha: float = LORA_ALPHA) -> int:
    """Merge a `lora.pt` (LongLive's {"generator_lora": peft keys}; ours also records its alpha) into the
    model; returns the layers merged."""
    if not Path(path).is_file():
        raise MissingWeightsError(f"no LoRA file at {path}")
    lora = torch.load(str(path), map_location="cpu", weights_only=True)
    return merge_lora(model, lora.get("generator_lora", lora), alpha=float(lora.get("lora_alpha", alpha)))
