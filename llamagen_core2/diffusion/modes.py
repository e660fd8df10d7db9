"""The diffusion adapter's modes, expressed through the AR mode table (`guidance.config.MODE_TABLE`).

A diffusion mode is a two-phase per-step schedule of AR modes -- `first` for steps i < end_timesteps (every step
when end_timesteps is None), `then` afterwards, as `guidance.config.Schedule` -- plus whether a zigzag (inversion
with a weak guidance + re-denoise, zigzag.py) follows each step. What a step needs (the uncond rows, the noise
model) is asked of MODE_TABLE for its AR mode; this file never spells it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import InvalidArgument
from ..guidance.config import check_mode, needs_weak, reads_uncond


@dataclass(frozen=True)
class DiffusionMode:
    first: str  # AR mode of steps i < end_timesteps
    then: str  # AR mode of steps i >= end_timesteps
    zigzag: bool  # invert + re-denoise after each step (Z-Sampling / Z-CoRe^2)

    def __post_init__(self):
        check_mode(self.first, "diffusion mode first")
        check_mode(self.then, "diffusion mode then")


DIFFUSION_MODES: dict[str, DiffusionMode] = {
    "cfg": DiffusionMode("cfg", "cfg", zigzag=False),
    "fast": DiffusionMode("fast", "fast", zigzag=False),
    "slow": DiffusionMode("slow", "fast", zigzag=False),  # CoRe^2: W2S for the first end_timesteps, fast after
    "zigzag": DiffusionMode("cfg", "cfg", zigzag=True),
    "z-core2": DiffusionMode("slow", "fast", zigzag=True),
}
MODES = tuple(DIFFUSION_MODES)


def diffusion_mode(mode) -> DiffusionMode:
    if mode not in DIFFUSION_MODES:
        raise InvalidArgument(f"mode must be one of {MODES}, got {mode!r}")
    return DIFFUSION_MODES[mode]


def scheduled_mode(first: str, then: str) -> str:
    """The diffusion mode whose steps run `first` for the first end_timesteps steps and `then` after."""
    for name, spec in DIFFUSION_MODES.items():
        if not spec.zigzag and spec.first != spec.then and (spec.first, spec.then) == (first, then):
            return name
    phases = [(s.first, s.then) for s in DIFFUSION_MODES.values() if not s.zigzag and s.first != s.then]
    raise InvalidArgument(f"no diffusion mode runs {first!r} then {then!r}; two-phase modes: {phases}")


def with_zigzag(mode: str) -> str:
    """The zigzag variant of a mode (cfg -> zigzag, slow -> z-core2)."""
    spec = diffusion_mode(mode)
    for name, other in DIFFUSION_MODES.items():
        if other.zigzag and (other.first, other.then) == (spec.first, spec.then):
            return name
    raise InvalidArgument(f"mode {mode!r} has no zigzag variant; zigzag modes: "
                          f"{[n for n, o in DIFFUSION_MODES.items() if o.zigzag]}")


def step_mode(mode: str, i: int, end_timesteps: Optional[int]) -> str:
    """The AR (mix_guidance) mode of step i."""
    spec = diffusion_mode(mode)
    return spec.first if end_timesteps is None or i < end_timesteps else spec.then


def needs_noise_model(mode: str) -> bool:
    spec = diffusion_mode(mode)
    return needs_weak((spec.first, spec.then))


def rows_for(ar_mode: str, cfg_scale: float) -> int:
    """Denoiser rows per image for one guided prediction: 2 when the mix reads the unconditional prediction
    (guidance.config.reads_uncond: a scale <= 1 means cond only), else 1."""
    return 2 if reads_uncond(ar_mode, cfg_scale) else 1
