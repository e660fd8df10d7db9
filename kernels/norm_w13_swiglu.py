"""The FFN half's entry of a decode block in one launch: add + RMSNorm -> [w1; w3] GEMM -> SwiGLU.

Reference: llamagen_core2.decode.block_ops.norm_w13_swiglu_reference (add_rmsnorm, F.linear, swiglu composed).

    x, residual [..., d] (residual None: h = x), norm_weight [d], w13 [2F, d] (FeedForward.w13: rows 0:F = w1,
    F:2F = w3; dtype promote(x, norm_weight) as F.linear needs)
    -> (silu(w1 n) * w3 n [..., F] in w13's dtype, h = x + residual [..., d] (x itself when residual is None)),
       n = RMSNorm(h)

A skinny GEMM (kernels/skinny_gemm.py: all rows in one tile, split-K reduced in the same launch) with the add +
RMSNorm prologue of kernels/norm_qkv_rope.py (kernels/add_rmsnorm._norm_prologue_tile: 1/rms applied to the fp32
accumulator) and a SwiGLU epilogue, as Hazy Research's megakernel's `rms_upgate_silu`: a program owns BLOCK_N
columns j of the FFN and accumulates the matching gate (w1 row j) and up (w3 row F + j) tiles side by side, so
silu(gate) * up is computed in registers (kernels/swiglu._silu_mul, after rounding both to the dtype as F.linear
does) and the [rows, 2F] gate_up tensor never exists. Numerics: as norm_qkv_rope (GEMM summation order, one
rounding of the normalised activations); fp16: h * norm_weight can pass 65504 where the reference's values do
not; block_ops.norm_w13_swiglu refuses fp16 (check_fused_norm_dtype) and the engine never picks it there.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..decode.op_checks import check_norm_w13_swiglu_args, check_unit_stride
from .add_rmsnorm import _inv_rms, _norm_prologue_dual_dot
from .dispatch import interpreted
from .skinny_gemm import (GemmConfig, SplitKWorkspace, SplitLaunch, _reset, _split_k_dual_reduce, dot_precision,
                          plan_launch, workspace_buffers)
from .swiglu import _silu_mul


@triton.jit
def _swiglu_epilogue(acc_gate, acc_up, sum_squares, K, eps, out, out_ok, LIBDEVICE_EXP: tl.constexpr):
    dtype = out.dtype.element_ty
    inv_rms = _inv_rms(sum_squares, K, eps)[:, None]
    gate = (acc_gate * inv_rms).to(dtype)  # w1 n and w3 n as F.linear rounds them
    up = (acc_up * inv_rms).to(dtype)
    tl.store(out, _silu_mul(gate, up, LIBDEVICE_EXP).to(dtype), mask=out_ok)


@triton.jit
def _norm_w13_swiglu_kernel(
    x_ptr, residual_ptr, h_ptr, norm_weight_ptr, w_ptr,  # [M, d] x3 (unit stride on d), [d], [2F, d]
    out_ptr,                                             # [M, F]
    partial_ptr, squares_ptr, counter_ptr,               # fp32 [SPLIT_K, M, 2F], fp32 [tiles, SPLIT_K, BM], int32
    M, K, ffn_dim, k_per_split, eps,
    stride_x, stride_residual, stride_h, stride_w, stride_out,
    HAS_RESIDUAL: tl.constexpr,
    LIBDEVICE_EXP: tl.constexpr,  # False under the interpreter, which has no libdevice
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_f = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # FFN columns j: gate row j, up row F + j
    row_ok = rows < M
    col_f_ok = cols_f < ffn_dim
    h_ok = (rows < tl.where(pid_n == 0, M, 0))[:, None]  # the first column block stores h
    rows64 = rows[:, None].to(tl.int64)
    x_rows = x_ptr + rows64 * stride_x
    residual_rows = residual_ptr + rows64 * stride_residual
    h_rows = h_ptr + rows64 * stride_h
    w_gate = w_ptr + cols_f[:, None].to(tl.int64) * stride_w
    w_up = w_ptr + (ffn_dim + cols_f)[:, None].to(tl.int64) * stride_w
    lo = split * k_per_split
    hi = tl.minimum(lo + k_per_split, K)

    acc_gate, acc_up, sum_squares = _norm_prologue_dual_dot(
        x_rows, residual_rows, h_rows, norm_weight_ptr, w_gate, w_up, col_f_ok, row_ok, h_ok, lo, hi,
        HAS_RESIDUAL, w_ptr.dtype.element_ty, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)

    out_ok = row_ok[:, None] & col_f_ok[None, :]
    out = out_ptr + rows64 * stride_out + cols_f[None, :]
    last = True
    tile = pid_m * tl.num_programs(1) + pid_n
    if SPLIT_K > 1:  # partials [SPLIT_K, M, 2F]: gate columns 0:F, up columns F:2F
        part = partial_ptr + rows[:, None] * (2 * ffn_dim) + cols_f[None, :]
        last, acc_gate, acc_up, sum_squares = _split_k_dual_reduce(
            acc_gate, acc_up, sum_squares, part, ffn_dim, out_ok, row_ok, squares_ptr, counter_ptr, tile, split,
            M * 2 * ffn_dim, SPLIT_K, BLOCK_M)
    if last:
        _swiglu_epilogue(acc_gate, acc_up, sum_squares, K, eps, out, out_ok, LIBDEVICE_EXP)
        if SPLIT_K > 1:
            _reset(counter_ptr + tile)


def plan_w13_launch(rows: int, ffn_dim: int, dim: int, device, element_size: int,
                    config: Optional[GemmConfig] = None) -> SplitLaunch:
    """The launch over `rows` rows (a unit is one FFN column: its gate and up weight rows; each split keeps its row
    sums of squares). The launcher and decode_ops.reserve (the workspace sized before a capture) both plan with
    it."""
    return plan_launch(rows, ffn_dim, dim, device, element_size, weight_rows_per_unit=2, row_sums=True,
                       config=config)


def norm_w13_swiglu_triton(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                           w13: torch.Tensor, *, workspace: Optional[SplitKWorkspace] = None,
                           config: Optional[GemmConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: see the module doc. Unit stride needed along the last dimension of x, residual and w13.
    `workspace`: the caller's split-K scratch (a one-off one when None); `config`: overrides
    skinny_gemm.gemm_config (block_n counts FFN columns, each a gate and an up weight row)."""
    ffn_dim = check_norm_w13_swiglu_args(x, residual, norm_weight, eps, w13)
    check_unit_stride(x=x, residual=residual, w13=w13)
    d = x.shape[-1]
    out = torch.empty(*x.shape[:-1], ffn_dim, dtype=w13.dtype, device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x
    x2 = x.reshape(-1, d)
    M = x2.shape[0]
    if M == 0:
        return out, h
    h2 = h.view(M, d) if residual is not None else x2
    res2 = residual.reshape(M, d) if residual is not None else x2
    out2 = out.view(M, ffn_dim)
    if norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()
    on_gpu = x.device.type == "cuda" and not INTERPRETED
    launch = plan_w13_launch(M, ffn_dim, d, x.device, w13.element_size(), config)
    config, split_k = launch.config, launch.split_k
    if split_k > 1:
        partials, counters = workspace_buffers(workspace, launch.floats, launch.counters, x.device)
        squares = partials[split_k * M * 2 * ffn_dim:]
    else:
        partials = squares = counters = out2  # never touched without a split
    _norm_w13_swiglu_kernel[launch.grid](
        x2, res2, h2, norm_weight, w13, out2, partials, squares, counters,
        M, d, ffn_dim, launch.k_per_split, float(eps),
        x2.stride(0), res2.stride(0), h2.stride(0), w13.stride(0), out2.stride(0),
        HAS_RESIDUAL=residual is not None, LIBDEVICE_EXP=on_gpu, SPLIT_K=split_k, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, DOT_PRECISION=dot_precision(w13.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out, h


INTERPRETED = interpreted(_norm_w13_swiglu_kernel)
