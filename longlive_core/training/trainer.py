"""DMDTrainer: LongLive's two training stages on one worker (data parallel across workers).

A step = roll out -> score -> update:
1. Roll the student out for `step_blocks` blocks through the Engine (its KV cache, sink and window, as in
   inference), each block stopping at one random exit step with autograd on (Self-Forcing). Stage 2 keeps
   the sequence and its cache from step to step and switches the prompt once per sequence (KV-recache).
2. Score only the new frames: the DMD gradient from the teacher (CFG) and the critic at a random noise
   level (generator steps, every `generator_every`-th), and the critic's denoising loss (every step).
3. Update the LoRA weights of the student and of the critic; gradients are averaged over workers.

All randomness is a function of (seed, step, worker), so resuming from a checkpoint gives exactly the
step an uninterrupted run makes. Checkpoints are directories: `models/lora.pt` (LongLive's format, what
`LongLivePipeline.load_lora_weights` reads), `models/critic_lora.pt`, `trainer_state.safetensors` and, in
the middle of a sequence, `rollout/rank{r}.safetensors` (each worker's live rollout). The LoRA files are
torch files of tensors (LongLive's format); the two state files are `state_file`'s (safetensors + JSON).
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import GenerationConfig
from ..engine import Engine, padded_prompt
from ..lora import add_lora, load_lora_state_dict, lora_state_dict
from ..models.transformer_causal_wan import CausalWanTransformer, ContextKV
from ..noise import noise_seed
from ..pipeline import VAE_STRIDE, check_size
from ..state_file import load_state, save_state
from ..text_encoder import TextEncoder
from .config import TrainingConfig
from .dmd import NoiseLevel, ScoreContexts, critic_loss, dmd_loss
from .models import critic_from, load_dit
from .prompts import PromptPairs

logger = logging.getLogger(__name__)
LORA_FILE, CRITIC_FILE = "models/lora.pt", "models/critic_lora.pt"
STATE_FILE = "trainer_state.safetensors"


def rollout_file(rank: int) -> str:
    return f"rollout/rank{rank}.safetensors"


def load_checkpoint_file(path: Path) -> dict:
    """A LoRA file holds tensors and plain data only; any other object (what a crafted pickle would run
    code through) is refused before it is built."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # only the exception type: nothing here unpickles objects
        raise ValueError(f"{path} is not a checkpoint this trainer wrote, refused unread: {e}") from e


@dataclass(frozen=True)
class Row:
    """One sequence of this worker's batch."""

    session_id: str
    prompts: tuple[str, str]  # (first prompt, the prompt it switches to)
    seed: int  # the engine's noise seed for its blocks


