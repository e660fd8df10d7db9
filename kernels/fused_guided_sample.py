"""Fused guidance + sampling: mix + temperature + top-k + top-p + sample in two Triton launches.

Contract (same semantics as `llamagen_core2.guidance.guided_sample`, the torch reference):
    cond, uncond, weak : [B, V] logits (any float dtype, read once, computed in fp32)
    mode               : "cond" | "cfg" | "fast" | "slow"  (see guidance/mixing.py for the formulas)
    cfg_scale, w2s_scale, temperature, top_k, top_p : Python numbers or per-row tensors [B]
    seeds, offset      : Philox keys (an int, or an int64 tensor [1] or [B]) and the counter base
                         (an int, or an int64 tensor [1] -- or [B], one base per row -- that may live
                         on the device); the counter layout is `llamagen_core2.guidance.philox`'s, and the
                         torch reference draws the same uniforms, so both backends give the same tokens
    returns tokens LongTensor [B] (and the fp32 mixed logits [B, V] when return_mixed=True).

Two launches, no sort, no host synchronisation, scratch sized from (B, V) only -- graph-capturable.
docs/sampling.md has the design, why, the cost model and what is measured.

1. `_mix_race_kernel`, grid (row groups, blocks per row): each program takes a block of columns of
   its rows and loops over it in chunks: mixes in fp32 (the reference association `u + s (c - u)`;
   FMA contraction is disabled, so the result is bit-identical to `guidance.mix_guidance`), divides
   by the temperature with IEEE division (x), adds the race noise s = x - log(-log U) with
   U = tl.rand(key, counter), writes x and s to scratch (only when a filter flag is on) and
   per-block partials: the first index of the largest s (the unfiltered race winner) and, when a
   row may be greedy or top-p needs the row max, of the largest x.
2. `_select_kernel`, one program per row (or per group of small rows): combines the partials. With
   no top-k / top-p the token is the unfiltered race winner and no row is re-read. Otherwise the
   kept set is {key >= threshold} (keys: the order-preserving int32 image of x; LlamaGen keeps
   every value >= the k-th, ties included; top-p keeps the smallest kept key v whose
   strictly-larger mass, over the top-k kept set, is <= p, the crossing token included) and the
   token is the race winner over it -- found without the threshold in the common case:
   * the unfiltered winner w is the winner over any kept set that contains it, and w is kept iff
     count(key > key_w) < k (and, top-p, mass(key > key_w) <= p * Z_k): one pass over the row's
     keys, resident in registers (V <= 16384) or streamed from scratch;
   * a rejected candidate t bounds the kept set from below (every kept key is > key_t), so the
     next candidate is the race winner above key_t, tested the same way (each test pass also
     finds the winner above the candidate it tests). With top-k and top-p both on, Z_k (the top-k
     mass) is bracketed by the candidates' ranks; an undecided top-p test narrows the bracket;
   * after `rejection_rounds` rejections a bounded exact path finishes the row: the k-th key and
     the top-p cut by bisection (<= 32 passes each), then one race pass over the kept set;
   * select="torch": the threshold comes from torch.topk / torch.sort between the two launches
     (`torch_select_thresholds`) and the kernel only finishes the race (the candidate that
     `kernels/dispatch.py` times against the rejection select, `kernels/timed_choice.py`);
   * temperature 0 = greedy: the first index of the largest mixed logit (like torch.argmax).
   Exact ties at the top-p cut (all kept) and top-p mass rounding differ from the reference as
   docs/sampling.md describes; every path gives the same tokens (the masses of one row are always
   summed over the same tile in the same order, so their bounds are consistent).
NaN logits give an unspecified token (the engine detects NaN/inf separately).

Every launch setting comes from `launch_config(batch, vocab, device)` (documented there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgument, check_finite_scale, check_sampling_args
from ..guidance.config import MODE_IDS, MODE_TABLE, check_mode, reads_uncond
from ..guidance.philox import check_offset, check_seeds, counter_strides, per_row_offsets
from .dispatch import interpreted, multiprocessor_count

MAX_VOCAB = 65536  # rows beyond 16384 entries are streamed from scratch by the select kernel
COND, FAST, SLOW = (tl.constexpr(MODE_IDS[m]) for m in ("cond", "fast", "slow"))  # the MODE constexpr's values
INT32_MIN = tl.constexpr(-2147483648)
INT32_MAX = tl.constexpr(2147483647)
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _ordered_key(x):
    """Map fp32 to int32 so that integer order == float order (-0.0 is folded into +0.0 first)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """Inverse of _ordered_key (up to the sign of zero)."""
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _floor_mid(lo, hi):
    """floor((lo + hi) / 2) for int32 without overflow."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


@triton.jit
def _row_knob(ptr, value, rows, row_ok, PER_ROW: tl.constexpr, DTYPE: tl.constexpr):
    """[R] knob: loaded per row, or the scalar kernel argument broadcast."""
    if PER_ROW:
        return tl.load(ptr + rows, mask=row_ok, other=0).to(DTYPE)
    else:
        return tl.zeros(rows.shape, dtype=DTYPE) + value


# ------------------------------------------------------------------ phase 1: mix + race noise


@triton.jit
def _mixed_tile(cond_ptr, uncond_ptr, weak_ptr, s_cfg, a_w2s, rows64, cols, valid,
                stride_c, stride_u, stride_w, MODE: tl.constexpr, CFG_MIX: tl.constexpr):
    """fp32 mixed logits [R, C] with the reference association (guidance.mix_guidance)."""
    c = tl.load(cond_ptr + rows64[:, None] * stride_c + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    if MODE == COND:
        mixed = c
    elif MODE == FAST:
        mixed = tl.load(weak_ptr + rows64[:, None] * stride_w + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    else:
        mixed = c
        if CFG_MIX:
            u = tl.load(uncond_ptr + rows64[:, None] * stride_u + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            # guidance.config.cfg_mixes, per row: a scale <= 1 means cond only
            mixed = tl.where(s_cfg[:, None] > 1.0, u + s_cfg[:, None] * (c - u), c)
        if MODE == SLOW:
            w = tl.load(weak_ptr + rows64[:, None] * stride_w + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            mixed = w + a_w2s[:, None] * (mixed - w)
    return mixed


@triton.jit
def _mix_race_kernel(
    cond_ptr, uncond_ptr, weak_ptr,          # [B, V] logits, unit stride along V
    mixed_ptr,                               # [B, V] fp32 out (WRITE_MIXED)
    x_ptr, s_ptr,                            # [B, V] fp32 scratch: scaled logits, race scores (STORE_ROWS)
    part_f_ptr, part_i_ptr,                  # [2, B, NB] fp32 / int32 per-block partials (max, first index)
    cfg_ptr, cfg_val, w2s_ptr, w2s_val, temp_ptr, temp_val,   # knobs: [B] tensors or scalars
    seeds_ptr, offset_ptr, offset_val,       # int64 Philox keys [1] or [B]; counter base(s) [1] or [B], or a value
    n_rows, vocab, n_blocks, seed_stride, offset_stride, counter_row_stride,
    stride_c, stride_u, stride_w, stride_m,
    MODE: tl.constexpr, CFG_MIX: tl.constexpr, KNOBS_PER_ROW: tl.constexpr, OFFSET_FROM_PTR: tl.constexpr,
    WRITE_MIXED: tl.constexpr, SCALE: tl.constexpr, ARGMAX_X: tl.constexpr, SAMPLE: tl.constexpr,
    STORE_ROWS: tl.constexpr, BLOCK_ROWS: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
):
    """Per (row group, column block): mix, x = mixed / temperature (SCALE; else the temperature is
    1 or 0 and x = mixed), s = x + Gumbel noise (SAMPLE), x and s to scratch (STORE_ROWS), and the
    block's (max, first index) of x (ARGMAX_X: some row may be greedy, or top-p needs the row max) and of
    s."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)       # [R]
    block = tl.program_id(1)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    s_cfg = _row_knob(cfg_ptr, cfg_val, rows, row_ok, KNOBS_PER_ROW, tl.float32)
    a_w2s = _row_knob(w2s_ptr, w2s_val, rows, row_ok, KNOBS_PER_ROW, tl.float32)
    if SCALE:
        temp = _row_knob(temp_ptr, temp_val, rows, row_ok, KNOBS_PER_ROW, tl.float32)
        divisor = tl.where(temp == 0.0, 1.0, temp)[:, None]              # greedy rows keep x = mixed
    if SAMPLE:
        seed = tl.load(seeds_ptr + rows64 * seed_stride, mask=row_ok, other=0)
        if OFFSET_FROM_PTR:
            base = tl.load(offset_ptr + rows64 * offset_stride, mask=row_ok, other=0) + rows64 * counter_row_stride
        else:
            base = offset_val + rows64 * counter_row_stride

    best_x = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    best_xi = tl.zeros([BLOCK_ROWS], tl.int32)
    best_s = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    best_si = tl.zeros([BLOCK_ROWS], tl.int32)
    for chunk in range(CHUNKS):
        start = (block * CHUNKS + chunk) * CHUNK
        cols = start + tl.arange(0, CHUNK)                               # [C]
        valid = row_ok[:, None] & (cols < vocab)[None, :]                # [R, C]
        mixed = _mixed_tile(cond_ptr, uncond_ptr, weak_ptr, s_cfg, a_w2s, rows64, cols, valid,
                            stride_c, stride_u, stride_w, MODE, CFG_MIX)
        if WRITE_MIXED:
            tl.store(mixed_ptr + rows64[:, None] * stride_m + cols[None, :], mixed, mask=valid)
        if SCALE:
            mixed = tl.fdiv(mixed, divisor, ieee_rounding=True)          # IEEE, like torch's division
        x = tl.where(valid, mixed, float("-inf"))
        row_at = rows64[:, None] * vocab + cols[None, :]
        if STORE_ROWS:
            tl.store(x_ptr + row_at, x, mask=valid)
        if ARGMAX_X:
            # strict > keeps the earlier chunk on ties: first index, like torch.argmax
            cx, ci = tl.max(x, axis=1, return_indices=True)
            better = cx > best_x
            best_xi = tl.where(better, start + ci, best_xi)
            best_x = tl.where(better, cx, best_x)
        if SAMPLE:
            uniform = tl.rand(seed[:, None], base[:, None] + cols[None, :])
            s = x - tl.log(-tl.log(uniform))
            s = tl.where(valid, tl.maximum(s, -FLT_MAX), float("-inf"))  # U = 0 must not tie with removed tokens
            if STORE_ROWS:
                tl.store(s_ptr + row_at, s, mask=valid)
            cs, csi = tl.max(s, axis=1, return_indices=True)
            better = cs > best_s
            best_si = tl.where(better, start + csi, best_si)
            best_s = tl.where(better, cs, best_s)

    plane = n_rows * n_blocks
    at = rows * n_blocks + block
    if ARGMAX_X:
        tl.store(part_f_ptr + at, best_x, mask=row_ok)
        tl.store(part_i_ptr + at, best_xi, mask=row_ok)
    if SAMPLE:
        tl.store(part_f_ptr + plane + at, best_s, mask=row_ok)
        tl.store(part_i_ptr + plane + at, best_si, mask=row_ok)


