"""Residual add + LlamaGen RMSNorm in one pass (reference: llamagen_core2.decode.block_ops.add_rmsnorm_reference).

    x, residual [..., d] (same dtype), weight [d] -> normed [..., d] in promote(x.dtype, weight.dtype),
                                                      h = x + residual [..., d] in x.dtype (x itself when None)

One program per row: the row is read once, h is rounded to x.dtype exactly like torch's `x + residual`
(an fp32 add of two bf16/fp16 values rounded once is the correctly rounded sum), the mean of squares is
accumulated in fp32, 1/sqrt uses IEEE sqrt and division (torch CPU's rsqrt is the same two roundings), the
normalised row is cast to x.dtype and then multiplied by the weight in fp32 and rounded once (the product of
two bf16/fp16 values is exact in fp32, so this is torch's `normed.type_as(x) * weight`). The only difference
from the reference is the order of the sum of squares (a tree instead of torch's): ~1 ulp of fp32 in the
normalised value.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..decode.op_checks import check_add_rmsnorm_args, check_unit_stride
from ..errors import InvalidArgument
from .dispatch import interpreted


@triton.jit
def _add_residual(x, residual):
    """h = x + residual rounded once to x's dtype (torch's `x + residual`; the fp32 sum of two bf16/fp16 values
    rounded once is the correctly rounded sum). Shared with the fused GEMM prologues."""
    return (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)


@triton.jit
def _inv_rms(sum_squares, n_cols, eps):
    """1 / sqrt(mean of squares + eps) in fp32 with IEEE sqrt and division (torch CPU's rsqrt rounds the same
    two times). sum_squares: fp32, any shape. Shared with the fused GEMM prologues."""
    return tl.div_rn(1.0, tl.sqrt_rn(sum_squares / n_cols + eps))


@triton.jit
def _norm_prologue_tile(x_rows, residual_rows, h_rows, norm_weight_ptr, cols, tile_ok, h_ok, col_ok,
                        HAS_RESIDUAL: tl.constexpr, OPERAND_DTYPE: tl.constexpr):
    """The add + RMSNorm prologue of a fused GEMM on one [BLOCK_M, BLOCK_K] tile of the row block.

    x_rows, residual_rows, h_rows: [BLOCK_M, 1] row pointers; cols [BLOCK_K]. Returns (operand, sum of squares):
    operand = (h * norm_weight) rounded once to the GEMM's operand dtype, and the tile's fp32 sum of h^2 per row
    [BLOCK_M]; h = x + residual (rounded like _add_residual) is stored where h_ok. The 1/rms factor is applied
    by the caller to the fp32 accumulator (one rounding of the normalised activations instead of LlamaGen's two:
    the row's full sum of squares is known only after the K loop)."""
    x = tl.load(x_rows + cols[None, :], mask=tile_ok, other=0.0)
    if HAS_RESIDUAL:
        h = _add_residual(x, tl.load(residual_rows + cols[None, :], mask=tile_ok, other=0.0))
        tl.store(h_rows + cols[None, :], h, mask=h_ok)
    else:
        h = x
    hf = h.to(tl.float32)
    weight = tl.load(norm_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return (hf * weight[None, :]).to(OPERAND_DTYPE), tl.sum(hf * hf, axis=1)



@triton.jit
def _norm_prologue_dual_dot(x_rows, residual_rows, h_rows, norm_weight_ptr, w_a, w_b, w_rows_ok, row_ok, h_ok, lo, hi,
                            HAS_RESIDUAL: tl.constexpr, OPERAND_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The K loop both fused norm GEMMs run (norm_qkv_rope: the even and odd rows of a RoPE pair block;
    norm_w13_swiglu: the gate and up rows of an FFN column block): over K columns [lo, hi), the prologue's
    operand tile times two blocks of weight rows.

    w_a, w_b: [BLOCK_N, 1] weight-row pointers, w_rows_ok [BLOCK_N] their mask; row_ok [BLOCK_M]; h_ok [BLOCK_M, 1]
    (where this program stores h). Returns (acc_a, acc_b [BLOCK_M, BLOCK_N] fp32, sum of squares [BLOCK_M])."""
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sum_squares = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < hi
        tile_ok = row_ok[:, None] & col_ok[None, :]
        operand, squares = _norm_prologue_tile(x_rows, residual_rows, h_rows, norm_weight_ptr, cols, tile_ok,
                                               h_ok & col_ok[None, :], col_ok, HAS_RESIDUAL, OPERAND_DTYPE)
        sum_squares += squares
        w_ok = w_rows_ok[:, None] & col_ok[None, :]
        a = tl.load(w_a + cols[None, :], mask=w_ok, other=0.0)
        b = tl.load(w_b + cols[None, :], mask=w_ok, other=0.0)
        acc_a = tl.dot(operand, tl.trans(a), acc_a, input_precision=DOT_PRECISION)
        acc_b = tl.dot(operand, tl.trans(b), acc_b, input_precision=DOT_PRECISION)
    return acc_a, acc_b, sum_squares


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr,     # [M, d] rows (unit stride along d), [M, d], [d]
    normed_ptr, h_ptr,                   # [M, d] outputs (h only written when HAS_RESIDUAL)
    n_cols, eps,
    stride_x, stride_residual, stride_normed, stride_h,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=ok, other=0.0)
        h = _add_residual(x, residual)
        tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
    else:
        h = x
    hf = h.to(tl.float32)
    inv_rms = _inv_rms(tl.sum(hf * hf, axis=0), n_cols, eps)
    normed = (hf * inv_rms).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * stride_normed + cols, (normed * weight).to(normed_ptr.dtype.element_ty), mask=ok)


def launch_config(dim: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the whole row in one block (dims up to 3200 for GPT-3B -> 4096); warps grow with
    the row so each thread holds <= 16 fp32 values (4 warps up to 2048, then 8, then 16), as Liger's RMSNorm."""
    block_d = triton.next_power_of_2(dim)
    num_warps = 4 if block_d <= 2048 else 8 if block_d <= 4096 else 16
    return block_d, num_warps


MAX_DIM = 65536  # one row per program in registers


def add_rmsnorm_triton(x: torch.Tensor, residual, weight: torch.Tensor, eps: float):
    """Launcher: see the module doc. x's last dimension must have unit stride (rows may be strided)."""
    check_add_rmsnorm_args(x, residual, weight, eps)
    dim = x.shape[-1]
    if dim > MAX_DIM:
        raise InvalidArgument(f"x's last dimension must be <= {MAX_DIM} for the fused RMSNorm, got {dim}")
    x2 = _rows(x, "x")
    res2 = _rows(residual, "residual") if residual is not None else x2
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    normed = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x
    normed2 = normed.view(-1, dim)
    h2 = h.view(-1, dim) if residual is not None else normed2  # dummy pointer when there is no residual
    block_d, num_warps = launch_config(dim)
    if x2.shape[0] > 0:
        _add_rmsnorm_kernel[(x2.shape[0],)](
            x2, res2, weight, normed2, h2, dim, float(eps),
            x2.stride(0), res2.stride(0), normed2.stride(0), h2.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, num_warps=num_warps)
    return normed, h


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., d] -> [M, d] view with unit stride along d (a copy only when the leading dims cannot be merged)."""
    check_unit_stride(**{name: t})
    return t.reshape(-1, t.shape[-1])


INTERPRETED = interpreted(_add_rmsnorm_kernel)
