"""`longlive download`: fetch a named model's files into the Hugging Face cache and verify them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .hub import BASE_FILES, LONGLIVE_FILES, NAMED_MODELS, TAE_FILES, MissingWeightsError
from .weights import ModelFiles, resolve_model_files

logger = logging.getLogger(__name__)


def _fetch(repo: str, patterns: tuple[str, ...]) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo, allow_patterns=list(patterns))  # shows per-file progress bars
    except Exception as exc:  # network, auth and offline errors all end up here
        raise MissingWeightsError(
            f"could not download {repo} ({type(exc).__name__}: {exc}). Check the network "
            "(HF_HUB_OFFLINE must be unset) and, for gated repos, `huggingface-cli login`."
        ) from None


def verify_file(path: Path) -> None:
    """Open every weight file far enough to know it is complete (headers / zip directory)."""
    if path.is_dir():
        for child in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.pth")):
            verify_file(child)
        return
    if path.stat().st_size == 0:
        raise MissingWeightsError(f"{path} is empty; run `longlive download` again")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                f.keys()
        elif path.suffix in (".pth", ".pt"):
            torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise MissingWeightsError(
            f"{path} is damaged ({exc}); delete it and run `longlive download` again"
        ) from None


def download_model(name: str) -> ModelFiles:
    """Download every file of a named model (skipping what the cache already has) and verify it."""
    if name not in NAMED_MODELS:
        raise ValueError(f"model must be one of {sorted(NAMED_MODELS)}, got {name!r}")
    spec = NAMED_MODELS[name]
    _fetch(spec.base_repo, BASE_FILES)
    if spec.longlive_repo:
        _fetch(spec.longlive_repo, LONGLIVE_FILES)
    if spec.tae_repo:
        try:
            _fetch(spec.tae_repo, TAE_FILES)
        except MissingWeightsError as exc:  # optional: only `--decoder tae` needs it
            logger.warning("the optional tiny decoder was not downloaded: %s", exc)
    files = resolve_model_files(name)
    for path in (files.transformer, files.lora, files.vae, files.text_encoder, files.tae):
        if path is not None:
            verify_file(path)
    return files
