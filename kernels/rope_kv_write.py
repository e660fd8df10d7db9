"""RoPE on q and k + K/V cache write in one launch (reference: llamagen_core2.decode.block_ops.rope_kv_write_reference).

    qkv [R, L, 3*H*D] (q | k | v, heads contiguous, as wqkv produces), rope [P, D/2, 2] (cos, sin),
    positions [L] int (on the device), cache_k/cache_v [rows_total, H, S, D] (qkv's dtype), row_start int
    -> rotated q [R, H, L, D] (new, contiguous); rotated k and raw v written to cache[row_start + r, :, positions[l]]

Grid (R * L, cdiv(H, BLOCK_H)): a program rotates BLOCK_H heads of one (row, position). The interleaved pairs
(2m, 2m+1) are read as two stride-2 loads (both hit the same cache lines). The rotation is computed in fp32
with the reference's association (x0 cos - x1 sin, x1 cos + x0 sin) and FMA contraction off
(enable_fp_fusion=False), so the results are bit-identical to the reference, then cast to qkv's dtype.
Positions are read from device memory (one CUDA graph serves every step); a position outside the cache or
the table is skipped (no write) instead of corrupting memory -- it cannot be reported without a host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..decode.op_checks import check_rope_kv_write_args, check_unit_stride
from .dispatch import interpreted, multiprocessor_count


@triton.jit
def _rotate_pair(x0, x1, cos, sin):
    """fp32 (x0 cos - x1 sin, x1 cos + x0 sin): LlamaGen's rotation of the interleaved pair (2m, 2m+1) with the
    reference's association (bit-exact when launched with enable_fp_fusion=False). Shared with the fused QKV
    GEMM epilogue."""
    return x0 * cos - x1 * sin, x1 * cos + x0 * sin


@triton.jit
def _rope_kv_write_kernel(
    qkv_ptr, rope_ptr, positions_ptr,        # [R, L, 3HD] (unit stride on the last dim), [P, D/2, 2], [L]
    cache_k_ptr, cache_v_ptr, q_out_ptr,     # [rows_total, H, S, D] x2 (unit stride on D), [R, H, L, D]
    row_start, seq_len, n_heads, head_dim, max_len, table_len,
    stride_qkv_r, stride_qkv_l,
    stride_rope_p, stride_rope_m, stride_rope_j,
    stride_k_r, stride_k_h, stride_k_s,
    stride_v_r, stride_v_h, stride_v_s,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid // seq_len
    l = pid % seq_len
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)         # [BH]
    pairs = tl.arange(0, BLOCK_HALF)                                     # [BM]
    position = tl.load(positions_ptr + l).to(tl.int64)
    in_range = (position >= 0) & (position < max_len) & (position < table_len)
    pair_ok = pairs < tl.where(in_range, head_dim // 2, 0)              # [BM]; all off when out of range
    ok = (heads[:, None] < n_heads) & pair_ok[None, :]                   # [BH, BM]

    table = rope_ptr + position * stride_rope_p + pairs * stride_rope_m  # [BM]
    cos = tl.load(table, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(table + stride_rope_j, mask=pair_ok, other=0.0).to(tl.float32)[None, :]

    even = heads[:, None] * head_dim + 2 * pairs[None, :]                # [BH, BM] offset of x_{2m} in q
    src = qkv_ptr + r.to(tl.int64) * stride_qkv_r + l.to(tl.int64) * stride_qkv_l + even
    width = n_heads * head_dim
    q0 = tl.load(src, mask=ok, other=0.0)
    q1 = tl.load(src + 1, mask=ok, other=0.0)
    k0 = tl.load(src + width, mask=ok, other=0.0)
    k1 = tl.load(src + width + 1, mask=ok, other=0.0)
    v0 = tl.load(src + 2 * width, mask=ok, other=0.0)
    v1 = tl.load(src + 2 * width + 1, mask=ok, other=0.0)

    q0f, q1f = q0.to(tl.float32), q1.to(tl.float32)
    k0f, k1f = k0.to(tl.float32), k1.to(tl.float32)
    q_even, q_odd = _rotate_pair(q0f, q1f, cos, sin)
    k_even, k_odd = _rotate_pair(k0f, k1f, cos, sin)
    q_even, q_odd = q_even.to(q0.dtype), q_odd.to(q0.dtype)
    k_even, k_odd = k_even.to(k0.dtype), k_odd.to(k0.dtype)

    # q_out [R, H, L, D] contiguous
    q_dst = q_out_ptr + ((r.to(tl.int64) * n_heads + heads[:, None]) * seq_len + l) * head_dim + 2 * pairs[None, :]
    tl.store(q_dst, q_even, mask=ok)
    tl.store(q_dst + 1, q_odd, mask=ok)
    cache_row = (row_start + r).to(tl.int64)
    k_dst = cache_k_ptr + cache_row * stride_k_r + heads[:, None] * stride_k_h + position * stride_k_s \
        + 2 * pairs[None, :]
    tl.store(k_dst, k_even, mask=ok)
    tl.store(k_dst + 1, k_odd, mask=ok)
    v_dst = cache_v_ptr + cache_row * stride_v_r + heads[:, None] * stride_v_h + position * stride_v_s \
        + 2 * pairs[None, :]
    tl.store(v_dst, v0, mask=ok)
    tl.store(v_dst + 1, v1, mask=ok)


def launch_config(rows: int, seq_len: int, n_heads: int, head_dim: int, on_gpu: bool,
                  sm_count: int = 132) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_HALF, num_warps). The op is pure data movement (3*D values in and out per head). On a
    GPU: one head per program (D/2 <= 64 pairs: one warp) until there are >= 8 programs per SM, so batch-1
    decode spreads over many SMs; with more rows, up to 4 heads per program (fewer, fuller programs). Under the
    interpreter every program costs Python overhead: all heads in one program."""
    block_half = triton.next_power_of_2(max(1, head_dim // 2))
    if not on_gpu:
        return triton.next_power_of_2(n_heads), block_half, 1
    block_h = 1
    while block_h < 4 and block_h * 2 <= n_heads and rows * seq_len * triton.cdiv(n_heads, block_h * 2) >= 8 * sm_count:
        block_h *= 2
    num_warps = max(1, min(4, block_h * block_half // 64))
    return block_h, block_half, num_warps


def rope_kv_write_triton(qkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                         cache_v: torch.Tensor, row_start: int) -> torch.Tensor:
    """Launcher: see the module doc. Needs unit stride along the last dimension of qkv and of the caches."""
    R, L, H, S, D = check_rope_kv_write_args(qkv, rope, positions, cache_k, cache_v, row_start)
    check_unit_stride(qkv=qkv, cache_k=cache_k, cache_v=cache_v)
    q = torch.empty(R, H, L, D, dtype=qkv.dtype, device=qkv.device)
    if R == 0 or L == 0:
        return q
    on_gpu = qkv.device.type == "cuda" and not INTERPRETED
    block_h, block_half, num_warps = launch_config(R, L, H, D, on_gpu,
                                                   multiprocessor_count(qkv.device) if on_gpu else 132)
    grid = (R * L, triton.cdiv(H, block_h))
    _rope_kv_write_kernel[grid](
        qkv, rope, positions, cache_k, cache_v, q,
        row_start, L, H, D, S, rope.shape[0],
        qkv.stride(0), qkv.stride(1),
        rope.stride(0), rope.stride(1), rope.stride(2),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
        enable_fp_fusion=False)  # keep x0*cos - x1*sin as two roundings, like the reference
    return q


INTERPRETED = interpreted(_rope_kv_write_kernel)