@triton.jit
def _combine_argmax(part_f_ptr, part_i_ptr, at, pmask):
    """Per row: the largest value over the block partials and its first index (blocks in column order)."""
    best = tl.load(part_f_ptr + at, mask=pmask, other=float("-inf"))
    top = tl.max(best, axis=1)
    index = tl.load(part_i_ptr + at, mask=pmask, other=INT32_MAX)
    return top, tl.min(tl.where(pmask & (best == top[:, None]), index, INT32_MAX), axis=1)


# ------------------------------------------------------------------ phase 2: select + finish the race
#
# Keys are the order-preserving int32 images of x (_ordered_key); INT32_MIN marks padding, below every real key
# (even -inf's). "Mass" is sum exp(x - row max) in fp32. Every pass below reduces one tile shape in one order,
# so a mass summed over a subset of another's entries is never larger (float addition is monotone): bounds
# taken from different passes stay consistent with each other and with the exact path.

TEST = tl.constexpr(1)      # the candidate's rank / masses are needed
SEARCH = tl.constexpr(2)    # the candidate was rejected: the next one is the race winner above its key
REFINE = tl.constexpr(3)    # top-k + top-p: the top-k mass must be bracketed more tightly to judge the candidate
EXACT = tl.constexpr(4)     # rejection budget spent: the bounded exact path finishes the row


@triton.jit
def _tile_stats(key, s, start, above, mid, shift, COUNT: tl.constexpr, MASS: tl.constexpr,
                ARGMAX: tl.constexpr, MID_COUNT: tl.constexpr, MID_MASS: tl.constexpr, C: tl.constexpr):
    """One [R, C] tile of a row pass (columns start..start+C-1), per row: (count above, mass above, mass at or
    above, best race score above, its column, its key, count at or above mid, mass at or above mid), where
    "above" is `key > above` and "at or above mid" is `key >= mid`. Parts not asked for are 0 / -inf."""
    zero_i = tl.zeros(above.shape, tl.int32)
    zero_f = tl.zeros(above.shape, tl.float32)
    n_above, m_above, m_at, n_mid, m_mid = zero_i, zero_f, zero_f, zero_i, zero_f
    best_s = tl.full(above.shape, float("-inf"), tl.float32)
    best_i, best_k = zero_i, tl.full(above.shape, INT32_MIN, tl.int32)
    gt = key > above[:, None]
    if COUNT:
        n_above = tl.sum(gt.to(tl.int32), axis=1)
    if MID_COUNT:
        n_mid = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1)
    if MASS or MID_MASS:
        e = tl.exp(tl.where(key > INT32_MIN, _key_value(key) - shift[:, None], float("-inf")))
        if MASS:
            m_above = tl.sum(tl.where(gt, e, 0.0), axis=1)
            m_at = tl.sum(tl.where(key >= above[:, None], e, 0.0), axis=1)
        if MID_MASS:
            m_mid = tl.sum(tl.where(key >= mid[:, None], e, 0.0), axis=1)
    if ARGMAX:
        best_s, local = tl.max(tl.where(gt, s, float("-inf")), axis=1, return_indices=True)
        best_k = tl.max(tl.where(tl.arange(0, C)[None, :] == local[:, None], key, INT32_MIN), axis=1)
        best_i = start + local
    return n_above, m_above, m_at, best_s, best_i, best_k, n_mid, m_mid


