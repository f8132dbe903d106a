"""Tiny DiT checkpoints in every official layout load to the same model; the LoRA merge equals peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from longlive_core.lora import merge_lora
from longlive_core.weights import (
    MissingWeightsError,
    ModelFiles,
    find_files,
    load_transformer,
    resolve_model_files,
)
from tests.checkpoints import diffusers_transformer, write_longlive_checkpoint, write_original_dit
from tests.helpers import padded_prompt, rel_err, tiny_model

LORA_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"]
LORA_TARGETS += ["cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def _output(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 2, 4, 6, generator=g)
    with torch.no_grad():
        return model(latents, torch.tensor([[700.0, 300.0]]), model.encode_context(padded_prompt(3)))


def _files(transformer: Path, config: Path | None = None, lora: Path | None = None) -> ModelFiles:
    here = Path(".")
    return ModelFiles(transformer, config, lora, vae=here, text_encoder=here, tokenizer=here)


def _original_dir(model, root: Path) -> Path:
    return write_original_dit(model, root)


def _diffusers_dir(model, root: Path) -> Path:
    diffusers_transformer(model).save_pretrained(root / "transformer")
    return root / "transformer"


def _lora_state(model, seed: int) -> dict[str, torch.Tensor]:
    """A peft LoRA on every Linear in the blocks (as LongLive trains it), with random A and B."""
    targets = [f"blocks.{i}.{t}" for i in range(model.config.num_layers) for t in LORA_TARGETS]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=256, target_modules=targets), model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(model).items()}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def test_original_diffusers_and_longlive_layouts_load_identically(model, tmp_path):
    expected = _output(model)
    original = _original_dir(model, tmp_path / "wan")
    from_original = load_transformer(
        _files(original / "diffusion_pytorch_model.safetensors", original / "config.json")
    )
    diffusers = _diffusers_dir(model, tmp_path / "diffusers")
    from_diffusers = load_transformer(_files(diffusers, diffusers / "config.json"))
    base_pt = write_longlive_checkpoint(model, tmp_path / "longlive") / "models" / "longlive_base.pt"
    from_longlive = load_transformer(_files(base_pt, original / "config.json"))
    no_config = load_transformer(_files(base_pt))  # config inferred from shapes (head dim 128 -> wrong heads)
    for loaded in (from_original, from_diffusers, from_longlive):
        assert torch.equal(_output(loaded), expected)
    assert no_config.config.num_layers == model.config.num_layers and no_config.config.dim == model.config.dim


def test_merged_lora_equals_peft_unmerged(model, tmp_path):
    peft_model = tiny_model(seed=1)
    lora = _lora_state(peft_model, seed=5)
    assert len(lora) == 2 * len(LORA_TARGETS) * model.config.num_layers
    base_pt = write_longlive_checkpoint(model, tmp_path, lora) / "models" / "longlive_base.pt"
    config = _original_dir(model, tmp_path / "wan") / "config.json"
    merged = load_transformer(_files(base_pt, config, tmp_path / "models" / "lora.pt"), lora_alpha=256)
    expected = _output(peft_model)  # peft applies the adapters unmerged
    assert rel_err(_output(merged), expected) < 1e-5
    assert rel_err(_output(model), expected) > 1e-2  # negative control: the LoRA matters


def test_lora_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="lora_A without lora_B"):
        merge_lora(tiny_model(), {"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64)}, alpha=4)
    with pytest.raises(ValueError, match="not a Linear"):
        merge_lora(
            tiny_model(),
            {
                "blocks.0.nope.lora_A.weight": torch.zeros(4, 64),
                "blocks.0.nope.lora_B.weight": torch.zeros(64, 4),
            },
            alpha=4,
        )


def test_missing_files_say_what_and_how(tmp_path):
    with pytest.raises(MissingWeightsError, match="longlive download"):
        find_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="DiT weights"):
        find_files(tmp_path / "empty")
    with pytest.raises(MissingWeightsError, match="neither a known name"):
        resolve_model_files("not a model")


def test_named_model_not_in_cache_points_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="longlive download longlive-1.3b"):
        resolve_model_files("longlive-1.3b")