class DMDTrainer:
    def __init__(
        self,
        config: TrainingConfig,
        student: CausalWanTransformer,
        teacher: CausalWanTransformer,
        text_encoder: TextEncoder,
        prompts: PromptPairs,
        critic: CausalWanTransformer | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if teacher.config.text_dim != student.config.text_dim:
            raise ValueError("teacher and student must read the same text embeddings (text_dim differs)")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.text_encoder, self.prompts = text_encoder, prompts
        # 1. Models: the teacher frozen; student and critic (a copy of the teacher by default) get LoRA.
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        self.critic = critic if critic is not None else critic_from(teacher)
        for index, model in enumerate((self.student, self.critic)):
            add_lora(model, config.lora_rank, config.lora_alpha, seed=noise_seed(config.seed, -1, index))
            model.gradient_checkpointing = config.gradient_checkpointing
        # 2. The rollout engine: one cache row per sequence of the batch.
        width, height = check_size(config.size, VAE_STRIDE * student.config.patch_size[1])
        rope = "relative" if config.sequence_frames > student.config.rope_max_positions else "absolute"
        self.generation = GenerationConfig(rope_mode=rope)
        latent_size = (height // VAE_STRIDE, width // VAE_STRIDE)
        self.engine = Engine(student, self.generation, latent_size, max_sessions=config.batch_size)
        self.block_frames = self.generation.block_frames
        self.sequence_blocks = -(-config.sequence_frames // self.block_frames)
        self.steps_per_sequence = -(-self.sequence_blocks // config.step_blocks)
        # 3. Optimizers over the LoRA weights only.
        adam = dict(betas=config.betas, weight_decay=config.weight_decay)
        self.student_params = [p for p in self.student.parameters() if p.requires_grad]
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        self.generator_optimizer = torch.optim.AdamW(self.student_params, lr=config.lr, **adam)
        self.critic_optimizer = torch.optim.AdamW(self.critic_params, lr=config.critic_lr, **adam)
        self.step = 0
        self.rows: list[Row] = []

    @classmethod
    def from_config(
        cls,
        config: TrainingConfig,
        device: str | torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> DMDTrainer:
        """Load the models the config names (bf16 on CUDA, float32 on the CPU) and the prompt file."""
        from ..pipeline import LongLivePipeline

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        prompts = PromptPairs.from_file(config.prompts)
        pipe = LongLivePipeline.from_pretrained(config.student, device=device, dtype=dtype)
        teacher = load_dit(config.teacher, config.teacher_seed, device, dtype)
        critic = load_dit(config.critic, config.teacher_seed, device, dtype) if config.critic else None
        student = pipe.transformer.train()
        return cls(config, student, teacher, pipe.text_encoder, prompts, critic, rank, world_size)

    @property
    def device(self) -> torch.device:
        return self.student.device

    # -- the step ----------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One training step; returns its metrics (losses, gradient norms, where the rollout is)."""
        started = time.perf_counter()
        cfg, step = self.config, self.step
        sequence, position = divmod(step, self.steps_per_sequence)
        if position == 0:
            self._begin_sequence(sequence)
        switch_at = self.switch_step(sequence)
        switched = switch_at is not None and position >= switch_at
        if position == switch_at:
            for row in self.rows:
                self.engine.set_prompt(row.session_id, self.text_encoder.encode(row.prompts[1]))
        shared = torch.Generator().manual_seed(noise_seed(cfg.seed, step, -1))  # the same on every worker
        own = torch.Generator().manual_seed(noise_seed(cfg.seed, step, self.rank))
        exit_step = int(torch.randint(len(self.engine.sampler), (1,), generator=shared))
        generator_step = step % cfg.generator_every == 0

        # 1. Roll out this step's blocks (autograd at the exit step on generator steps).
        blocks = min(cfg.step_blocks, self.sequence_blocks - position * cfg.step_blocks)
        made = []
        for _ in range(blocks):
            out = self.engine.train_step(exit_step) if generator_step else self.engine.step()
            made.append(torch.stack([out[row.session_id] for row in self.rows]))
        x0 = torch.cat(made, dim=2)  # [b, C, frames, H, W]
        prompts = [row.prompts[1 if switched else 0] for row in self.rows]
        # The critic's view of the prompts, with its graph: its loss trains it, DMD reads it detached.
        critic_context = self.critic.encode_context(self._padded(self.critic, prompts))
        metrics = {"step": step, "sequence": sequence}
        metrics["frames"] = (position * cfg.step_blocks + blocks) * self.block_frames  # of the sequence
        metrics.update(exit_step=exit_step, switched=int(switched))

        # 2-3. Generator update from the DMD gradient.
        if generator_step:
            contexts = self._contexts(prompts, critic_context)
            level = self._noise_level(own)
            noise = torch.randn(x0.shape, generator=own).to(self.device)
            loss, gradient = dmd_loss(
                x0, self.teacher, self.critic, contexts, level, noise, cfg.guidance_scale
            )
            self.generator_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = self._sync_and_clip(self.student_params)
            self.generator_optimizer.step()
            metrics.update(generator_loss=loss.item(), dmd_gradient=gradient.abs().mean().item())
            metrics["generator_grad_norm"] = norm

        # 2-3. Critic update: denoising on the student's frames.
        level = self._noise_level(own)
        noise = torch.randn(x0.shape, generator=own).to(self.device)
        loss = critic_loss(self.critic, x0, critic_context, level, noise)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["critic_grad_norm"] = self._sync_and_clip(self.critic_params)
        self.critic_optimizer.step()
        metrics["critic_loss"] = loss.item()

        self.step += 1
        metrics["step_seconds"] = time.perf_counter() - started
        if step % cfg.log_every == 0:
            logger.info("step %d: %s", step, {k: round(v, 5) for k, v in metrics.items()})
        return metrics

    def _begin_sequence(self, sequence: int, position: int = 0) -> None:
        """Fresh sequences for the batch, prompts drawn from (seed, sequence); started at step `position` of
        the sequence (a restart without its rollout), they take the prompt in effect there."""
        for row in self.rows:
            self.engine.remove_session(row.session_id)
        self.rows = self._rows(sequence)
        switch_at = self.switch_step(sequence)
        which = int(switch_at is not None and position > switch_at)  # at switch_at, train_step switches
        for row in self.rows:
            embeds = self.text_encoder.encode(row.prompts[which])
            self.engine.add_session(row.session_id, embeds, seed=row.seed)

    def switch_step(self, sequence: int) -> int | None:
        """The step of the sequence from which its blocks get the second prompt (None: no switch)."""
        if not self.config.prompt_switch or self.steps_per_sequence < 2:
            return None
        return 1 + noise_seed(self.config.seed, sequence, -1) % (self.steps_per_sequence - 1)

    def _rows(self, sequence: int) -> list[Row]:
        rows = []
        for b in range(self.config.batch_size):
            index = self.rank * self.config.batch_size + b
            pair = self.prompts.pick(self.config.seed, sequence, index)
            rows.append(Row(f"{sequence}:{index}", pair, noise_seed(self.config.seed + 1, sequence, index)))
        return rows

    def _padded(self, model: CausalWanTransformer, prompts: list[str]) -> Tensor:
        return torch.cat([padded_prompt(model, self.text_encoder.encode(p)) for p in prompts])

    @torch.no_grad()
    def _contexts(self, prompts: list[str], critic: ContextKV) -> ScoreContexts:
        teacher = self.teacher.encode_context(self._padded(self.teacher, prompts))
        uncond = self.teacher.encode_context(
            self._padded(self.teacher, [self.config.negative_prompt] * len(prompts))
        )
        detached = ContextKV([k.detach() for k in critic.keys], [v.detach() for v in critic.values])
        return ScoreContexts(teacher, uncond, detached)

    def _noise_level(self, generator: torch.Generator) -> NoiseLevel:
        cfg = self.config
        return NoiseLevel.sample(
            cfg.batch_size, cfg.min_timestep, cfg.max_timestep, cfg.timestep_shift, generator, self.device
        )

    def _sync_and_clip(self, params: list[Tensor]) -> float:
        """Average the gradients over workers (data parallel), clip them; returns the norm before."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world_size > 1:
            flat = torch.cat([p.grad.flatten() for p in params])
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, directory: str | Path, rollout_only: bool = False) -> Path:
        """Write the checkpoint into `directory`: everything on rank 0, each worker's rollout where a
        sequence is under way (`rollout_only`: just that, for ranks other than 0)."""
        directory = Path(directory)
        (directory / "models").mkdir(parents=True, exist_ok=True)
        if self.step % self.steps_per_sequence:
            (directory / "rollout").mkdir(exist_ok=True)
            save_state(self.engine.state_dict(), directory / rollout_file(self.rank))
        if rollout_only:
            return directory
        lora = dict(lora_rank=self.config.lora_rank, lora_alpha=self.config.lora_alpha)
        torch.save({"generator_lora": lora_state_dict(self.student), **lora}, directory / LORA_FILE)
        torch.save({"critic_lora": lora_state_dict(self.critic), **lora}, directory / CRITIC_FILE)
        state = {
            "step": self.step,
            "world_size": self.world_size,
            "config": self.config.to_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
        }
        save_state(state, directory / STATE_FILE)
        return directory

    def load(self, directory: str | Path) -> None:
        """Continue from a checkpoint `save` wrote. A sequence under way continues from this worker's
        rollout; without it (more workers than before) the worker starts the sequence over."""
        directory = Path(directory)
        if not (directory / STATE_FILE).is_file():
            raise FileNotFoundError(f"no training checkpoint in {directory} ({STATE_FILE} missing)")
        load_lora_state_dict(self.student, load_checkpoint_file(directory / LORA_FILE)["generator_lora"])
        load_lora_state_dict(self.critic, load_checkpoint_file(directory / CRITIC_FILE)["critic_lora"])
        state = load_state(directory / STATE_FILE)
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.step = state["step"]
        sequence, position = divmod(self.step, self.steps_per_sequence)
        rollout = directory / rollout_file(self.rank)
        if position and rollout.is_file():
            self.engine.load_state_dict(load_state(rollout))
            self.rows = self._rows(sequence)
        elif position:
            logger.warning(
                "no rollout of rank %d in %s: sequence %d restarts", self.rank, directory, sequence
            )
            self._begin_sequence(sequence, position)