@triton.jit
def _row_pass(key_res, x_rows, s_rows, row_ok, vocab, above, mid, shift,
              COUNT: tl.constexpr, MASS: tl.constexpr, ARGMAX: tl.constexpr, MID_COUNT: tl.constexpr,
              MID_MASS: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_V: tl.constexpr, SCAN: tl.constexpr):
    """_tile_stats over whole rows: on the resident keys (race scores loaded only for an argmax), or streamed
    from scratch in SCAN-column steps (rows too long for registers: V > 16384). Streaming keeps the step order,
    so the sums and the first-index rule are those of one pass in column order."""
    if RESIDENT:
        cols = tl.arange(0, BLOCK_V)
        s = tl.zeros([1, 1], tl.float32)
        if ARGMAX:
            s = tl.load(s_rows[:, None] + cols[None, :], mask=row_ok[:, None] & (cols < vocab)[None, :],
                        other=float("-inf"))
        out = _tile_stats(key_res, s, 0, above, mid, shift, COUNT, MASS, ARGMAX, MID_COUNT, MID_MASS, BLOCK_V)
    else:
        n_above = tl.zeros(above.shape, tl.int32)
        n_mid = n_above
        best_i = n_above
        m_above = tl.zeros(above.shape, tl.float32)
        m_at = m_above
        m_mid = m_above
        best_s = tl.full(above.shape, float("-inf"), tl.float32)
        best_k = tl.full(above.shape, INT32_MIN, tl.int32)
        for start in tl.range(0, BLOCK_V, SCAN):
            cols = start + tl.arange(0, SCAN)
            in_row = row_ok[:, None] & (cols < vocab)[None, :]
            key = _ordered_key(tl.load(x_rows[:, None] + cols[None, :], mask=in_row, other=float("-inf")))
            key = tl.where(in_row, key, INT32_MIN)
            s = tl.zeros([1, 1], tl.float32)
            if ARGMAX:
                s = tl.load(s_rows[:, None] + cols[None, :], mask=in_row, other=float("-inf"))
            c_n, c_m, c_at, c_s, c_i, c_k, c_nm, c_mm = _tile_stats(key, s, start, above, mid, shift, COUNT, MASS,
                                                                     ARGMAX, MID_COUNT, MID_MASS, SCAN)
            n_above += c_n
            m_above += c_m
            m_at += c_at
            n_mid += c_nm
            m_mid += c_mm
            better = c_s > best_s                                    # strict: the earlier step wins ties
            best_i = tl.where(better, c_i, best_i)
            best_k = tl.where(better, c_k, best_k)
            best_s = tl.where(better, c_s, best_s)
        out = n_above, m_above, m_at, best_s, best_i, best_k, n_mid, m_mid
    return out


@triton.jit
def _judge(tested, n_above, m_above, m_at, key_t, k, p, topk_on, topp_on, klo, zlo, khi, zhi, z_all, p_floor):
    """Judge candidates t whose stats are known (rows `tested`): accept / reject / undecided (-> refine).

    top-k keeps t iff n_above = count(key > key_t) < k. t's rank also narrows the bracket of the k-th key,
    kept as klo <= kth < khi with count(key >= klo) >= k, count(key >= khi) < k and their masses zlo, zhi.
    top-p keeps t iff M(t) = m_above / Z_k <= p, Z_k = mass(key >= kth): known exactly without top-k
    (z_all) or once the bracket is one key wide; otherwise zmin <= Z_k <= zmax, and t is undecided when
    p * zmin < m_above <= p * zmax. A top-p rejection raises p_floor (every top-p kept key is above it)."""
    k_ok = (~topk_on) | (n_above < k)
    next_key = key_t + 1                                                  # count(key >= key_t + 1) = n_above
    up = tested & topk_on & ~k_ok & (next_key > klo)
    klo = tl.where(up, next_key, klo)
    zlo = tl.where(up, m_above, zlo)
    down = tested & topk_on & k_ok & (next_key < khi)
    khi = tl.where(down, next_key, khi)
    zhi = tl.where(down, m_above, zhi)
    z_max = tl.where(topk_on, zlo, z_all)
    exact = (~topk_on) | (klo + 1 == khi)
    z_min = tl.where(exact, z_max, tl.maximum(zhi, m_at))                 # t kept by top-k: Z_k >= mass(>= key_t)
    p_ok = (~topp_on) | (m_above <= p * z_min)
    p_bad = topp_on & (m_above > p * z_max)
    accept = tested & k_ok & p_ok
    reject = tested & ((~k_ok) | p_bad)
    p_floor = tl.where(tested & k_ok & p_bad, tl.maximum(p_floor, key_t), p_floor)
    return accept, reject, klo, zlo, khi, zhi, p_floor


@triton.jit
def _pick_mid(klo, khi, refines, xmax, VALUE_STEPS: tl.constexpr):
    """A key strictly inside (klo, khi) (needs klo + 1 < khi): the midpoint of their values for the first
    VALUE_STEPS refinements (masses shrink with values; below xmax - 128 every exp is 0 in fp32, so that is
    the lowest useful value), the integer midpoint afterwards or when the value one does not split: <= 32
    integer steps, so the refinement is bounded."""
    int_mid = _floor_mid(klo, khi)
    floor_v = xmax - 128.0
    lo_v = _key_value(klo)
    lo_v = tl.where(lo_v > floor_v, lo_v, floor_v)                        # NaN image of the lowest keys: floor
    value_key = _ordered_key(lo_v * 0.5 + _key_value(khi - 1) * 0.5)
    ok = (refines <= VALUE_STEPS) & (value_key > klo) & (value_key < khi)
    return tl.where(ok, value_key, int_mid)


@triton.jit
def _kth_bisect(key_res, x_rows, s_rows, row_ok, vocab, need, k, klo, zlo, khi, zhi, shift,
                MASS: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_V: tl.constexpr, SCAN: tl.constexpr):
    """Exact k-th largest key of the rows `need` by bisection of their bracket (klo <= kth < khi, see _judge;
    <= 32 passes): returns (kth, mass(key >= kth)) there, the inputs elsewhere."""
    need = need & (klo + 1 < khi)
    while tl.max(need.to(tl.int32), axis=0) > 0:
        mid = _floor_mid(klo, khi)
        stats = _row_pass(key_res, x_rows, s_rows, row_ok, vocab, mid, mid, shift, False, False, False, True, MASS,
            RESIDENT, BLOCK_V, SCAN)
        n_mid = stats[6]
        m_mid = stats[7]
        enough = n_mid >= k
        klo = tl.where(need & enough, mid, klo)
        zlo = tl.where(need & enough, m_mid, zlo)
        khi = tl.where(need & ~enough, mid, khi)
        zhi = tl.where(need & ~enough, m_mid, zhi)
        need = need & (klo + 1 < khi)
    return klo, zlo


