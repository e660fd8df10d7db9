"""Explicit scheduler steps and inversions for Z-Sampling / Z-CoRe^2 (zigzag) on diffusers schedulers.

A zigzag step at index j (Z-Sampling, Bai et al.): the pipeline has just produced x_{j+1} from x_j
with strong guidance; we invert x_{j+1} back to the noise level of x_j with a *weaker* guidance
(`inv_cfg`), then denoise again with the strong guidance:

    x_j'     = invert(x_{j+1}, pred(x_{j+1}, t_{j+1}; inv_cfg), j)
    x_{j+1}' = step(x_j', pred(x_j', t_j; strong), j)

Schedulers' own `step()` keep an internal step counter, so the extra step and the inversion are
computed here from the scheduler's tables; `step()` here equals `scheduler.step()` (tested).
Supported: FlowMatchEulerDiscreteScheduler (SD3, FLUX; deterministic) and DDIMScheduler
(SDXL; epsilon prediction, eta 0, no clipping/thresholding) — the schedulers the official
CoRe^2 zigzag code uses. Anything else raises InvalidArgument.
"""
from __future__ import annotations

import torch

from ..errors import InvalidArgument


class FlowMatchStepper:
    """Euler on the flow-matching ODE: x_{j+1} = x_j + (sigma_{j+1} - sigma_j) v(x_j, sigma_j)."""

    def __init__(self, scheduler):
        if getattr(scheduler.config, "stochastic_sampling", False):
            raise InvalidArgument("zigzag modes need a deterministic scheduler; stochastic_sampling is on")
        self.scheduler = scheduler

    def __len__(self) -> int:
        return len(self.scheduler.timesteps)

    def time_at(self, j: int) -> torch.Tensor:
        return self.scheduler.timesteps[j]

    def step(self, x: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
        sig = self.scheduler.sigmas
        return (x.float() + (sig[j + 1] - sig[j]) * v).to(v.dtype)

    def invert(self, x_next: torch.Tensor, v: torch.Tensor, j: int) -> torch.Tensor:
        """x at sigma_{j+1} -> sigma_j using the velocity evaluated at (x_next, sigma_{j+1})."""
        sig = self.scheduler.sigmas
        return (x_next.float() + (sig[j] - sig[j + 1]) * v).to(v.dtype)


class DDIMStepper:
    """Deterministic DDIM (eta 0) with epsilon prediction, and its inversion."""

    def __init__(self, scheduler):
        cfg = scheduler.config
        if cfg.prediction_type != "epsilon" or cfg.clip_sample or cfg.thresholding:
            raise InvalidArgument(
                "zigzag with DDIMScheduler needs prediction_type='epsilon', clip_sample=False, thresholding=False; "
                f"got {cfg.prediction_type!r}, clip_sample={cfg.clip_sample}, thresholding={cfg.thresholding}")
        self.scheduler = scheduler

    def __len__(self) -> int:
        return len(self.scheduler.timesteps)

    def _prev_time(self, j: int) -> int:
        s = self.scheduler
        return int(s.timesteps[j]) - s.config.num_train_timesteps // s.num_inference_steps

    def _alpha(self, t: int) -> torch.Tensor:
        s = self.scheduler
        return s.alphas_cumprod[t] if t >= 0 else s.final_alpha_cumprod

    def time_at(self, j: int) -> torch.Tensor:
        """Denoiser time for the latent at index j (j = len is the fully denoised end)."""
        if j < len(self):
            return self.scheduler.timesteps[j]
        return torch.tensor(self._prev_time(j - 1))

    def step(self, x: torch.Tensor, eps: torch.Tensor, j: int) -> torch.Tensor:
        a_t, a_prev = self._alpha(int(self.scheduler.timesteps[j])), self._alpha(self._prev_time(j))
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def invert(self, x_next: torch.Tensor, eps: torch.Tensor, j: int) -> torch.Tensor:
        """x at the time after index j -> time of index j, with eps evaluated at (x_next, that time)."""
        a_t, a_prev = self._alpha(int(self.scheduler.timesteps[j])), self._alpha(self._prev_time(j))
        x0 = (x_next - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
        return a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps


def stepper_for(scheduler):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchStepper(scheduler)
    if isinstance(scheduler, DDIMScheduler):
        return DDIMStepper(scheduler)
    raise InvalidArgument(
        f"zigzag modes support FlowMatchEulerDiscreteScheduler (SD3, FLUX) and DDIMScheduler (SDXL), got "
        f"{type(scheduler).__name__}; e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
