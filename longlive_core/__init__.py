"""longlive_core: the LongLive model, KV cache, sampler, scheduler and engine."""

from .cache_plan import CacheLayout, PassPlan
from .config import MODEL_PRESETS, GenerationConfig, ModelConfig
from .engine import Engine
from .kv_cache import KVCache
from .models.key_mapping import diffusers_to_original, original_to_diffusers
from .models.transformer_causal_wan import CausalWanTransformer, ContextKV, init_random_weights
from .noise import block_noise
from .sampler import FlowMatchSampler
from .scheduler import Scheduler, SchedulerOutput
from .session import GenerationSession

__all__ = [
    "MODEL_PRESETS",
    "CacheLayout",
    "CausalWanTransformer",
    "ContextKV",
    "Engine",
    "FlowMatchSampler",
    "GenerationConfig",
    "GenerationSession",
    "KVCache",
    "ModelConfig",
    "PassPlan",
    "Scheduler",
    "SchedulerOutput",
    "block_noise",
    "diffusers_to_original",
    "init_random_weights",
    "original_to_diffusers",
]
