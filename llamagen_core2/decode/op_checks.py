"""Argument checks of the block ops (decode/block_ops.py), shared by their torch references and the Triton launchers
in kernels/ (which import them from here, below both).

Each `check_<op>_args` raises InvalidArgument naming the argument and what it must be, and returns the shape facts
the caller needs. Values that live on the device (positions) cannot be checked without a host sync: positions
outside the cache are the caller's contract (the kernels skip such writes; the references raise on CPU).
`FUSED_NORM_DTYPES` / `check_fused_norm_dtype`: the dtypes the fused add+RMSNorm GEMM kernels take (the dispatch
never picks them for another, kernels/dispatch.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import InvalidArgument


BACKENDS = ("torch", "triton")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise InvalidArgument(f"backend must be one of {BACKENDS} (chosen by kernels.dispatch.select_backend), "
                              f"got {backend!r}")


def _shape(t) -> list:
    return list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_float(name: str, t, ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise InvalidArgument(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if ndim is not None and t.dim() != ndim:
        raise InvalidArgument(f"{name} must have {ndim} dimensions, got shape {_shape(t)}")


def _check_same_device(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise InvalidArgument(f"{name} must be on {like.device} like the other inputs, got {t.device}")


def check_unit_stride(**tensors) -> None:
    """What every Triton launcher needs of its tensors (None skipped): unit stride along the last dimension."""
    for name, t in tensors.items():
        if t is not None and t.stride(-1) != 1:
            raise InvalidArgument(f"{name} must have unit stride along its last dimension, got strides {t.stride()}")


def _check_positions(name: str, t, length: int, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != length:
        raise InvalidArgument(f"{name} must be an int64 tensor [{length}] on the device, got "
                              f"{getattr(t, 'dtype', type(t).__name__)} {_shape(t)}")
    _check_same_device(name, t, like)


def _check_cache(cache_k, cache_v, like: torch.Tensor) -> tuple[int, int, int, int]:
    """-> (rows_total, H, S, D) of a [rows_total, H, S, D] K/V cache pair in like.dtype on like.device."""
    for name, t in (("cache_k", cache_k), ("cache_v", cache_v)):
        _check_float(name, t, 4)
        if t.dtype != like.dtype:
            raise InvalidArgument(f"{name} must have the dtype of the activations ({like.dtype}), got {t.dtype}")
        _check_same_device(name, t, like)
    if cache_v.shape != cache_k.shape:
        raise InvalidArgument(f"cache_v must have the shape of cache_k {_shape(cache_k)}, got {_shape(cache_v)}")
    return tuple(cache_k.shape)


def _check_row_start(row_start, rows: int, rows_total: int) -> None:
    if isinstance(row_start, bool) or not isinstance(row_start, int) or row_start < 0 \
            or row_start + rows > rows_total:
        raise InvalidArgument(f"row_start must be an int in [0, {rows_total - rows}] so that {rows} rows fit in the "
                              f"cache's {rows_total} rows, got {row_start!r}")


def check_add_rmsnorm_args(x, residual, weight, eps) -> None:
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise InvalidArgument(f"x must be [..., d] with d > 0, got shape {_shape(x)}")
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise InvalidArgument(f"residual must match x ({x.dtype} {_shape(x)}), got "
                                  f"{residual.dtype} {_shape(residual)}")
        _check_same_device("residual", residual, x)
    _check_float("weight", weight, 1)
    if weight.shape[0] != x.shape[-1]:
        raise InvalidArgument(f"weight must be [{x.shape[-1]}] (x's last dimension), got {_shape(weight)}")
    _check_same_device("weight", weight, x)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps > 0 and math.isfinite(eps)):
        raise InvalidArgument(f"eps must be a finite number > 0, got {eps!r}")


def _check_rope_write(rope, positions, R: int, L: int, D: int, rows_total: int, row_start, like) -> None:
    """What a RoPE + KV-cache write of R rows x L positions needs (rope_kv_write and the fused norm_qkv_rope): an
    even head_dim, a (cos, sin) table for it on `like`'s device, L positions, rows that fit the cache."""
    if D % 2:
        raise InvalidArgument(f"head_dim must be even for RoPE, got the cache's D={D}")
    _check_float("rope", rope, 3)
    if rope.shape[1:] != (D // 2, 2):
        raise InvalidArgument(f"rope must be a (cos, sin) table [P, {D // 2}, 2], got {_shape(rope)}")
    _check_same_device("rope", rope, like)
    _check_positions("positions", positions, L, like)
    _check_row_start(row_start, R, rows_total)


def check_rope_kv_write_args(qkv, rope, positions, cache_k, cache_v, row_start) -> tuple[int, int, int, int, int]:
    """-> (R, L, H, S, D)."""
    _check_float("qkv", qkv, 3)
    rows_total, H, S, D = _check_cache(cache_k, cache_v, qkv)
    R, L, width = qkv.shape
    if width != 3 * H * D:
        raise InvalidArgument(f"qkv must be [R, L, 3*H*D] = [.., .., {3 * H * D}] for the cache's H={H}, D={D}, "
                              f"got {_shape(qkv)}")
    _check_rope_write(rope, positions, R, L, D, rows_total, row_start, qkv)
    return R, L, H, S, D


def check_swiglu_args(gate_up) -> int:
    """-> F (half the last dimension)."""
    _check_float("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise InvalidArgument(f"gate_up must be [..., 2F] (w1 x | w3 x) with an even, non-zero last dimension, "
                              f"got {_shape(gate_up)}")
    return gate_up.shape[-1] // 2


def check_decode_attention_args(q, cache_k, cache_v, row_start, position, key_valid, max_end) \
        -> tuple[int, int, int, int]:
    """-> (R, H, S, D)."""
    _check_float("q", q, 4)
    rows_total, H, S, D = _check_cache(cache_k, cache_v, q)
    R = q.shape[0]
    if tuple(q.shape[1:]) != (H, 1, D):
        raise InvalidArgument(f"q must be [R, H, 1, D] = [R, {H}, 1, {D}] (one query per row, the cache's heads), "
                              f"got {_shape(q)}")
    _check_row_start(row_start, R, rows_total)
    _check_positions("position", position, 1, q)
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool \
                or tuple(key_valid.shape) != (rows_total, S):
            raise InvalidArgument(f"key_valid must be None or a bool tensor [{rows_total}, {S}] (cache rows x "
                                  f"positions), got {getattr(key_valid, 'dtype', type(key_valid).__name__)} "
                                  f"{_shape(key_valid)}")
        _check_same_device("key_valid", key_valid, q)
    if isinstance(max_end, bool) or not isinstance(max_end, int) or not 1 <= max_end <= S:
        raise InvalidArgument(f"max_end must be an int in [1, {S}] (an upper bound on position + 1), got {max_end!r}")
    return R, H, S, D


def _check_weight(name: str, weight, rows: Optional[int], cols: int, dtype: torch.dtype, like: torch.Tensor,
                  what: str) -> None:
    _check_float(name, weight, 2)
    if (rows is not None and weight.shape[0] != rows) or weight.shape[1] != cols or weight.shape[0] == 0:
        want = f"[{rows if rows is not None else 'N > 0'}, {cols}]"
        raise InvalidArgument(f"{name} must be {want} ({what}), got {_shape(weight)}")
    if weight.dtype != dtype:
        raise InvalidArgument(f"{name} must have dtype {dtype} (the dtype F.linear's input has), got {weight.dtype}")
    _check_same_device(name, weight, like)


def check_skinny_linear_args(x, weight) -> tuple[int, int]:
    """-> (N, K) of out = x @ weight.T, x [..., K], weight [N, K] in x's dtype."""
    _check_float("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise InvalidArgument(f"x must be [..., K] with K > 0, got shape {_shape(x)}")
    _check_weight("weight", weight, None, x.shape[-1], x.dtype, x, "out features x x's last dimension")
    return weight.shape[0], weight.shape[1]


def check_norm_qkv_rope_args(x, residual, norm_weight, eps, wqkv, rope, positions, cache_k, cache_v,
                             row_start) -> tuple[int, int, int, int, int]:
    """-> (R, L, H, S, D)."""
    check_add_rmsnorm_args(x, residual, norm_weight, eps)
    if x.dim() != 3:
        raise InvalidArgument(f"x must be [R, L, d] (rows x positions x model width), got shape {_shape(x)}")
    R, L, d = x.shape
    normed_dtype = torch.promote_types(x.dtype, norm_weight.dtype)
    _check_weight("wqkv", wqkv, None, d, normed_dtype, x, "3*H*D x d: the q | k | v projection")
    rows_total, H, S, D = _check_cache(cache_k, cache_v, wqkv)
    if wqkv.shape[0] != 3 * H * D:
        raise InvalidArgument(f"wqkv must be [3*H*D, d] = [{3 * H * D}, {d}] for the cache's H={H}, D={D}, "
                              f"got {_shape(wqkv)}")
    _check_rope_write(rope, positions, R, L, D, rows_total, row_start, x)
    return R, L, H, S, D


def check_norm_w13_swiglu_args(x, residual, norm_weight, eps, w13) -> int:
    """-> F (the FFN width; w13 is [2F, d], rows w1 | w3)."""
    check_add_rmsnorm_args(x, residual, norm_weight, eps)
    d = x.shape[-1]
    _check_weight("w13", w13, None, d, torch.promote_types(x.dtype, norm_weight.dtype), x,
                  "2F x d: w1 rows 0:F, w3 rows F:2F")
    if w13.shape[0] % 2:
        raise InvalidArgument(f"w13 must be [2F, d] (w1 | w3) with an even number of rows, got {_shape(w13)}")
    return w13.shape[0] // 2


FUSED_NORM_DTYPES = (torch.float32, torch.bfloat16)


def check_fused_norm_dtype(dtype: torch.dtype) -> None:
    """The fused add+RMSNorm GEMMs round h x norm_weight to the operand dtype before the 1/rms scale (the row's
    RMS is known only after the K loop). In fp16 that product can pass 65504 where LlamaGen's normalised
    activations (h / rms, then x norm_weight) do not, so fp16 is refused; bf16 has fp32's range."""
    if dtype not in FUSED_NORM_DTYPES:
        raise InvalidArgument(f"the fused add+RMSNorm GEMM kernels take fp32 or bf16 weights, got {dtype}: they round "
                              f"h x norm_weight to the operand dtype before dividing by the RMS, which can overflow "
                              f"fp16's 65504; run fp16 on the unfused path (backend='torch', or the engine's guard, "
                              f"which never picks these kernels for fp16)")
