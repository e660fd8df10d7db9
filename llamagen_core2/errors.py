"""Exception types and argument checks shared by the whole package.

Every user-facing check raises with a message that names the argument and the allowed range,
so a bad input never surfaces as a stack trace from deep inside torch (DESIGN §7).
"""
from __future__ import annotations

import math


class InvalidArgument(ValueError):
    """A user-supplied argument is outside its allowed range."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or does not match the model it is loaded into."""


def check_finite_scale(name: str, value, *, minimum: float = 0.0) -> None:
    """Scalar or per-row tensor scale: finite and >= minimum."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise InvalidArgument(f"{name} must be finite, got a tensor containing NaN/inf")
        if bool((value < minimum).any()):
            raise InvalidArgument(f"{name} must be >= {minimum}, got a tensor with min {value.min().item()}")
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be a number, got {value!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise InvalidArgument(f"{name} must be a finite number >= {minimum}, got {value}")
    if v < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {value}")


def check_sampling_args(temperature, top_k, top_p) -> None:
    """LlamaGen sampling knobs: temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), top_p in (0, 1]."""
    import torch

    def values(x):
        return x.flatten().tolist() if isinstance(x, torch.Tensor) else [x]

    for t in values(temperature):
        if t is None or not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {t}")
    for k in values(top_k):
        if k is None or isinstance(k, bool) or not float(k).is_integer() or k < 0:
            raise InvalidArgument(f"top_k must be an integer >= 0 (0 = full vocabulary), got {k}")
    for p in values(top_p):
        if p is None or not isinstance(p, (int, float)) or math.isnan(p) or not (0.0 < p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1] (1 = off), got {p}")
