"""Kernel dispatch: the one place that decides between the Triton kernels and their torch references.

One decision covers every kernel module in `KERNEL_MODULES` (the fused sampler, the transformer block's
ops, and the skinny / fused decode GEMMs of docs/decode_kernels.md): the engine asks once per device and passes
the answer down. Within the Triton backend, two choices are made by measurement, per shape, before any CUDA
graph capture (kernels/timed_choice.py): the sampler's select path (`choose_sampler_select`) and each fused
decode-layer group against today's path (`choose_decode_op`, used by llamagen_core2/decode/decode_ops.py).

`LLAMAGEN_CORE2_KERNELS` (kernels/backend_setting.py; read on every call, so tests can flip it):
    auto   (default) Triton when the tensors are on CUDA and every kernel module imports; otherwise
           the torch references, announced with one log line per process and reason.
    triton the Triton kernels or an error (KernelUnavailable): CUDA tensors, or CPU tensors when
           the kernel modules were built under the interpreter (TRITON_INTERPRET=1 set before
           triton was imported -- how the tests run them on CPU).
    torch  always the pure-torch references (`llamagen_core2.guidance.sampling`,
           `llamagen_core2.decode.block_ops`).
Importing this module never imports triton; `select_backend` does, lazily, once.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Optional

import torch

from ..decode.op_checks import FUSED_NORM_DTYPES
from .backend_setting import CHOICES, ENV_VAR, requested_backend  # noqa: F401 (CHOICES: part of this API)
from .timed_choice import default_chooser
# Every module holding Triton kernels; each exposes INTERPRETED (see `interpreted`).
KERNEL_MODULES = ("fused_guided_sample", "add_rmsnorm", "rope_kv_write", "swiglu", "decode_attention",
                  "skinny_gemm", "norm_qkv_rope", "norm_w13_swiglu")

logger = logging.getLogger("llamagen_core2.kernels")
_logged_reasons: set[str] = set()
_import_error: Optional[str] = None
_imported = False


class KernelUnavailable(RuntimeError):
    """LLAMAGEN_CORE2_KERNELS=triton was requested but the Triton kernels cannot run here."""


def interpreted(jit_function) -> bool:
    """True when triton.jit produced an interpreter function (TRITON_INTERPRET=1 was set before triton
    was imported): the kernel then runs on CPU tensors, slowly -- tests only."""
    return type(jit_function).__name__ == "InterpretedFunction"


def _kernel_modules():
    return [importlib.import_module(f"{__package__}.{name}") for name in KERNEL_MODULES]


def _triton_import_error() -> Optional[str]:
    """None when every kernel module imports, else why not (cached)."""
    global _imported, _import_error
    if not _imported:
        try:
            _kernel_modules()  # imports triton
        except Exception as exc:  # ImportError, or triton failing to find a backend
            _import_error = f"triton unavailable ({type(exc).__name__}: {exc})"
        _imported = True
    return _import_error


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on tensors on `device`, else a human-readable reason."""
    error = _triton_import_error()
    if error is not None:
        return error
    modes = {module.__name__.rsplit(".", 1)[-1]: module.INTERPRETED for module in _kernel_modules()}
    if len(set(modes.values())) > 1:  # TRITON_INTERPRET flipped between imports: no consistent target
        return f"kernel modules were built for different targets (interpreted: {modes})"
    is_interpreted = next(iter(modes.values()))
    if device.type == "cuda" and not is_interpreted:
        return None
    if device.type == "cpu" and is_interpreted:
        return None
    if is_interpreted:
        return f"the kernels were built for the CPU interpreter (TRITON_INTERPRET=1) but the tensors are on {device}"
    return (f"the Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing triton "
            f"to run them on CPU")


def select_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, per LLAMAGEN_CORE2_KERNELS (see module doc).
    The engine calls this once per generate() and passes the answer to every kernel entry point."""
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
    reason = reason if device.type == "cuda" else f"tensors on {device}"
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        level = logging.WARNING if device.type == "cuda" else logging.INFO
        logger.log(level, "fused kernels use the torch reference path: %s", reason)
    return "torch"


def choose_sampler_select(device, batch: int, vocab: int, filters: tuple, candidates) -> str:
    """'kernel' or 'torch': the fused sampler's select step for this (device, batch, vocab, filters), chosen by
    timing both graph-captured on CUDA (`timed_choice`, once per key, logged) -- so a select kernel slower than
    torch.topk / torch.sort cannot ship unseen. `candidates()` builds the two `timed_choice.Candidate`s
    (`fused_guided_sample.select_candidates`), only when a timing is due. Without filters there is nothing to
    select: 'kernel'. Call at warm-up, never inside a CUDA graph capture."""
    if not any(filters):
        return "kernel"
    return default_chooser().choose("guided_sample.select", device, (batch, vocab, tuple(filters)), candidates())


def choose_decode_op(device, op: str, shape_key: tuple, dtype: torch.dtype, candidates, *, fused_norm: bool = False,
                     chooser=None) -> str:
    """'unfused' or 'fused': one group of the decode layer (`op`: decode.norm_qkv_rope, decode.linear,
    decode.norm_w13_swiglu) for this (device, shape key), chosen by timing both graph-captured on CUDA
    (`timed_choice`, once per key, logged; `candidates()` builds them: `decode_ops.candidates`), so a fused kernel
    slower than today's path for a shape is not used there. CPU: 'unfused' under auto, 'fused' under
    LLAMAGEN_CORE2_KERNELS=triton. A fused add+RMSNorm GEMM (`fused_norm`) is never chosen for a dtype it refuses
    (fp16: op_checks.check_fused_norm_dtype). Call at warm-up, never inside a CUDA graph capture."""
    if fused_norm and dtype not in FUSED_NORM_DTYPES:
        return "unfused"
    return (chooser or default_chooser()).choose(op, device, shape_key, candidates())


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch configs size their grids to fill them; cached)."""
    device = torch.device(device)
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
