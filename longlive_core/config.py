"""Configuration objects: one per concern, plain dataclasses, serialisable with `asdict`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

RopeMode = Literal["absolute", "relative"]
RecacheMode = Literal["unmasked", "block_causal", "off"]
AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math"]
LinearMode = Literal["bf16", "fp8", "int8", "int8_weight_only"]  # longlive_core.quantization
LINEAR_MODES: tuple[str, ...] = get_args(LinearMode)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the causal Wan2.1 DiT. Field names follow the original Wan config."""

    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024
    # Derived in __post_init__.
    head_dim: int = field(init=False)
    rope_dims: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        head_dim = self.dim // self.num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even for RoPE")
        # Wan splits each head's RoPE dims into time / height / width: t gets the remainder.
        spatial = 2 * (head_dim // 6)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "rope_dims", (head_dim - 2 * spatial, spatial, spatial))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(MODEL_PRESETS)}")
        return cls(**MODEL_PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("head_dim", "rope_dims")}

    @property
    def patch_channels(self) -> int:
        pt, ph, pw = self.patch_size
        return self.out_dim * pt * ph * pw


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-1.3b": {},
    # A few layers and a small width: CPU-fast, same structure (RoPE split, per-frame modulation).
    "tiny": dict(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=128, num_heads=4, num_layers=2),
}


@dataclass(frozen=True)
class GenerationConfig:
    """How latent frames are produced: blocks, cache window, sampler, prompt switching."""

    block_frames: int = 3  # latent frames generated together (LongLive: 3 = 12 video frames)
    sink_frames: int = 3  # first frames whose KV is kept forever (the frame sink)
    window_frames: int = 12  # latent frames a query attends to: sink + recent + its own block
    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    warp_denoising_steps: bool = True  # map the step list through the shifted schedule
    rope_mode: RopeMode = "absolute"  # 'relative' re-rotates keys inside the window: no length cap
    recache: RecacheMode = "unmasked"  # reference default; 'block_causal' masks; 'off' = no recache
    global_sink: bool = True  # keep the first prompt's sink on a switch (reference default)

    def __post_init__(self) -> None:
        object.__setattr__(self, "denoising_steps", tuple(float(s) for s in self.denoising_steps))
        for name in ("block_frames", "sink_frames", "window_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window_frames < self.block_frames:
            raise ValueError(
                f"window_frames ({self.window_frames}) is smaller than a block "
                f"(block_frames={self.block_frames})"
            )
        if self.sink_frames + self.block_frames > self.window_frames:
            raise ValueError(
                f"sink_frames ({self.sink_frames}) is larger than the window allows: "
                f"sink_frames + block_frames must be <= window_frames ({self.window_frames})"
            )
        if not self.denoising_steps:
            raise ValueError("denoising_steps must not be empty")
        steps = self.denoising_steps
        if any(not 0 < s <= self.num_train_timesteps for s in steps) or list(steps) != sorted(
            steps, reverse=True
        ):
            raise ValueError(
                f"denoising_steps must be strictly decreasing values in (0, {self.num_train_timesteps}], "
                f"got {list(steps)}"
            )
        if len(set(steps)) != len(steps):
            raise ValueError(f"denoising_steps has repeated values: {list(steps)}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.rope_mode not in ("absolute", "relative"):
            raise ValueError(f"rope_mode must be 'absolute' or 'relative', got {self.rope_mode!r}")
        if self.recache not in ("unmasked", "block_causal", "off"):
            raise ValueError(f"recache must be 'unmasked', 'block_causal' or 'off', got {self.recache!r}")

    def with_(self, **changes: Any) -> GenerationConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RuntimeConfig:
    """How the engine runs (never what it computes): kernels and compilation."""

    attention: AttentionBackend = "auto"  # auto: cuDNN, then flash, efficient, math (the best first)
    compile: bool = False  # torch.compile each transformer block (fuses norms, modulation, RoPE)
    # Block linears through torchao: fp8 (FP8 tensor cores: compute capability >= 8.9), int8 (dynamic W8A8)
    # or int8_weight_only; weights quantized once. An fp8 the device cannot run fails at start-up.
    linear: LinearMode = "bf16"
    # The quantized math emulated in float32 on any device (tests): only when asked, never as a fallback.
    linear_emulation: bool = False
    # For 24 GB cards: the text encoder waits in host memory between prompts and the VAE decodes one latent
    # frame per pass (a third of the activation memory; the frames are the same).
    low_memory: bool = False

    def __post_init__(self) -> None:
        if self.linear not in LINEAR_MODES:
            raise ValueError(f"linear must be one of {', '.join(LINEAR_MODES)}; got {self.linear!r}")
        if self.linear_emulation and self.linear == "bf16":
            raise ValueError("linear_emulation emulates a quantized linear: set linear to fp8 or int8 too")
        if self.attention not in ("auto", "cudnn", "flash", "efficient", "math"):
            raise ValueError(
                f"attention must be one of auto, cudnn, flash, efficient, math; got {self.attention!r}"
            )