@triton.jit
def _exact_finish(key_res, x_rows, s_rows, row_ok, vocab, rows_in, xmax, shift, k, p, topk_on, topp_on,
                  klo, zlo, khi, zhi, z_all, p_floor, TOPP: tl.constexpr, RESIDENT: tl.constexpr,
                  BLOCK_V: tl.constexpr, SCAN: tl.constexpr):
    """The bounded exact path for the rows `rows_in`: the k-th key by bisection (<= 32 passes), the top-p cut
    v = the smallest key with mass(key > v) <= p * Z_k by bisection (<= 32 passes), then the race over
    {key >= max(kth, v)} (one pass). Returns the token."""
    top_key = _ordered_key(xmax)                                          # (xmax is known with top-p only)
    if TOPP:
        khi = tl.where(khi == INT32_MAX, top_key + 1, khi)               # count(key > row max) = 0 < k
    kth, z_k = _kth_bisect(key_res, x_rows, s_rows, row_ok, vocab, rows_in & topk_on, k, klo, zlo, khi, zhi,
                           shift, TOPP, RESIDENT, BLOCK_V, SCAN)
    kth = tl.where(topk_on, kth, INT32_MIN + 1)
    z_k = tl.where(topk_on, z_k, z_all)
    floor = kth - 1                                                       # kept: key > floor
    if TOPP:
        lo = tl.maximum(p_floor, kth - 1)                                 # M(lo) > p: M(kth - 1) = 1
        hi = top_key                                                      # M(row max) = 0 <= p
        need = rows_in & topp_on & (lo + 1 < hi)
        while tl.max(need.to(tl.int32), axis=0) > 0:
            mid = _floor_mid(lo, hi)
            stats = _row_pass(key_res, x_rows, s_rows, row_ok, vocab, mid, mid, shift, False, True, False, False,
                False, RESIDENT, BLOCK_V, SCAN)
            m_above = stats[1]
            small = m_above <= p * z_k
            hi = tl.where(need & small, mid, hi)
            lo = tl.where(need & ~small, mid, lo)
            need = need & (lo + 1 < hi)
        floor = tl.where(topp_on, tl.maximum(floor, hi - 1), floor)
    stats = _row_pass(key_res, x_rows, s_rows, row_ok, vocab, floor, floor, shift, False, False, True, False, False,
        RESIDENT, BLOCK_V, SCAN)
    token = stats[4]
    return token


@triton.jit
def _race_by_rejection(key_res, x_rows, s_rows, row_ok, vocab, win, key_w, xmax, shift, k, p, topk_on, topp_on,
                       TOPK: tl.constexpr, TOPP: tl.constexpr, RESIDENT: tl.constexpr, BLOCK_V: tl.constexpr,
                       SCAN: tl.constexpr, MAX_REJECTIONS: tl.constexpr, VALUE_STEPS: tl.constexpr):
    """Token per row: the race winner over the top-k / top-p kept set, without selecting the k-th value when
    the candidate's rank settles it (docs/sampling.md#the-select-path).

    The unfiltered winner w is the winner over any kept set that contains it. One pass counts the keys above
    it (and, for top-p, sums masses): accepted -> done. A rejected candidate t bounds the kept set from below
    (every kept key is > key_t), so the next candidate is the race winner above key_t, tested the same way;
    each of these passes also finds the winner above the candidate it tests, in case it is rejected. With
    top-k and top-p both on, an undecided top-p test narrows the k-th key's bracket instead. After
    MAX_REJECTIONS rejections (or at once when it is 0) the row takes the bounded exact path."""
    LOW: tl.constexpr = INT32_MIN + 1
    on = topk_on | topp_on
    full = tl.full(win.shape, LOW, tl.int32)
    klo = full
    khi = tl.full(win.shape, INT32_MAX, tl.int32)
    zhi = tl.zeros(win.shape, tl.float32)
    p_floor = tl.full(win.shape, INT32_MIN, tl.int32)
    t = win
    key_t = key_w
    if MAX_REJECTIONS == 0:
        z_all = zhi
        if TOPP:
            stats = _row_pass(key_res, x_rows, s_rows, row_ok, vocab, full, full, shift, False, False, False, False,
                True, RESIDENT, BLOCK_V, SCAN)
            z_all = stats[7]
        state = tl.where(on, EXACT, 0)
        zlo = z_all
    else:
        # the unfiltered winner's rank and masses (+ the total mass for top-p)
        stats = _row_pass(key_res, x_rows, s_rows, row_ok, vocab, key_t, full, shift, TOPK, TOPP, False, False, TOPP,
            RESIDENT, BLOCK_V, SCAN)
        n_above = stats[0]
        m_above = stats[1]
        m_at = stats[2]
        z_all = stats[7]
        zlo = z_all
        accept, reject, klo, zlo, khi, zhi, p_floor = _judge(on, n_above, m_above, m_at, key_t, k, p, topk_on,
                                                             topp_on, klo, zlo, khi, zhi, z_all, p_floor)
        rejections = reject.to(tl.int32)
        refines = tl.zeros(win.shape, tl.int32)
        mid = _pick_mid(klo, khi, refines, xmax, VALUE_STEPS)
        state = tl.where(accept | ~on, 0, tl.where(reject, tl.where(rejections >= MAX_REJECTIONS, EXACT, SEARCH),
                                                   REFINE))
        passes = 0
        while (tl.max(((state > 0) & (state < EXACT)).to(tl.int32), axis=0) > 0) & \
                (passes < 2 * MAX_REJECTIONS + VALUE_STEPS + 34):
            # two passes' worth of reductions in one sweep over the row, split so that the race scores and the
            # softmax numerators are not live at once (a resident 16384-key row then fits without spills)
            stats = _row_pass(key_res, x_rows, s_rows, row_ok, vocab, key_t, mid, shift, TOPK, TOPP, False,
                              TOPK and TOPP, TOPK and TOPP, RESIDENT, BLOCK_V, SCAN)
            c_n = stats[0]
            c_m = stats[1]
            c_at = stats[2]
            n_mid = stats[6]
            m_mid = stats[7]
            stats = _row_pass(key_res, x_rows, s_rows, row_ok, vocab, key_t, mid, shift, False, False, True, False,
                              False, RESIDENT, BLOCK_V, SCAN)
            next_t = stats[4]
            next_key = stats[5]
            testing = state == TEST
            refining = state == REFINE
            n_above = tl.where(testing, c_n, n_above)
            m_above = tl.where(testing, c_m, m_above)
            m_at = tl.where(testing, c_at, m_at)
            enough = n_mid >= k                                           # the refinement's pivot: mid <= kth?
            klo = tl.where(refining & enough, mid, klo)
            zlo = tl.where(refining & enough, m_mid, zlo)
            khi = tl.where(refining & ~enough, mid, khi)
            zhi = tl.where(refining & ~enough, m_mid, zhi)
            accept, reject, klo, zlo, khi, zhi, p_floor = _judge(testing | refining, n_above, m_above, m_at, key_t,
                                                                 k, p, topk_on, topp_on, klo, zlo, khi, zhi, z_all,
                                                                 p_floor)
            rejections += reject.to(tl.int32)
            refines += ((testing | refining) & ~(accept | reject)).to(tl.int32)
            move = reject | (state == SEARCH)                             # the winner above key_t is next
            t = tl.where(move, next_t, t)
            key_t = tl.where(move, next_key, key_t)
            state = tl.where(accept, 0, tl.where(move, TEST, state))
            state = tl.where(reject & (rejections >= MAX_REJECTIONS), EXACT, state)
            state = tl.where((testing | refining) & ~(accept | reject), REFINE, state)
            mid = _pick_mid(klo, khi, refines, xmax, VALUE_STEPS)
            passes += 1
        state = tl.where(state > 0, EXACT, state)                         # a safety net: passes are bounded anyway
    exact = state == EXACT
    if tl.max(exact.to(tl.int32), axis=0) > 0:
        t2 = _exact_finish(key_res, x_rows, s_rows, row_ok, vocab, exact, xmax, shift, k, p, topk_on, topp_on,
                           klo, zlo, khi, zhi, z_all, p_floor, TOPP, RESIDENT, BLOCK_V, SCAN)
        t = tl.where(exact, t2, t)
    return t


