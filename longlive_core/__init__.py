"""longlive_core: the LongLive model, KV cache, sampler, scheduler and engine.

Exports resolve lazily, so torch-free parts (`config`, `cache_plan`, `scheduler`) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheLayout": "cache_plan",
    "PassPlan": "cache_plan",
    "GenerationConfig": "config",
    "ModelConfig": "config",
    "MODEL_PRESETS": "config",
    "Engine": "engine",
    "KVCache": "kv_cache",
    "diffusers_to_original": "models.key_mapping",
    "original_to_diffusers": "models.key_mapping",
    "CausalWanTransformer": "models.transformer_causal_wan",
    "ContextKV": "models.transformer_causal_wan",
    "init_random_weights": "models.transformer_causal_wan",
    "block_noise": "noise",
    "FlowMatchSampler": "sampler",
    "Scheduler": "scheduler",
    "SchedulerOutput": "scheduler",
    "GenerationSession": "session",
    "LongLivePipeline": "pipeline",
    "PromptChange": "schedule",
    "TextEncoder": "text_encoder",
    "WanVAEDecoder": "models.vae_wan",
    "TinyVideoDecoder": "models.tae_wan",
    "MissingWeightsError": "weights",
    "resolve_model_files": "weights",
    "load_transformer": "weights",
    "merge_lora": "lora",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'longlive_core' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
