"""Distribution matching distillation (DMD2, as Self-Forcing and LongLive use it) and the critic's loss.

The student's clean frames x0 are noised to x_t at a random level; the teacher (the real score, with
CFG) and the critic (the fake score: a model of what the student makes) each predict x0 from x_t. Their
difference is the gradient of the KL between the student's and the teacher's distributions, applied to
x0 through a surrogate loss. The critic learns the student's distribution by plain denoising
(flow matching) on the student's frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.transformer_causal_wan import CausalWanTransformer, ContextKV
from ..sampler import FlowMatchSampler, shifted_sigma


@dataclass(frozen=True)
class NoiseLevel:
    """One noise level per sequence: the model timestep [b] and sigma = t / 1000 [b, 1, 1, 1, 1]."""

    timestep: Tensor
    sigma: Tensor

    @classmethod
    def sample(
        cls, batch: int, low: float, high: float, shift: float, generator: torch.Generator, device
    ) -> NoiseLevel:
        """Uniform in [low, high) timesteps, then through the shifted schedule (as Self-Forcing)."""
        u = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
        sigma = torch.tensor([shifted_sigma(float(s) / 1000.0, shift) for s in u], dtype=torch.float32)
        return cls(timestep=(sigma * 1000.0).to(device), sigma=sigma.view(-1, 1, 1, 1, 1).to(device))

    def add_noise(self, x0: Tensor, noise: Tensor) -> Tensor:
        return FlowMatchSampler.renoise(x0, noise, self.sigma)


@dataclass(frozen=True)
class ScoreContexts:
    """The prompts' cross-attention K/V as the teacher (with and without the prompt) and the critic see
    them (each model has its own text embedding)."""

    teacher: ContextKV
    teacher_uncond: ContextKV
    critic: ContextKV


def flow_at(model: CausalWanTransformer, x_t: Tensor, level: NoiseLevel, context: ContextKV) -> Tensor:
    """The model's flow from a bidirectional pass over all frames of x_t [b, C, f, H, W] at its level."""
    frames = x_t.shape[2] // model.config.patch_size[0]
    return model(x_t, level.timestep[:, None].expand(-1, frames), context)


def predict_x0(model: CausalWanTransformer, x_t: Tensor, level: NoiseLevel, context: ContextKV) -> Tensor:
    return FlowMatchSampler.predict_x0(x_t, flow_at(model, x_t, level, context), level.sigma)


def dmd_loss(
    x0: Tensor,
    teacher: CausalWanTransformer,
    critic: CausalWanTransformer,
    contexts: ScoreContexts,
    level: NoiseLevel,
    noise: Tensor,
    guidance_scale: float,
) -> tuple[Tensor, Tensor]:
    """(surrogate loss, DMD gradient) for the student's frames x0 [b, C, f, H, W] (with its graph).

    gradient = (x0_fake - x0_real) / mean|x0 - x0_real| per sequence; the loss 0.5 * ||x0 - sg(x0 - g)||^2
    (mean over elements) has exactly gradient / numel as its gradient with respect to x0.
    """
    with torch.no_grad():
        x_t = level.add_noise(x0.detach().float(), noise)
        real = predict_x0(teacher, x_t, level, contexts.teacher)
        if guidance_scale != 1.0:
            real_uncond = predict_x0(teacher, x_t, level, contexts.teacher_uncond)
            real = real_uncond + guidance_scale * (real - real_uncond)
        fake = predict_x0(critic, x_t, level, contexts.critic)
        dims = tuple(range(1, x0.ndim))
        normalizer = (x0.detach().float() - real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
        gradient = (fake - real) / normalizer
    target = (x0.float() - gradient).detach()
    return 0.5 * F.mse_loss(x0.float(), target), gradient


def critic_loss(
    critic: CausalWanTransformer, x0: Tensor, cond: ContextKV, level: NoiseLevel, noise: Tensor
) -> Tensor:
    """Flow-matching loss of the critic on the student's (detached) frames: predict v = noise - x0."""
    x0 = x0.detach().float()
    flow = flow_at(critic, level.add_noise(x0, noise), level, cond)
    return F.mse_loss(flow.float(), noise - x0)