@triton.jit
def _resident_keys(x_ptr, rows64, row_ok, vocab, BLOCK_V: tl.constexpr):
    """[R, BLOCK_V] keys of the rows (INT32_MIN = padding), loaded from scratch into registers."""
    cols = tl.arange(0, BLOCK_V)
    in_row = row_ok[:, None] & (cols < vocab)[None, :]
    key = _ordered_key(tl.load(x_ptr + rows64[:, None] * vocab + cols[None, :], mask=in_row, other=float("-inf")))
    return tl.where(in_row, key, INT32_MIN)


@triton.jit
def _filtered_race(key_res, x_ptr, s_ptr, rows64, row_ok, vocab, win, xmax, k, p, topk_on, topp_on, threshold,
                   TOPK: tl.constexpr, TOPP: tl.constexpr, THRESHOLD: tl.constexpr, BLOCK_V: tl.constexpr,
                   SCAN: tl.constexpr, RESIDENT: tl.constexpr, MAX_REJECTIONS: tl.constexpr,
                   VALUE_STEPS: tl.constexpr):
    """Token per row: the race winner over the top-k / top-p kept set (key_res: the resident keys, or unused
    when the passes stream the rows). THRESHOLD: the kept set is given as {key >= threshold} (computed by
    torch: the `select="torch"` path); the winner stands if it is kept, else one streamed pass finds the
    winner above the threshold."""
    # [R] row pointers + int32 columns: no row-sized 64-bit address tensor stays live
    x_rows = x_ptr + rows64 * vocab
    s_rows = s_ptr + rows64 * vocab
    shift = tl.where(row_ok, xmax, 0.0)                                   # exp(x - row max) <= 1 (top-p)
    key_w = _ordered_key(tl.load(x_rows + win, mask=row_ok, other=0.0))
    on = topk_on | topp_on
    if THRESHOLD:
        t = win
        lost = on & (key_w < threshold)
        if tl.max(lost.to(tl.int32), axis=0) > 0:
            stats = _row_pass(key_res, x_rows, s_rows, row_ok, vocab, threshold - 1, threshold, shift, False, False,
                              True, False, False, False, BLOCK_V, SCAN)
            t2 = stats[4]
            t = tl.where(lost, t2, t)
    else:
        t = _race_by_rejection(key_res, x_rows, s_rows, row_ok, vocab, win, key_w, xmax, shift, k, p, topk_on,
                               topp_on, TOPK, TOPP, RESIDENT, BLOCK_V, SCAN, MAX_REJECTIONS, VALUE_STEPS)
    return t


