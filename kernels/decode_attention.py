"""Split-KV (flash-decoding) attention for one query per row over the filled part of the KV cache.

Reference: llamagen_core2.decode.block_ops.decode_attention_reference.

    q [R, H, 1, D] at sequence position `position` ([1] int on the device), cache_k/cache_v [rows_total, H, S, D]
    (q's dtype), cache rows row_start..row_start+R-1, key_valid None or bool [rows_total, S]
    -> out [R, H, 1, D] in q's dtype
    key p is attended iff p <= position and (key_valid is None or key_valid[row, p] or p == position)

Launch 1, grid (R * H, NUM_SPLITS): the program for (row, head, split) reads `position` from device memory and
takes its share of the filled keys 0..position: the range is cut into NUM_SPLITS chunks of equal length
(rounded up to BLOCK_N keys), so the work is spread over the splits at every position (a split whose chunk
starts beyond `position` has none: short prefixes use fewer splits) and one CUDA graph serves every step. It walks its chunk BLOCK_N keys at a time with an online softmax in fp32 (scores in log2 units, exp2),
loading only attended keys (masked loads: positions beyond `position`, or masked prefix keys, are never read
into the result) and writes a partial (max, sum, acc[D]) in fp32 -- (-inf, 0, 0) for an empty chunk.
Launch 2, grid (R * H): combines the NUM_SPLITS partials with their max-rescaled weights. With one split the
first launch normalises and writes the output itself (one launch, no combine).
The number of splits is a function of (R, H, S, SMs) only (`num_kv_splits` with the cache length S as the
bound on the filled keys: no split when rows x heads fill the GPU, else the smallest chunk of >= 128 keys that
fits the grid), never of the device position, so one CUDA graph serves every position.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..decode.op_checks import check_decode_attention_args, check_unit_stride
from ..errors import InvalidArgument
from .dispatch import interpreted, multiprocessor_count

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


@triton.jit
def _decode_attention_split_kernel(
    q_ptr, cache_k_ptr, cache_v_ptr,        # [R, H, 1, D], [rows_total, H, S, D] x2 (unit stride on D)
    key_valid_ptr, position_ptr,            # [rows_total, S] uint8 (viewed bool), [1] int
    out_ptr,                                # [R, H, 1, D] (written only when NUM_SPLITS == 1)
    part_acc_ptr, part_max_ptr, part_sum_ptr,  # [R*H, NUM_SPLITS, D], [R*H, NUM_SPLITS] x2 fp32
    row_start, n_heads, head_dim, qk_scale,  # qk_scale = log2(e) / sqrt(D)
    stride_q_r, stride_q_h,
    stride_k_r, stride_k_h, stride_k_s,
    stride_v_r, stride_v_h, stride_v_s,
    stride_valid_r,
    stride_out_r, stride_out_h,
    HAS_KEY_VALID: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    r = row_head // n_heads
    h = row_head % n_heads
    position = tl.load(position_ptr).to(tl.int32)
    n_keys = position + 1
    chunk = tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_keys)

    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + r.to(tl.int64) * stride_q_r + h * stride_q_h + dims, mask=dim_ok, other=0.0)
    q = q.to(tl.float32) * qk_scale
    cache_row = (row_start + r).to(tl.int64)
    k_base = cache_k_ptr + cache_row * stride_k_r + h.to(tl.int64) * stride_k_h
    v_base = cache_v_ptr + cache_row * stride_v_r + h.to(tl.int64) * stride_v_h

    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        attend = keys < hi
        if HAS_KEY_VALID:
            valid = tl.load(key_valid_ptr + cache_row * stride_valid_r + keys, mask=attend, other=0)
            attend = attend & ((valid != 0) | (keys == position))
        tile_ok = attend[:, None] & dim_ok[None, :]
        k = tl.load(k_base + keys[:, None].to(tl.int64) * stride_k_s + dims[None, :], mask=tile_ok, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)          # [BLOCK_N], log2 units
        scores = tl.where(attend, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)           # a fully masked tile: no inf - inf
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe)                                    # 0 where not attended
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_v_s + dims[None, :], mask=tile_ok, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i
        tl.store(out_ptr + r.to(tl.int64) * stride_out_r + h * stride_out_h + dims,
                 out.to(out_ptr.dtype.element_ty), mask=dim_ok)
    else:
        part = row_head.to(tl.int64) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part * head_dim + dims, acc, mask=dim_ok)
        tl.store(part_max_ptr + part, m_i)
        tl.store(part_sum_ptr + part, l_i)


@triton.jit
def _decode_attention_combine_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr,  # [R*H, NUM_SPLITS, D], [R*H, NUM_SPLITS] x2 fp32
    out_ptr,                                   # [R, H, 1, D]
    n_heads, head_dim,
    stride_out_r, stride_out_h,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row_head = tl.program_id(0)
    r = row_head // n_heads
    h = row_head % n_heads
    splits = tl.arange(0, BLOCK_SPLITS)
    split_ok = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    part = row_head.to(tl.int64) * NUM_SPLITS + splits
    m = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    m_all = tl.max(m, axis=0)  # finite: the split holding key `position` always attends to it
    weight = tl.exp2(m - m_all)  # 0 for empty splits (m = -inf)
    acc = tl.load(part_acc_ptr + part[:, None] * head_dim + dims[None, :],
                  mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * l, axis=0)
    tl.store(out_ptr + r.to(tl.int64) * stride_out_r + h * stride_out_h + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_ok)


FILL_FRACTION = 0.8  # rows x heads >= 0.8 x SMs: the GPU is (almost) full without a split (FA3)
MIN_CHUNK = 128      # never split into chunks of fewer keys (FlashInfer's decode scheduler)
PROGRAMS_PER_SM = 2  # the split grid's target: two resident 4-warp programs per SM to cover DRAM latency


def num_kv_splits(rows: int, n_heads: int, filled_bound: int, sm_count: int, block_n: int = 64) -> int:
    """KV splits for `rows` x `n_heads` (row, head) programs over at most `filled_bound` keys on `sm_count` SMs.

    One split (one launch, no combine) when rows x heads >= FILL_FRACTION x SMs (FA3's num_splits_heuristic:
    "16 rows x 20 heads" is not split) or when the keys fit one MIN_CHUNK. Otherwise FlashInfer's rule: the
    smallest chunk, >= MIN_CHUNK keys and a multiple of block_n, such that rows x heads x splits stays within
    PROGRAMS_PER_SM x SMs, capped at MAX_SPLITS. filled_bound is a host bound (the launcher's max_end), never
    the device position."""
    programs = rows * n_heads
    if programs >= FILL_FRACTION * sm_count or filled_bound <= MIN_CHUNK:
        return 1
    most_splits = max(1, (PROGRAMS_PER_SM * sm_count) // programs)
    chunk = max(MIN_CHUNK, triton.cdiv(filled_bound, most_splits))
    chunk = triton.cdiv(chunk, block_n) * block_n
    return min(triton.cdiv(filled_bound, chunk), MAX_SPLITS)


def launch_config(rows: int, n_heads: int, filled_bound: int, head_dim: int, on_gpu: bool,
                  sm_count: int = 132) -> tuple[int, int, int, int]:
    """(NUM_SPLITS, BLOCK_N, BLOCK_D, num_warps) from the shapes, the host bound on the filled keys and the
    device (never the position).

    BLOCK_D covers the head (100 -> 128, masked); BLOCK_N keeps a K or V tile at 4096 elements (64 keys at
    D=64: 8 KB of bf16 per load, 32 fp32 per thread at 4 warps; ptxas 13.4 for sm_90a: 96-168 registers,
    no spills, for the GPT-B/XL/3B configs). Splits: `num_kv_splits`. Under the interpreter: one split (fewest
    programs); tests pass num_splits to exercise the combine."""
    block_d = triton.next_power_of_2(head_dim)
    block_n = max(16, min(64, 4096 // block_d))
    if not on_gpu:
        return 1, block_n, block_d, 4
    return num_kv_splits(rows, n_heads, filled_bound, sm_count, block_n), block_n, block_d, 4


def combine_launch_config(num_splits: int, block_d: int) -> tuple[int, int]:
    """(BLOCK_SPLITS, num_warps) of the combine launch: all partials of one (row, head) in one tile; one warp
    while the tile is <= 2048 fp32 (64 per thread), else 4."""
    block_splits = triton.next_power_of_2(num_splits)
    return block_splits, 1 if block_splits * block_d <= 2048 else 4


def decode_attention_triton(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, row_start: int,
                            position: torch.Tensor, key_valid: Optional[torch.Tensor], max_end: int,
                            num_splits: Optional[int] = None) -> torch.Tensor:
    """Launcher: see the module doc. `max_end` is only validated (the kernel reads the position on the device):
    the split is sized from the cache length S, so max_end changes neither the work nor the result (a tighter
    bound would change the split count, hence the rounding; see docs/decode_kernels.md). `num_splits` overrides
    launch_config's choice (tests, benchmarks)."""
    R, H, S, D = check_decode_attention_args(q, cache_k, cache_v, row_start, position, key_valid, max_end)
    check_unit_stride(q=q, cache_k=cache_k, cache_v=cache_v, key_valid=key_valid)
    on_gpu = q.device.type == "cuda" and not INTERPRETED
    splits, block_n, block_d, num_warps = launch_config(R, H, S, D, on_gpu,
                                                        multiprocessor_count(q.device) if on_gpu else 132)
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
            raise InvalidArgument(f"num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
        splits = num_splits
    out = torch.empty(R, H, 1, D, dtype=q.dtype, device=q.device)
    if R == 0:
        return out
    if splits > 1:
        part_acc = torch.empty(R * H, splits, D, dtype=torch.float32, device=q.device)
        part_max = torch.empty(R * H, splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty(R * H, splits, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_max = part_sum = out  # never touched with one split
    valid = key_valid.view(torch.uint8) if key_valid is not None else position  # dummy pointer when None
    _decode_attention_split_kernel[(R * H, splits)](
        q, cache_k, cache_v, valid, position, out, part_acc, part_max, part_sum,
        row_start, H, D, LOG2E / math.sqrt(D),
        q.stride(0), q.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        key_valid.stride(0) if key_valid is not None else 0,
        out.stride(0), out.stride(1),
        HAS_KEY_VALID=key_valid is not None, NUM_SPLITS=splits, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps)
    if splits > 1:
        block_splits, combine_warps = combine_launch_config(splits, block_d)
        _decode_attention_combine_kernel[(R * H,)](
            part_acc, part_max, part_sum, out, H, D, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, BLOCK_SPLITS=block_splits, BLOCK_D=block_d, num_warps=combine_warps)
    return out


INTERPRETED = interpreted(_decode_attention_split_kernel)
