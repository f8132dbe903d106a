"""The released models' names, hub repos and files: torch-free, so the command line reads them without
loading torch (longlive_core.weights finds and loads the files)."""

from __future__ import annotations

from dataclasses import dataclass


class MissingWeightsError(Exception):
    """Weights are not where they should be; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class HubModel:
    """A named model: a Wan base repo plus, optionally, LongLive's fine-tuned weights on top."""

    base_repo: str
    longlive_repo: str | None = None
    tae_repo: str | None = "madebyollin/taehv"  # the optional tiny decoder, taew2_1.pth


NAMED_MODELS: dict[str, HubModel] = {
    "longlive-1.3b": HubModel("Wan-AI/Wan2.1-T2V-1.3B", "Efficient-Large-Model/LongLive-1.3B"),
    "wan2.1-t2v-1.3b": HubModel("Wan-AI/Wan2.1-T2V-1.3B"),
}
BUILTIN_MODELS = ("tiny-random", "random-1.3b")  # random weights, no files
BASE_FILES = (
    "config.json",
    "diffusion_pytorch_model*.safetensors*",
    "Wan2.1_VAE.pth",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "google/umt5-xxl/*",
)
LONGLIVE_FILES = ("models/longlive_base.pt", "models/lora.pt")
TAE_FILES = ("taew2_1.pth",)