@triton.jit
def _select_kernel(
    x_ptr, s_ptr, part_f_ptr, part_i_ptr,    # scratch written by _mix_race_kernel
    threshold_ptr,                           # [B] int32 kept-key thresholds (THRESHOLD: the torch select path)
    tokens_ptr,                              # [B] int64 out
    temp_ptr, temp_val, top_k_ptr, top_k_val, top_p_ptr, top_p_val,
    n_rows, vocab, n_blocks,
    KNOBS_PER_ROW: tl.constexpr, GREEDY: tl.constexpr, SAMPLE: tl.constexpr, TOPK: tl.constexpr,
    TOPP: tl.constexpr, THRESHOLD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_NB: tl.constexpr, SCAN: tl.constexpr, RESIDENT: tl.constexpr, MAX_REJECTIONS: tl.constexpr,
    VALUE_STEPS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    blocks = tl.arange(0, BLOCK_NB)
    pmask = row_ok[:, None] & (blocks < n_blocks)[None, :]
    at = rows[:, None] * n_blocks + blocks[None, :]
    plane = n_rows * n_blocks

    # The rejection select reads the rows' keys first: issued before the partials are combined, their load
    # overlaps that latency (only compiled when a filter flag is on; the torch path needs no row up front).
    key_res = tl.full([BLOCK_ROWS, 1], INT32_MIN, tl.int32)
    if RESIDENT and (TOPK or TOPP) and not THRESHOLD:
        key_res = _resident_keys(x_ptr, rows64, row_ok, vocab, BLOCK_V)
    token = tl.zeros([BLOCK_ROWS], tl.int32)
    xmax = tl.zeros([BLOCK_ROWS], tl.float32)
    if GREEDY or TOPP:  # the largest x (top-p: the softmax shift) and its first index (greedy)
        xmax, greedy_token = _combine_argmax(part_f_ptr, part_i_ptr, at, pmask)
        if GREEDY:
            token = greedy_token
    if SAMPLE:
        _, win = _combine_argmax(part_f_ptr + plane, part_i_ptr + plane, at, pmask)  # the unfiltered race winner
        temp = _row_knob(temp_ptr, temp_val, rows, row_ok, KNOBS_PER_ROW, tl.float32)
        sampled = temp != 0.0
        token = tl.where(sampled, win, token)
        if TOPK or TOPP:
            k = tl.minimum(_row_knob(top_k_ptr, top_k_val, rows, row_ok, KNOBS_PER_ROW, tl.int64), vocab).to(tl.int32)
            p = _row_knob(top_p_ptr, top_p_val, rows, row_ok, KNOBS_PER_ROW, tl.float32)
            topk_on = tl.zeros([BLOCK_ROWS], tl.int1)
            topp_on = tl.zeros([BLOCK_ROWS], tl.int1)
            if TOPK:
                topk_on = sampled & row_ok & (k > 0) & (k < vocab)
            if TOPP:
                topp_on = sampled & row_ok & (p < 1.0)
            threshold = tl.zeros([BLOCK_ROWS], tl.int32)
            if THRESHOLD:
                threshold = tl.load(threshold_ptr + rows, mask=row_ok, other=0)
            if tl.max((topk_on | topp_on).to(tl.int32), axis=0) > 0:
                t = _filtered_race(key_res, x_ptr, s_ptr, rows64, row_ok, vocab, win, xmax, k, p, topk_on,
                                   topp_on, threshold, TOPK, TOPP, THRESHOLD, BLOCK_V, SCAN,
                                   RESIDENT and not THRESHOLD, MAX_REJECTIONS, VALUE_STEPS)
                token = tl.where(topk_on | topp_on, t, token)
    tl.store(tokens_ptr + rows, token.to(tl.int64), mask=row_ok)


# ------------------------------------------------------------------ launch configuration

RESIDENT_ELEMENTS = 16384  # keys a select program keeps in registers (16 warps x 32 per thread)


@dataclass(frozen=True)
class LaunchConfig:
    rows_per_program: int   # R: rows per program in both kernels (power of 2)
    blocks_per_row: int     # NB: phase-1 programs per row (the vocabulary split); 1 = one per row
    chunk: int              # columns per phase-1 loop step (power of 2)
    chunks_per_block: int   # loop steps per phase-1 program; NB * chunk * chunks >= V
    mix_warps: int
    select_warps: int
    resident: bool          # the select kernel keeps its rows' keys in registers (else streams them per pass)
    scan_chunk: int         # columns per step when the select kernel streams rows from scratch
    rejection_rounds: int   # rejected candidates per row before the bounded exact path (0: exact path at once)
    value_steps: int        # top-k + top-p: refinements that split values before integer bisection


def launch_config(batch: int, vocab: int, device, *, blocks_per_row: Optional[int] = None,
                  rows_per_program: Optional[int] = None, resident: Optional[bool] = None,
                  scan_chunk: Optional[int] = None, rejection_rounds: int = 8, value_steps: int = 6) -> LaunchConfig:
    """Every launch setting of `fused_guided_sample`, from (batch, vocab, device) alone.

    GPU (why, for V = 16384 on an H100 / H200 with 132 SMs -- see docs/sampling.md):
      * select kernel: one program per row (rows of < 4096 entries are packed up to 4096 elements),
        num_warps = elements / 1024 clamped to [4, 16] (8 at least for packed rows). Up to 16384
        elements the keys stay in registers (16 warps: 32 keys per thread) and race scores are read
        from scratch only when a candidate is rejected; longer rows (V up to 65536) are streamed from
        scratch (L2) in 8192-column steps per pass with 16 warps -- linear in V, no register spill;
      * mix/race kernel: light 4-warp programs (~55 registers) over 1024-column chunks. This phase
        carries the bandwidth and the Philox arithmetic (~135 instructions per element), so it is
        split until there are ~8 programs per SM (enough resident warps to hide load latency) or
        the blocks shrink to 1024 columns: batch 1, 8 and 64 -> 16 blocks per row, batch 256 -> 8;
        a batch of >= 8 x SMs rows gets one program per row.
    CPU interpreter (TRITON_INTERPRET=1): every op costs Python overhead, so rows are packed up to
    65536 elements, kept resident, and a row is one block unless `blocks_per_row` asks otherwise.
    Overrides (tests force every path at small shapes; tuning): `blocks_per_row`, `rows_per_program`,
    `resident=False` + `scan_chunk` (the streamed passes), `rejection_rounds` (0 = every filtered row
    takes the bounded exact path), `value_steps`.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda" and not INTERPRETED
    row_block = triton.next_power_of_2(vocab)
    if rows_per_program is None:
        rows_per_program = max(1, min(256, (4096 if on_gpu else 65536) // row_block))
    rows = triton.next_power_of_2(max(1, int(rows_per_program)))
    max_blocks = max(1, row_block // 1024) if on_gpu else row_block
    if blocks_per_row is None:
        if on_gpu:
            row_programs = math.ceil(batch / rows)
            wanted = math.ceil(8 * multiprocessor_count(device) / row_programs)
            blocks_per_row = min(triton.next_power_of_2(wanted), max_blocks)
        else:
            blocks_per_row = 1
    blocks = min(triton.next_power_of_2(max(1, int(blocks_per_row))), row_block)
    block_cols = row_block // blocks
    chunk = min(block_cols, max(1, (1024 if on_gpu else 65536) // rows))
    elements = rows * row_block
    if resident is None:
        resident = elements <= RESIDENT_ELEMENTS or not on_gpu
    # packed rows run 2-D tiles: 8 warps keep them at ~16 values per thread
    select_warps = max(4 if rows == 1 else 8, min(16, elements // 1024)) if on_gpu else 4
    if scan_chunk is None:
        scan_chunk = (8192 if on_gpu else 65536) // rows
    scan_chunk = min(row_block, triton.next_power_of_2(max(1, int(scan_chunk))))
    if not isinstance(rejection_rounds, int) or rejection_rounds < 0:
        raise InvalidArgument(f"rejection_rounds must be an integer >= 0, got {rejection_rounds!r}")
    if not isinstance(value_steps, int) or value_steps < 0:
        raise InvalidArgument(f"value_steps must be an integer >= 0, got {value_steps!r}")
    return LaunchConfig(rows_per_program=rows, blocks_per_row=blocks, chunk=chunk,
                        chunks_per_block=block_cols // chunk, mix_warps=4, select_warps=select_warps,
                        resident=bool(resident), scan_chunk=scan_chunk, rejection_rounds=rejection_rounds,
                        value_steps=value_steps)


# ------------------------------------------------------------------ the torch select path

SELECT_PATHS = ("kernel", "torch")


def ordered_keys(x: torch.Tensor) -> torch.Tensor:
    """_ordered_key in torch: fp32 -> int32 with integer order == float order (-0.0 folded into +0.0)."""
    bits = torch.where(x == 0, torch.zeros_like(x), x).contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def torch_select_thresholds(x: torch.Tensor, top_k, top_p, *, top_k_max: int, topk: bool = True,
                            topp: bool = True) -> torch.Tensor:
    """The kept-set threshold per row for the `select="torch"` path: x [B, V] fp32 (mixed / temperature) ->
    int32 keys [B]; row b keeps {j: key(x_bj) >= threshold_b}. Graph-capturable (no host sync):
    top-k = the k-th value of torch.topk(x, top_k_max) (every value >= it is kept: LlamaGen's ties);
    top-p = the smallest kept value v whose strictly-larger mass (over the top-k kept set) is <= p, from a
    descending sort and an exclusive cumulative sum of exp(x - max) -- the kernel's rule, summed in another
    order (so a value whose mass is within rounding of p may be cut differently). top_k / top_p: numbers or
    [B] tensors; `top_k_max` >= every row's top_k (the caller knows it on the host)."""
    batch, vocab = x.shape
    device = x.device

    k = _per_row(top_k, batch, device, torch.int64)  # a number becomes a fill kernel, not a host copy (capture)
    p = _per_row(top_p, batch, device, torch.float32)
    threshold = torch.full((batch,), float("-inf"), device=device)
    if topk and 0 < top_k_max:
        values = torch.topk(x, min(int(top_k_max), vocab), dim=1).values               # [B, k_max] descending
        kth = values.gather(1, (k.clamp(1, values.shape[1]) - 1)[:, None])[:, 0]
        threshold = torch.where((k > 0) & (k < vocab), kth, threshold)
    if topp:
        kept = x.masked_fill(x < threshold[:, None], float("-inf"))
        ordered = torch.sort(kept, dim=1, descending=True).values
        e = torch.exp(ordered - ordered[:, :1])
        above = torch.cumsum(e, dim=1) - e                                              # mass strictly before
        count = (above <= p[:, None] * e.sum(dim=1, keepdim=True)).sum(dim=1)          # >= 1: above[0] = 0
        cut = ordered.gather(1, (count - 1)[:, None])[:, 0]
        threshold = torch.where(p < 1.0, torch.maximum(threshold, cut), threshold)
    return ordered_keys(threshold)


# ------------------------------------------------------------------ launcher


def check_launch_args(cond, uncond, weak, *, select: str = "kernel", filters: Optional[tuple] = None) -> None:
    """The fused kernel's own limits, checked by its public entries (fused_guided_sample, and guided_sample when it
    dispatches here): float logits [B, V] of one shape on one device with V <= MAX_VOCAB, a select path, and a
    filters promise that is None or a pair of bools."""
    if select not in SELECT_PATHS:
        raise InvalidArgument(f"select must be one of {SELECT_PATHS}, got {select!r}")
    if filters is not None and (not isinstance(filters, tuple) or len(filters) != 2 or
                                not all(isinstance(f, bool) for f in filters)):
        raise InvalidArgument(f"filters must be None or a pair of bools (top_k_on, top_p_on), got {filters!r}")
    for name, t in (("cond", cond), ("uncond", uncond), ("weak", weak)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise InvalidArgument(f"{name} must be a floating-point tensor [B, V]")
        if t is cond:
            if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
                raise InvalidArgument(f"{name} must be [B, V] with B > 0 and V > 0, got shape {list(t.shape)}")
            if t.shape[1] > MAX_VOCAB:
                raise InvalidArgument(f"vocab size must be <= {MAX_VOCAB} for the fused kernel, got {t.shape[1]}")
        elif t.shape != cond.shape:
            raise InvalidArgument(f"{name} must have the shape of cond {list(cond.shape)}, got {list(t.shape)}")
        elif t.device != cond.device:
            raise InvalidArgument(f"{name} must be on {cond.device}, got {t.device}")


def _check_knob(name: str, value, batch: int, check_values: bool) -> None:
    """A knob is a number (always value-checked) or a tensor [] / [B] (its values checked, a host sync, when
    check_values)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise InvalidArgument(f"{name} must be a number or a tensor of shape [{batch}] (one per row), "
                                  f"got shape {list(value.shape)}")
        if not check_values:
            return
    if name in ("cfg_scale", "w2s_scale"):
        check_finite_scale(name, value)
    else:
        check_sampling_args(value if name == "temperature" else 1.0,
                            value if name == "top_k" else 0,
                            value if name == "top_p" else 1.0)


def _per_row(value, batch: int, device, dtype) -> torch.Tensor:
    """A Python number or a tensor ([] or [B]) -> contiguous [B] tensor on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).expand(batch).contiguous()
    return torch.full((batch,), value, device=device, dtype=dtype)


KNOB_DTYPES = {"cfg_scale": torch.float32, "w2s_scale": torch.float32, "temperature": torch.float32,
               "top_k": torch.int64, "top_p": torch.float32}


def fused_guided_sample(
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor] = None,
    weak: Optional[torch.Tensor] = None,
    *,
    mode: str = "cfg",
    cfg_scale=1.0,
    w2s_scale=1.0,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    seeds=0,
    offset=0,
    return_mixed: bool = False,
    check_values: bool = True,
    config: Optional[LaunchConfig] = None,
    filters: Optional[tuple] = None,
    select: str = "kernel",
    top_k_max: Optional[int] = None,
):
    """Check every argument, then `launch` the two kernels on [B, V] logits; tokens LongTensor [B] (and mixed fp32
    [B, V]).

    Python-number knobs are passed as kernel arguments (no device tensors are built for them). If
    any knob is a tensor, all become [B] tensors, value-checked (a host sync) unless check_values=False.
    `config` overrides `launch_config(B, V, device)` (tests, tuning).

    filters: (top_k_on, top_p_on), the host's promise of which filters any row may use (the engine
    derives it once per request): a filter promised off is compiled out and, with both off, no row is
    written to scratch. None = from the knobs (Python numbers: their values; tensors: their values when
    check_values, else both on). Rows whose knobs leave a filter off are unaffected either way.
    select: "kernel" (the rejection select, docs/sampling.md) or "torch" (the kept-set thresholds from
    torch.topk / torch.sort between the two launches: the graph-capturable torch candidate the dispatch
    times against the kernel); both give the same tokens up to the rounding of top-p masses.
    top_k_max: the largest top_k of any row (select="torch" with per-row top_k; read from the tensor,
    a host sync, when None).
    """
    check_mode(mode)
    check_launch_args(cond, uncond, weak, select=select, filters=filters)
    batch, vocab = cond.shape
    if MODE_TABLE[mode].weak and weak is None:
        raise InvalidArgument(f"mode {mode!r} needs the weak-model prediction `weak`")
    knobs = dict(cfg_scale=cfg_scale, w2s_scale=w2s_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    for name, value in knobs.items():
        _check_knob(name, value, batch, check_values)
    if uncond is None and reads_uncond(mode, cfg_scale):
        raise InvalidArgument(f"mode {mode!r} with cfg_scale > 1 needs the unconditional output `uncond`")
    seeds = check_seeds(seeds, batch, vocab, cond.device)
    offset = check_offset(offset, batch, vocab, seeds.numel())
    return launch(cond, uncond, weak, mode=mode, **knobs, seeds=seeds, offset=offset, return_mixed=return_mixed,
                  config=config, filters=filters, read_filters=check_values, select=select, top_k_max=top_k_max)


def launch(cond: torch.Tensor, uncond: Optional[torch.Tensor], weak: Optional[torch.Tensor], *, mode: str,
           cfg_scale, w2s_scale, temperature, top_k, top_p, seeds: torch.Tensor, offset, return_mixed: bool = False,
           config: Optional[LaunchConfig] = None, filters: Optional[tuple] = None, read_filters: bool = False,
           select: str = "kernel", top_k_max: Optional[int] = None):
    """The two launches on arguments its caller checked at its entry (fused_guided_sample above, or
    guidance.sampling.guided_sample, once per call -- or once per request for the decode loops): nothing is checked
    here. `seeds`: int64 keys [1] or [B] on the logits' device (philox.check_seeds' form); `filters=None` with
    per-row knobs reads their values only when `read_filters` (a host sync), else promises both filters."""
    cond = cond if cond.stride(-1) == 1 else cond.contiguous()
    uncond = uncond if uncond is None or uncond.stride(-1) == 1 else uncond.contiguous()
    weak = weak if weak is None or weak.stride(-1) == 1 else weak.contiguous()
    batch, vocab = cond.shape
    device = cond.device
    seed_stride, offset_stride, counter_row_stride = counter_strides(seeds.numel(), vocab,
                                                                     per_row_offsets(offset, batch))

    knobs = dict(cfg_scale=cfg_scale, w2s_scale=w2s_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    per_row = any(isinstance(v, torch.Tensor) for v in knobs.values())
    if per_row:
        ptrs = {name: _per_row(v, batch, device, KNOB_DTYPES[name]) for name, v in knobs.items()}
        vals = dict(cfg_scale=1.0, w2s_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)
        if filters is None:
            filters = (bool(((ptrs["top_k"] > 0) & (ptrs["top_k"] < vocab)).any()),
                       bool((ptrs["top_p"] < 1.0).any())) if read_filters else (True, True)
    else:
        ptrs = dict.fromkeys(knobs, seeds)  # never read
        vals = dict(cfg_scale=float(cfg_scale), w2s_scale=float(w2s_scale), temperature=float(temperature),
                    top_k=min(int(top_k), vocab), top_p=float(top_p))
        filters = (0 < vals["top_k"] < vocab, vals["top_p"] < 1.0)  # the values themselves: exact
    cfg_mix = reads_uncond(mode, cfg_scale)  # a per-row scale: each row decides in the kernel (s > 1)
    sample = per_row or vals["temperature"] != 0.0
    greedy = per_row or vals["temperature"] == 0.0
    scale = per_row or vals["temperature"] not in (0.0, 1.0)
    topk_flag, topp_flag = (sample and filters[0]), (sample and filters[1])
    store_rows = topk_flag or topp_flag

    cfg = config or launch_config(batch, vocab, device)
    nb = cfg.blocks_per_row
    if nb * cfg.chunk * cfg.chunks_per_block < vocab or nb > triton.next_power_of_2(vocab):
        raise InvalidArgument(f"config {cfg} does not cover vocab {vocab}")
    row_elems = batch * vocab if store_rows else 0
    scratch = torch.empty(2 * row_elems + 4 * batch * nb, device=device, dtype=torch.int32)
    x_buf = scratch[:row_elems].view(torch.float32)
    s_buf = scratch[row_elems:2 * row_elems].view(torch.float32)
    part_f = scratch[2 * row_elems:2 * row_elems + 2 * batch * nb].view(torch.float32)
    part_i = scratch[2 * row_elems + 2 * batch * nb:]
    if not store_rows:
        x_buf = s_buf = part_f  # never read or written
    tokens = torch.empty(batch, device=device, dtype=torch.int64)
    mixed = torch.empty(batch, vocab, device=device, dtype=torch.float32) if return_mixed else part_f
    uncond_t = uncond if uncond is not None else cond   # never read when cfg_mix is off
    weak_t = weak if weak is not None else cond         # never read outside fast/slow
    offset_on_device = isinstance(offset, torch.Tensor)
    offset_t = offset.to(device=device, dtype=torch.int64).reshape(-1) if offset_on_device else seeds
    offset_val = 0 if offset_on_device else offset

    row_groups = math.ceil(batch / cfg.rows_per_program)
    _mix_race_kernel[(row_groups, nb)](
        cond, uncond_t, weak_t, mixed, x_buf, s_buf, part_f, part_i,
        ptrs["cfg_scale"], vals["cfg_scale"], ptrs["w2s_scale"], vals["w2s_scale"],
        ptrs["temperature"], vals["temperature"],
        seeds, offset_t, offset_val,
        batch, vocab, nb, seed_stride, offset_stride, counter_row_stride,
        cond.stride(0), uncond_t.stride(0), weak_t.stride(0), mixed.stride(0) if return_mixed else 0,
        MODE=MODE_IDS[mode], CFG_MIX=cfg_mix, KNOBS_PER_ROW=per_row,
        OFFSET_FROM_PTR=offset_on_device, WRITE_MIXED=return_mixed, SCALE=scale, ARGMAX_X=greedy or topp_flag,
        SAMPLE=sample, STORE_ROWS=store_rows, BLOCK_ROWS=cfg.rows_per_program, CHUNK=cfg.chunk,
        CHUNKS=cfg.chunks_per_block, num_warps=cfg.mix_warps, enable_fp_fusion=False,
    )
    thresholds = part_i  # never read unless select == "torch"
    use_thresholds = select == "torch" and store_rows
    if use_thresholds:
        if top_k_max is None:
            top_k_max = int(ptrs["top_k"].max()) if per_row else vals["top_k"]  # per-row: a host sync
        thresholds = torch_select_thresholds(
            x_buf.view(batch, vocab), ptrs["top_k"] if per_row else vals["top_k"],
            ptrs["top_p"] if per_row else vals["top_p"], top_k_max=min(int(top_k_max), vocab), topk=topk_flag,
            topp=topp_flag)
    _select_kernel[(row_groups,)](
        x_buf, s_buf, part_f, part_i, thresholds, tokens,
        ptrs["temperature"], vals["temperature"], ptrs["top_k"], vals["top_k"], ptrs["top_p"], vals["top_p"],
        batch, vocab, nb,
        KNOBS_PER_ROW=per_row, GREEDY=greedy, SAMPLE=sample, TOPK=topk_flag, TOPP=topp_flag,
        THRESHOLD=use_thresholds, BLOCK_ROWS=cfg.rows_per_program, BLOCK_V=triton.next_power_of_2(vocab),
        BLOCK_NB=triton.next_power_of_2(nb), SCAN=cfg.scan_chunk, RESIDENT=cfg.resident,
        MAX_REJECTIONS=cfg.rejection_rounds, VALUE_STEPS=cfg.value_steps, num_warps=cfg.select_warps,
        enable_fp_fusion=False,
    )
    return (tokens, mixed) if return_mixed else tokens


def select_candidates(batch: int, vocab: int, device, *, temperature, top_k, top_p, seeds, filters: tuple,
                      top_k_max: int) -> list:
    """The two select paths as `timed_choice.Candidate`s ("kernel" = triton, "torch" = torch): one CFG sampling
    call each on representative [B, V] logits (N(0, 3^2) cond / uncond, cfg 4 -- a peaked distribution, like
    guided logits) with the caller's knobs (per-row device tensors, as in the decode graph), graph-capturable.
    The inputs are made on the first call, so building the candidates costs nothing when no timing is due."""
    from .timed_choice import Candidate

    inputs: dict = {}

    def make(select: str):
        def run():
            if not inputs:
                g = torch.Generator(device=device).manual_seed(0)
                inputs["cond"] = torch.randn(batch, vocab, device=device, generator=g) * 3.0
                inputs["uncond"] = torch.randn(batch, vocab, device=device, generator=g) * 3.0
                inputs["offset"] = torch.zeros(1, dtype=torch.int64, device=device)
            return fused_guided_sample(inputs["cond"], inputs["uncond"], mode="cfg", cfg_scale=4.0,
                                       temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                                       offset=inputs["offset"], check_values=False, filters=filters, select=select,
                                       top_k_max=top_k_max)
        return run

    return [Candidate("kernel", "triton", make("kernel")), Candidate("torch", "torch", make("torch"))]


# True when triton.jit produced an interpreter function (TRITON_INTERPRET=1 was set before triton
# was imported): the kernels then run on CPU tensors, slowly -- tests only.
INTERPRETED = interpreted(_select_kernel)
