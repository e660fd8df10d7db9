"""Kernel dispatch: the one place that decides between the fused Triton kernel and torch.

`LLAMAGEN_CORE2_KERNELS` (read on every call, so tests can flip it):
    auto   (default) Triton when the logits are on CUDA and triton imports; otherwise the torch
           reference, announced with one log line per process and reason.
    triton the fused kernel or an error (KernelUnavailable): CUDA tensors, or CPU tensors when
           the kernel module was built under the interpreter (TRITON_INTERPRET=1 set before
           triton was imported -- how the tests run it on CPU).
    torch  always the pure-torch reference in `llamagen_core2.guidance`.
Importing this module never imports triton; `select_backend` does, lazily, once.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..errors import InvalidArgument

ENV_VAR = "LLAMAGEN_CORE2_KERNELS"
CHOICES = ("auto", "triton", "torch")

logger = logging.getLogger("llamagen_core2.kernels")
_logged_reasons: set[str] = set()
_import_error: Optional[str] = None
_imported = False


class KernelUnavailable(RuntimeError):
    """LLAMAGEN_CORE2_KERNELS=triton was requested but the fused kernel cannot run here."""


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise InvalidArgument(f"{ENV_VAR} must be one of {CHOICES}, got {value!r}")
    return value


def _triton_import_error() -> Optional[str]:
    """None when the fused kernel module imports, else why not (cached)."""
    global _imported, _import_error
    if not _imported:
        try:
            from . import fused_guided_sample  # noqa: F401  (imports triton)
        except Exception as exc:  # ImportError, or triton failing to find a backend
            _import_error = f"triton unavailable ({type(exc).__name__}: {exc})"
        _imported = True
    return _import_error


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the fused kernel can run on tensors on `device`, else a human-readable reason."""
    error = _triton_import_error()
    if error is not None:
        return error
    from .fused_guided_sample import INTERPRETED

    if device.type == "cuda" and not INTERPRETED:
        return None
    if device.type == "cpu" and INTERPRETED:
        return None
    if INTERPRETED:
        return f"the kernel was built for the CPU interpreter (TRITON_INTERPRET=1) but the logits are on {device}"
    return f"the fused kernel needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing triton to run it on CPU"


def select_backend(device: torch.device) -> str:
    """'triton' or 'torch' for logits on `device`, per LLAMAGEN_CORE2_KERNELS (see module doc)."""
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    device = torch.device(device)
    reason = triton_unavailable_reason(device)
    if requested == "triton":
        if reason is not None:
            raise KernelUnavailable(f"{ENV_VAR}=triton but {reason}")
        return "triton"
    if device.type == "cuda" and reason is None:
        return "triton"
    # auto on CPU never picks the interpreter: it is orders of magnitude slower than torch.
    reason = reason if device.type == "cuda" else f"logits on {device}"
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        level = logging.WARNING if device.type == "cuda" else logging.INFO
        logger.log(level, "guided sampling uses the torch reference path: %s", reason)
    return "torch"
