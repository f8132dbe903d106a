"""Few-step flow-matching sampler (Self-Forcing / LongLive): shifted schedule, x0 prediction, renoise."""

from __future__ import annotations

from torch import Tensor

from .config import GenerationConfig


def shifted_sigma(sigma: float, shift: float) -> float:
    """The flow-matching time shift: sigma' = shift * sigma / (1 + (shift - 1) * sigma)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class FlowMatchSampler:
    """The step list of a GenerationConfig as model timesteps and noise levels.

    With warping, step s of the list maps to the shifted schedule's timestep at sigma = s / T
    (the reference's `timesteps[T - s]` over a 1000-step shifted schedule): [1000, 750, 500, 250]
    -> [1000, 937.5, 833.3, 625] at shift 5.
    """

    def __init__(self, config: GenerationConfig):
        t_max = float(config.num_train_timesteps)
        if config.warp_denoising_steps:
            self.timesteps = tuple(
                t_max * shifted_sigma(s / t_max, config.shift) for s in config.denoising_steps
            )
        else:
            self.timesteps = tuple(config.denoising_steps)
        self.sigmas = tuple(t / t_max for t in self.timesteps)

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def predict_x0(x_t: Tensor, flow: Tensor, sigma: float | Tensor) -> Tensor:
        """Flow prediction v = noise - x0, so x0 = x_t - sigma * v (in float32); sigma a number or a
        tensor that broadcasts (one level per sequence)."""
        return x_t.float() - sigma * flow.float()

    @staticmethod
    def renoise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
        """x_sigma = (1 - sigma) * x0 + sigma * noise."""
        return (1.0 - sigma) * x0 + sigma * noise
