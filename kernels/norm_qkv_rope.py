"""The attention half's entry of a decode block in one launch: add + RMSNorm -> wqkv GEMM -> RoPE -> K/V write.

Reference: llamagen_core2.decode.block_ops.norm_qkv_rope_reference (add_rmsnorm, F.linear, rope_kv_write composed).

    x, residual [R, L, d] (residual None: h = x), norm_weight [d], wqkv [3*H*D, d] (rows q | k | v, heads
    contiguous; dtype promote(x, norm_weight) as F.linear needs), rope [P, D/2, 2] (cos, sin), positions [L]
    int64 on the device, cache_k/cache_v [rows_total, H, S, D] (wqkv's dtype), row_start int
    -> (rotated q [R, H, L, D] (new, contiguous), h [R, L, d] (x itself when residual is None));
       rotated k and raw v written to cache[row_start + r, :, positions[l]]

A skinny GEMM (kernels/skinny_gemm.py: all M = R*L rows in one tile, split-K reduced in the same launch) whose
prologue and epilogue carry the neighbouring ops, as Hazy Research's Llama megakernel's `rms_qkv_rope_append`:
  * prologue (kernels/add_rmsnorm._norm_prologue_tile): each x tile of the K loop is added to its residual tile
    (the programs of the first column block store h), multiplied by the norm weight and rounded to the operand
    dtype; the row's fp32 sum of squares accumulates alongside, and 1/rms scales the fp32 accumulator at the end
    (the row's RMS is only known after the K loop; Mirage fuses RMSNorm into the GEMM the same way);
  * a program owns BLOCK_P rotation pairs: two accumulators over weight rows 2p and 2p+1, so the pair (2m, 2m+1)
    of a head is in registers together;
  * epilogue: the accumulators are rounded to the dtype (F.linear's output), q and k are rotated with
    rope[positions] in fp32 (kernels/rope_kv_write._rotate_pair, FMA contraction off as there), q is stored,
    k and v go into the cache. Positions are read from device memory; a position outside the cache or the table
    is skipped (no write; q is left unwritten), as the unfused kernel does.
Numerics: vs the reference, the GEMM sums in another order (tiles, split partials) and the normalised activations
are rounded once (h * norm_weight) instead of twice ((h / rms) then * norm_weight); the RoPE and the cache write
are the reference's operations on the rounded qkv. fp16: h * norm_weight can pass 65504 where the reference's
values do not; block_ops.norm_qkv_rope refuses fp16 (check_fused_norm_dtype) and the engine never picks it there.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..decode.op_checks import check_norm_qkv_rope_args, check_unit_stride
from .add_rmsnorm import _inv_rms, _norm_prologue_dual_dot
from .dispatch import interpreted
from .rope_kv_write import _rotate_pair
from .skinny_gemm import (GemmConfig, SplitKWorkspace, SplitLaunch, _reset, _split_k_dual_reduce, dot_precision,
                          plan_launch, workspace_buffers)


@triton.jit
def _qkv_rope_epilogue(
    acc_even, acc_odd, sum_squares, rows, row_ok, pairs, pair_ok,
    rope_ptr, positions_ptr, cache_k_ptr, cache_v_ptr, q_ptr,
    K, eps, row_start, seq_len, n_heads, head_dim, max_len, table_len,
    stride_rope_p, stride_rope_m, stride_rope_j,
    stride_k_r, stride_k_h, stride_k_s,
    stride_v_r, stride_v_h, stride_v_s,
):
    dtype = q_ptr.dtype.element_ty
    inv_rms = _inv_rms(sum_squares, K, eps)[:, None]                       # [BM, 1]
    even = (acc_even * inv_rms).to(dtype).to(tl.float32)                    # qkv as F.linear rounds it
    odd = (acc_odd * inv_rms).to(dtype).to(tl.float32)

    r = rows // seq_len
    l = rows % seq_len
    position = tl.load(positions_ptr + l, mask=row_ok, other=-1).to(tl.int64)  # [BM]
    in_range = row_ok & (position >= 0) & (position < max_len) & (position < table_len)
    width = n_heads * head_dim
    col = 2 * pairs                                                         # [BP] even column in q | k | v
    section = col // width                                                  # 0 q, 1 k, 2 v
    head = (col % width) // head_dim
    dim = col % head_dim
    ok = in_range[:, None] & pair_ok[None, :]                               # [BM, BP]

    table = rope_ptr + position[:, None] * stride_rope_p + (dim // 2)[None, :] * stride_rope_m
    rotated = ok & (section < 2)[None, :]
    cos = tl.load(table, mask=rotated, other=0.0).to(tl.float32)
    sin = tl.load(table + stride_rope_j, mask=rotated, other=0.0).to(tl.float32)
    rot_even, rot_odd = _rotate_pair(even, odd, cos, sin)
    is_v = (section == 2)[None, :]
    out_even = tl.where(is_v, even, rot_even).to(dtype)
    out_odd = tl.where(is_v, odd, rot_odd).to(dtype)

    # q_out [R, H, L, D] contiguous
    q_dst = q_ptr + ((r[:, None].to(tl.int64) * n_heads + head[None, :]) * seq_len + l[:, None]) * head_dim \
        + dim[None, :]
    q_ok = ok & (section == 0)[None, :]
    tl.store(q_dst, out_even, mask=q_ok)
    tl.store(q_dst + 1, out_odd, mask=q_ok)
    cache_row = (row_start + r).to(tl.int64)[:, None]
    k_dst = cache_k_ptr + cache_row * stride_k_r + head[None, :] * stride_k_h + position[:, None] * stride_k_s \
        + dim[None, :]
    k_ok = ok & (section == 1)[None, :]
    tl.store(k_dst, out_even, mask=k_ok)
    tl.store(k_dst + 1, out_odd, mask=k_ok)
    v_dst = cache_v_ptr + cache_row * stride_v_r + head[None, :] * stride_v_h + position[:, None] * stride_v_s \
        + dim[None, :]
    v_ok = ok & is_v
    tl.store(v_dst, out_even, mask=v_ok)
    tl.store(v_dst + 1, out_odd, mask=v_ok)


@triton.jit
def _norm_qkv_rope_kernel(
    x_ptr, residual_ptr, h_ptr, norm_weight_ptr, w_ptr,   # [M, d] x3 (unit stride on d), [d], [3HD, d]
    rope_ptr, positions_ptr,                              # [P, D/2, 2], [L]
    cache_k_ptr, cache_v_ptr, q_ptr,                      # [rows_total, H, S, D] x2 (unit stride on D), [R, H, L, D]
    partial_ptr, squares_ptr, counter_ptr,                # fp32 [SPLIT_K, M, 3HD], fp32 [tiles, SPLIT_K, BM], int32
    M, K, k_per_split, eps,
    row_start, seq_len, n_heads, head_dim, max_len, table_len,
    stride_x, stride_residual, stride_h, stride_w,
    stride_rope_p, stride_rope_m, stride_rope_j,
    stride_k_r, stride_k_h, stride_k_s,
    stride_v_r, stride_v_h, stride_v_s,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    n_cols = 3 * n_heads * head_dim
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = pid_n * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < M
    pair_ok = pairs < n_cols // 2
    h_ok = (rows < tl.where(pid_n == 0, M, 0))[:, None]  # the first column block stores h
    rows64 = rows[:, None].to(tl.int64)
    x_rows = x_ptr + rows64 * stride_x
    residual_rows = residual_ptr + rows64 * stride_residual
    h_rows = h_ptr + rows64 * stride_h
    w_even = w_ptr + (2 * pairs)[:, None].to(tl.int64) * stride_w
    lo = split * k_per_split
    hi = tl.minimum(lo + k_per_split, K)

    acc_even, acc_odd, sum_squares = _norm_prologue_dual_dot(
        x_rows, residual_rows, h_rows, norm_weight_ptr, w_even, w_even + stride_w, pair_ok, row_ok, h_ok, lo, hi,
        HAS_RESIDUAL, w_ptr.dtype.element_ty, BLOCK_M, BLOCK_P, BLOCK_K, DOT_PRECISION)

    last = True
    tile = pid_m * tl.num_programs(1) + pid_n
    if SPLIT_K > 1:  # even and odd columns of a pair sit side by side in the partials
        part = partial_ptr + rows[:, None] * n_cols + 2 * pairs[None, :]
        last, acc_even, acc_odd, sum_squares = _split_k_dual_reduce(
            acc_even, acc_odd, sum_squares, part, 1, row_ok[:, None] & pair_ok[None, :], row_ok, squares_ptr,
            counter_ptr, tile, split, M * n_cols, SPLIT_K, BLOCK_M)
    if last:
        _qkv_rope_epilogue(acc_even, acc_odd, sum_squares, rows, row_ok, pairs, pair_ok,
                           rope_ptr, positions_ptr, cache_k_ptr, cache_v_ptr, q_ptr,
                           K, eps, row_start, seq_len, n_heads, head_dim, max_len, table_len,
                           stride_rope_p, stride_rope_m, stride_rope_j,
                           stride_k_r, stride_k_h, stride_k_s, stride_v_r, stride_v_h, stride_v_s)
        if SPLIT_K > 1:
            _reset(counter_ptr + tile)


def plan_qkv_launch(rows: int, n_head: int, head_dim: int, dim: int, device, element_size: int,
                    config: Optional[GemmConfig] = None) -> SplitLaunch:
    """The launch over `rows` rows (a unit is one RoPE pair of q | k | v output columns: two weight rows; each split
    keeps its row sums of squares). The launcher and decode_ops.reserve (the workspace sized before a capture)
    both plan with it."""
    return plan_launch(rows, 3 * n_head * head_dim // 2, dim, device, element_size, weight_rows_per_unit=2,
                       row_sums=True, config=config)


def norm_qkv_rope_triton(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                         wqkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                         cache_v: torch.Tensor, row_start: int, *, workspace: Optional[SplitKWorkspace] = None,
                         config: Optional[GemmConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: see the module doc. Unit stride needed along the last dimension of x, residual, wqkv and the
    caches. `workspace`: the caller's split-K scratch (a one-off one when None); `config`: overrides
    skinny_gemm.gemm_config (block_n counts rotation pairs)."""
    R, L, H, S, D = check_norm_qkv_rope_args(x, residual, norm_weight, eps, wqkv, rope, positions, cache_k,
                                             cache_v, row_start)
    check_unit_stride(x=x, residual=residual, wqkv=wqkv, cache_k=cache_k, cache_v=cache_v)
    d = x.shape[-1]
    M = R * L
    q = torch.empty(R, H, L, D, dtype=wqkv.dtype, device=x.device)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x
    if M == 0:
        return q, h
    x2, h2 = x.reshape(M, d), h.view(M, d) if residual is not None else x.reshape(M, d)
    res2 = residual.reshape(M, d) if residual is not None else x2
    if norm_weight.stride(0) != 1:
        norm_weight = norm_weight.contiguous()
    launch = plan_qkv_launch(M, H, D, d, x.device, wqkv.element_size(), config)
    config, split_k = launch.config, launch.split_k
    if split_k > 1:
        partials, counters = workspace_buffers(workspace, launch.floats, launch.counters, x.device)
        squares = partials[split_k * M * 3 * H * D:]
    else:
        partials = squares = counters = q  # never touched without a split
    _norm_qkv_rope_kernel[launch.grid](
        x2, res2, h2, norm_weight, wqkv, rope, positions, cache_k, cache_v, q,
        partials, squares, counters,
        M, d, launch.k_per_split, float(eps),
        row_start, L, H, D, S, rope.shape[0],
        x2.stride(0), res2.stride(0), h2.stride(0), wqkv.stride(0),
        rope.stride(0), rope.stride(1), rope.stride(2),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        HAS_RESIDUAL=residual is not None, SPLIT_K=split_k, BLOCK_M=config.block_m, BLOCK_P=config.block_n,
        BLOCK_K=config.block_k, DOT_PRECISION=dot_precision(wqkv.dtype), num_warps=config.num_warps,
        num_stages=config.num_stages,
        enable_fp_fusion=False)  # the rotation as two roundings, like the reference
    return q, h


INTERPRETED = interpreted(_norm_qkv_rope_kernel)
