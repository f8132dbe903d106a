"""Training configuration: one dataclass for the recipe, named presets for LongLive's two stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

# Wan2.1's default negative prompt (Self-Forcing's and LongLive's teacher use it for CFG).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class TrainingConfig:
    """Self-Forcing DMD (stage 1) and streaming long tuning (stage 2) are one loop with other lengths.

    Each step rolls the student out for `step_blocks` new blocks, with autograd at one random exit step
    per block (as Self-Forcing), and scores only those frames. Stage 1 starts a fresh sequence every
    step; stage 2 continues the sequence through the live KV cache up to `sequence_frames`, with one
    prompt switch (KV-recache) per sequence at a step boundary.
    """

    # Models: a built-in name (`tiny-random`, `random-1.3b`), a local directory or a hub repo id.
    student: str = "longlive-1.3b"
    teacher: str = "wan2.1-t2v-1.3b"  # LongLive's teacher is Wan2.1-T2V-14B; any Wan2.1 T2V DiT fits
    critic: str | None = None  # the fake score model's start; None: a copy of the teacher (DMD's init)
    teacher_seed: int = 1  # random weights of a built-in teacher (tiny-random, random-1.3b)
    # Data: a prompt file (.txt one prompt a line; .jsonl {"prompts": [...]} stories give switch pairs).
    prompts: str = "../shared/examples/longlive_interactive_prompts.jsonl"
    negative_prompt: str = WAN_NEGATIVE_PROMPT  # the teacher's unconditional branch (CFG)
    size: tuple[int, int] = (832, 480)  # (width, height) of the video the latents decode to
    batch_size: int = 1  # sequences per worker
    # Recipe.
    step_blocks: int = 7  # new blocks scored per step (7 x 3 = 21 latent frames, the teacher's length)
    sequence_frames: int = 21  # latent frames of one rollout before a fresh sequence starts
    prompt_switch: bool = False  # one switch per sequence, at a random step boundary after the first
    guidance_scale: float = 3.0  # CFG on the teacher (real score)
    min_timestep: float = 20.0  # DMD / critic noise levels, before the shift
    max_timestep: float = 980.0
    timestep_shift: float = 5.0
    generator_every: int = 5  # critic updates per generator update (Self-Forcing's dfake_gen_update_ratio)
    lora_rank: int = 256  # on every Linear of the student's and the critic's blocks
    lora_alpha: float = 256.0
    lr: float = 2e-6
    critic_lr: float = 4e-7
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    gradient_checkpointing: bool = True
    seed: int = 0
    # Run.
    steps: int = 3000
    checkpoint_every: int = 100
    log_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(self.size))
        object.__setattr__(self, "betas", tuple(self.betas))
        positive = ("batch_size", "step_blocks", "sequence_frames", "generator_every", "lora_rank", "steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")
        if not 0 <= self.min_timestep < self.max_timestep <= 1000:
            raise ValueError(
                f"need 0 <= min_timestep < max_timestep <= 1000, got {self.min_timestep}, {self.max_timestep}"
            )
        if not self.negative_prompt.strip():
            raise ValueError("negative_prompt must not be empty")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.lora_alpha <= 0 or self.lr <= 0 or self.critic_lr <= 0 or self.timestep_shift <= 0:
            raise ValueError("lora_alpha, lr, critic_lr and timestep_shift must be > 0")

    @classmethod
    def from_name(cls, name: str, **changes: Any) -> TrainingConfig:
        if name not in TRAINING_PRESETS:
            raise ValueError(f"unknown training preset {name!r}; known presets: {sorted(TRAINING_PRESETS)}")
        return cls(**{**TRAINING_PRESETS[name], **changes})

    def with_(self, **changes: Any) -> TrainingConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    # Stage 1: Self-Forcing DMD, 21-frame sequences from scratch every step.
    "self-forcing-dmd": dict(step_blocks=7, sequence_frames=21, prompt_switch=False),
    # Stage 2: streaming long tuning, 21-frame windows continued to 240 frames, one switch per sequence.
    "streaming-long-tuning": dict(step_blocks=7, sequence_frames=240, prompt_switch=True),
}
