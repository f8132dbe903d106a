"""A single generation session: the Engine with one slot, for scripts, the CLI and tests."""

from __future__ import annotations

from torch import Tensor

from .config import GenerationConfig, RuntimeConfig
from .engine import Engine
from .models.transformer_causal_wan import CausalWanTransformer


class GenerationSession:
    """Produces latent blocks one at a time; `set_prompt` applies at the next block boundary."""

    SESSION_ID = "session"

    def __init__(
        self,
        model: CausalWanTransformer,
        config: GenerationConfig,
        latent_size: tuple[int, int],
        prompt_embeds: Tensor,
        seed: int = 0,
        runtime: RuntimeConfig | None = None,
    ):
        self.engine = Engine(model, config, latent_size, max_sessions=1, runtime=runtime)
        self.engine.add_session(self.SESSION_ID, prompt_embeds, seed=seed)
        self.blocks_done = 0

    @property
    def frames_done(self) -> int:
        """Latent frames generated so far."""
        return self.blocks_done * self.engine.config.block_frames

    def set_prompt(self, prompt_embeds: Tensor) -> None:
        self.engine.set_prompt(self.SESSION_ID, prompt_embeds)

    def next_block(self) -> Tensor:
        """The next block of clean latents: [C, block_frames, H, W] float32."""
        block = self.engine.step()[self.SESSION_ID]
        self.blocks_done += 1
        return block
