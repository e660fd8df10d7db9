"""Guidance mixing: the one implementation of CFG / CoRe^2 weak-to-strong mixing of predictions.

The AR sampler (`sampling.guided_sample`, on logits [B, V]) and the diffusion adapter (on noise predictions
[B, C, H, W]) both call `mix_guidance`; the fused Triton kernel `llamagen_core2.kernels.fused_guided_sample`
implements the same formulas and is tested against it (docs/design.md#sampler).

Modes (per row; c, u = base cond / uncond outputs, w = weak-model prediction):
    cond : c
    cfg  : u + s (c - u)            (s <= 1 means cond-only)
    fast : w                        (CoRe^2 fast: 1 base forward per token)
    slow : w + a (cfg - w)          (CoRe^2 slow: W2S scale a on top of CFG)
Scales are Python numbers or per-row tensors of shape [B].
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidArgument, check_finite_scale
from .config import MODE_TABLE, Scale, cfg_is_cond, cfg_mixes, check_mode, effective_mode, reads_uncond


def _check_row_scale(name: str, scale: Scale, like: torch.Tensor) -> None:
    check_finite_scale(name, scale)
    if isinstance(scale, torch.Tensor) and scale.dim() != 0 and (scale.dim() != 1 or scale.shape[0] != like.shape[0]):
        raise InvalidArgument(
            f"{name} must be a number or a tensor of shape [{like.shape[0]}] (one per row), "
            f"got shape {list(scale.shape)}")


def _row_scale(scale: Scale, like: torch.Tensor) -> Scale:
    """A scalar (or 0-dim tensor) becomes a Python float; a per-row tensor [B] becomes [B, 1, ...] to broadcast."""
    if not isinstance(scale, torch.Tensor) or scale.dim() == 0:
        return float(scale)
    return scale.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _check_same_shape(name: str, t: Optional[torch.Tensor], cond: torch.Tensor) -> None:
    if t is not None and t.shape != cond.shape:
        raise InvalidArgument(f"{name} must have the shape of cond {list(cond.shape)}, got {list(t.shape)}")


def mix_guidance(
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor] = None,
    weak: Optional[torch.Tensor] = None,
    *,
    cfg_scale: Scale = 1.0,
    w2s_scale: Scale = 1.0,
    mode: str = "cfg",
) -> torch.Tensor:
    """Mix guidance outputs; all inputs [B, ...] of one shape (logits [B, V] or predictions [B, C, H, W]).

    Computes in the inputs' dtype with the reference association `u + s * (c - u)` so results
    match LlamaGen and diffusers bit for bit in fp32. Checks its arguments, then `mix`.
    """
    if cond.dim() < 1 or cond.shape[0] == 0:
        raise InvalidArgument(f"cond must be a non-empty batch [B, ...], got shape {list(cond.shape)}")
    check_mix_args(cond, uncond, weak, cfg_scale=cfg_scale, w2s_scale=w2s_scale, mode=mode)
    return mix(cond, uncond, weak, cfg_scale=cfg_scale, w2s_scale=w2s_scale, mode=mode)


def check_mix_args(cond: torch.Tensor, uncond, weak, *, cfg_scale: Scale, w2s_scale: Scale, mode: str) -> None:
    """The arguments of a mix, checked (cond [B, ...] given): the mode, the inputs' shapes, finite scales (numbers
    or [B] tensors), and the predictions the mode reads at this scale."""
    check_mode(mode)
    _check_same_shape("uncond", uncond, cond)
    _check_same_shape("weak", weak, cond)
    _check_row_scale("cfg_scale", cfg_scale, cond)
    _check_row_scale("w2s_scale", w2s_scale, cond)
    if MODE_TABLE[mode].weak and weak is None:
        raise InvalidArgument(f"mode {mode!r} needs the weak-model prediction `weak`")
    if uncond is None and reads_uncond(mode, _row_scale(cfg_scale, cond)):
        raise InvalidArgument(f"mode {mode!r} with cfg_scale > 1 needs the unconditional output `uncond`")


def mix(cond: torch.Tensor, uncond: Optional[torch.Tensor], weak: Optional[torch.Tensor], *, cfg_scale: Scale,
        w2s_scale: Scale, mode: str) -> torch.Tensor:
    """`mix_guidance` without its checks, for callers that validated their arguments at their entry (the AR
    sampler, per token)."""
    s = _row_scale(cfg_scale, cond)
    mode = effective_mode(mode, s)
    if mode == "cond":
        return cond
    if mode == "fast":
        return weak
    # cfg and slow both need the CFG output.
    if cfg_is_cond(s):
        cfg = cond
    else:
        cfg = uncond + s * (cond - uncond)
        if isinstance(s, torch.Tensor):
            cfg = torch.where(cfg_mixes(s), cfg, cond)
    if mode == "cfg":
        return cfg
    a = _row_scale(w2s_scale, cond)
    return weak + a * (cfg - weak)
