"""Exception types and argument checks shared by the whole package.

Every user-facing check raises with a message that names the argument and the allowed range,
so a bad input never surfaces as a stack trace from deep inside torch (docs/design.md#reliability).
`user_error_message` is the one mapping from the exception families a user can fix to the one-line
message the command line prints; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import json
import math
import numbers
from typing import Mapping, Optional


class InvalidArgument(ValueError):
    """A user-supplied argument is outside its allowed range."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, unsafe, or does not match the model it is loaded into."""


class MissingDependency(ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message names the extra that installs it."""


class NonFiniteError(FloatingPointError):
    """NaN/inf found in inputs, a loss or weights; raised before anything non-finite is written or sampled."""


# ---------------------------------------------------------------------- scalar checks
def check_int(name: str, value, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An integer (bool and floats such as 3.0 or 3.5 refused: no silent truncation) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgument(f"{name} must be an integer{_range_text(minimum, maximum)}, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InvalidArgument(f"{name} must be an integer{_range_text(minimum, maximum)}, got {value}")
    return value


def check_number(name: str, value, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                 above: Optional[float] = None, below: Optional[float] = None) -> float:
    """A finite real number within the given bounds (minimum/maximum inclusive, above/below exclusive)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidArgument(f"{name} must be a finite number{_bounds_text(minimum, maximum, above, below)}, "
                              f"got {value!r}")
    v = float(value)
    if ((minimum is not None and v < minimum) or (maximum is not None and v > maximum)
            or (above is not None and v <= above) or (below is not None and v >= below)):
        raise InvalidArgument(f"{name} must be a finite number{_bounds_text(minimum, maximum, above, below)}, "
                              f"got {value!r}")
    return v


def _range_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"


def _bounds_text(minimum, maximum, above, below) -> str:
    low = f"[{minimum}" if minimum is not None else (f"({above}" if above is not None else None)
    high = f"{maximum}]" if maximum is not None else (f"{below})" if below is not None else None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'>=' if minimum is not None else '>'} {low[1:]}"
    if high:
        return f" {'<=' if maximum is not None else '<'} {high[:-1]}"
    return ""


def rank_and_world(rank=None, world_size=None) -> tuple[int, int]:
    """(rank, world size): the arguments, else torchrun's RANK / WORLD_SIZE (default 0 / 1), checked:
    integers with 0 <= rank < world size."""
    import os

    def from_env(name: str, default: int) -> int:
        value = os.environ.get(name, "")
        if value == "":
            return default
        if not value.strip().isdigit():
            raise InvalidArgument(f"environment variable {name} must be a non-negative integer, got {value!r}")
        return int(value)

    rank = from_env("RANK", 0) if rank is None else check_int("rank", rank, minimum=0)
    world_size = from_env("WORLD_SIZE", 1) if world_size is None else check_int("world_size", world_size, minimum=1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidArgument(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank}, "
                              f"world_size {world_size}")
    return rank, world_size


# ---------------------------------------------------------------------- tensor checks
def check_has_values(name: str, tensor) -> None:
    """Refuse a meta tensor (a shape and dtype without values): nothing can be read or computed from it."""
    if getattr(tensor, "is_meta", False):
        raise InvalidArgument(f"{name} is a meta tensor (a shape without values); give it on the CPU or on the "
                              f"model's device")


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    """An integer tensor whose values all lie in [0, vocab_size): checked on the host before any embedding
    lookup, because an out-of-range id on CUDA is a device-side assert that kills the process's CUDA context."""
    import torch

    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InvalidArgument(f"{name} must be an integer tensor of ids in [0, {vocab_size - 1}], got "
                              f"{type(ids).__name__}{' ' + str(ids.dtype) if isinstance(ids, torch.Tensor) else ''}")
    check_has_values(name, ids)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise InvalidArgument(f"{name} must lie in [0, {vocab_size - 1}] (vocabulary {vocab_size}), "
                                  f"got values in [{lo}, {hi}]")


def check_all_finite(what: str, tensors: Mapping) -> None:
    """Raise NonFiniteError naming the first floating tensor of `tensors` ({name: tensor}) holding NaN/inf."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) \
                and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{what}: {name} holds {bad} NaN/inf value(s) of {t.numel()}")


def describe_differences(old: Mapping, new: Mapping, limit: int = 6) -> str:
    """'key: old -> new; ...' for the keys whose values differ (for 'rerun with other settings' refusals)."""
    def short(v) -> str:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."

    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = [f"{k}: {short(old.get(k))} -> {short(new.get(k))}" for k in keys[:limit]]
    return "; ".join(parts) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


# ---------------------------------------------------------------------- the command line's error families
def user_error_message(exc: BaseException) -> Optional[str]:
    """One line for the errors a user can fix (bad arguments, bad or unreadable files, NaN refusals, a missing
    optional package, out of memory); None for anything else, which is a bug and should keep its traceback."""
    if isinstance(exc, (InvalidArgument, CheckpointError, FloatingPointError, MissingDependency)):
        return _one_line(str(exc))
    if isinstance(exc, json.JSONDecodeError):  # sources name the file; this is the fallback
        return _one_line(f"invalid JSON ({exc})")
    if isinstance(exc, OSError):  # file system: missing, not a directory, permission denied, disk full ...
        if exc.strerror and exc.filename is not None:
            target = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
            return _one_line(f"{exc.strerror}: {target}")
        return _one_line(str(exc) or type(exc).__name__)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return _one_line(f"out of device memory ({str(exc).splitlines()[0] if str(exc) else ''}); "
                         f"lower --batch-size or use a smaller --dtype")
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _knob_values(name: str, value, integral: bool) -> list:
    """A knob given as a number or a tensor of them -> its values as Python numbers (bools and strings refused,
    numpy scalars accepted)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex() or (integral and value.is_floating_point()):
            raise InvalidArgument(f"{name} must be {'integers' if integral else 'numbers'}, got a {value.dtype} tensor")
        return value.flatten().tolist()
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidArgument(f"{name} must be {'an integer' if integral else 'a number'}, got {value!r}")
    return [int(value) if integral else float(value)]


def check_finite_scale(name: str, value, *, minimum: float = 0.0) -> None:
    """Scalar or per-row tensor scale: finite and >= minimum."""
    for v in _knob_values(name, value, integral=False):
        if not math.isfinite(v):
            raise InvalidArgument(f"{name} must be a finite number >= {minimum}, got {v}")
        if v < minimum:
            raise InvalidArgument(f"{name} must be >= {minimum}, got {v}")


def check_sampling_args(temperature, top_k, top_p) -> None:
    """LlamaGen sampling knobs, numbers or per-row tensors: temperature >= 0 (0 = greedy), top_k an integer >= 0
    (0 = off), top_p in (0, 1]."""
    for t in _knob_values("temperature", temperature, integral=False):
        if not math.isfinite(t) or t < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {t}")
    for k in _knob_values("top_k", top_k, integral=True):
        if k < 0:
            raise InvalidArgument(f"top_k must be an integer >= 0 (0 = full vocabulary), got {k}")
    for p in _knob_values("top_p", top_p, integral=False):
        if math.isnan(p) or not (0.0 < p <= 1.0):
            raise InvalidArgument(f"top_p must be in (0, 1] (1 = off), got {p}")
