"""Fused guidance + sampling: mix + temperature + top-k + top-p + sample in two Triton launches.

Contract (same semantics as `llamagen_core2.guidance.guided_sample`, the torch reference):
    cond, uncond, weak : [B, V] logits (any float dtype, read once, computed in fp32)
    mode               : "cond" | "cfg" | "fast" | "slow"  (see guidance.py for the formulas)
    cfg_scale, w2s_scale, temperature, top_k, top_p : Python numbers or per-row tensors [B]
    seeds, offset      : Philox keys (an int, or an int64 tensor [1] or [B]) and the counter base
                         (an int, or an int64 tensor [1] -- or [B], one base per row -- that may live
                         on the device); the counter layout is `llamagen_core2.philox`'s, and the
                         torch reference draws the same uniforms, so both backends give the same tokens
    returns tokens LongTensor [B] (and the fp32 mixed logits [B, V] when return_mixed=True).

Two launches, no sort, no host synchronisation, scratch sized from (B, V) only -- graph-capturable.
docs/sampling.md has the design, the cost model and what is measured.

1. `_mix_race_kernel`, grid (row groups, blocks per row): each program takes a block of columns of
   its rows and loops over it in chunks: mixes in fp32 (the reference association `u + s (c - u)`;
   FMA contraction is disabled, so the result is bit-identical to `guidance.mix_guidance`), divides
   by the temperature with IEEE division (x), adds the race noise s = x - log(-log U) with
   U = tl.rand(key, counter), writes x and s to scratch (only when top-k / top-p can be on) and
   per-block partials: the first index of the largest s (the unfiltered race winner) and, when a
   row may be greedy, of the largest x.
2. `_select_kernel`, one program per row (or per group of small rows): combines the partials. With
   no top-k / top-p the token is the unfiltered race winner and no row is re-read. Otherwise it
   loads the row's keys (the order-preserving int32 image of x) from scratch into registers and
   * top-k: the exact k-th largest key -- a radix select (12 + 10 + 10-bit histograms) with one
     row per program, a 32-step bisection for packed rows. Every logit >= it is kept, so ties at
     the k-th value survive exactly as in LlamaGen's `logits < topk(...)[-1]` filter. The race
     winner stands if its key clears the threshold; if not, the argmax of s over the kept set is
     taken (a pass that streams s from scratch);
   * top-p: the kept set is {key >= v}, v the smallest kept key whose strictly-larger mass
     M(v) = sum_{x_j > v} softmax_j is <= p (LlamaGen's "smallest sorted prefix whose mass reaches
     p, including the crossing token", for distinct values). A kept token t survives iff
     M(x_t) <= p, so the race is finished by rejection: test the current winner (one masked sum);
     if it is cut, its key bounds v from below and the next winner is the argmax of s above it.
     The first accepted token is the argmax of s over the top-p set, since every rejected token
     lies below v. After TOP_P_ROUNDS rejections (rare: a rejection needs the winner in the last
     1 - p of the mass) an exact bisection for v finishes the row. Exact ties at the cut and
     rounding differ from the reference as docs/sampling.md describes;
   * temperature 0 = greedy: the first index of the largest mixed logit (like torch.argmax).
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
from ..guidance_config import MODE_TABLE
from ..philox import check_offset, check_seeds, counter_strides, per_row_offsets
from .dispatch import interpreted, multiprocessor_count

MAX_VOCAB = 65536  # the select kernel holds a row in registers
MODE_IDS = {"cond": 0, "cfg": 1, "fast": 2, "slow": 3}
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
    if MODE == 0:
        mixed = c
    elif MODE == 2:
        mixed = tl.load(weak_ptr + rows64[:, None] * stride_w + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    else:
        mixed = c
        if CFG_MIX:
            u = tl.load(uncond_ptr + rows64[:, None] * stride_u + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            mixed = tl.where(s_cfg[:, None] > 1.0, u + s_cfg[:, None] * (c - u), c)  # a scale <= 1 means cond-only
        if MODE == 3:
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
    WRITE_MIXED: tl.constexpr, SCALE: tl.constexpr, GREEDY: tl.constexpr, SAMPLE: tl.constexpr,
    STORE_ROWS: tl.constexpr, BLOCK_ROWS: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
):
    """Per (row group, column block): mix, x = mixed / temperature (SCALE; else the temperature is
    1 or 0 and x = mixed), s = x + Gumbel noise (SAMPLE), x and s to scratch (STORE_ROWS), and the
    block's (max, first index) of x (GREEDY: some row may have temperature 0) and of s."""
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
        if GREEDY:
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
    if GREEDY:
        tl.store(part_f_ptr + at, best_x, mask=row_ok)
        tl.store(part_i_ptr + at, best_xi, mask=row_ok)
    if SAMPLE:
        tl.store(part_f_ptr + plane + at, best_s, mask=row_ok)
        tl.store(part_i_ptr + plane + at, best_si, mask=row_ok)


@triton.jit
def _combine_argmax(part_f_ptr, part_i_ptr, at, pmask):
    """Per row: first index of the largest value over the block partials (blocks in column order)."""
    best = tl.load(part_f_ptr + at, mask=pmask, other=float("-inf"))
    top = tl.max(best, axis=1)
    index = tl.load(part_i_ptr + at, mask=pmask, other=INT32_MAX)
    return tl.min(tl.where(pmask & (best == top[:, None]), index, INT32_MAX), axis=1)


# ------------------------------------------------------------------ phase 2: select + finish the race


@triton.jit
def _pick_bucket(hist, need, NBINS: tl.constexpr):
    """Largest bin b with count(bins >= b) >= need, and count(bins > b)."""
    at_least = tl.cumsum(hist, 0, reverse=True)
    bins = tl.arange(0, NBINS)
    pick = tl.max(tl.where(at_least >= need, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > pick, hist, 0), axis=0)
    return pick, above


@triton.jit
def _kth_key_radix(key, k, BLOCK_V: tl.constexpr):
    """Exact k-th largest key of one row ([1, V] keys, INT32_MIN = padding; [1] k with 0 < k <= #real
    keys): three histogram passes over the top 12, middle 10 and low 10 bits, each narrowing to the
    bucket that holds the k-th largest. Digits come from arithmetic shifts of the signed key, whose
    floor semantics keep bucket order == key order (no second row-sized tensor stays live)."""
    key = tl.reshape(key, [BLOCK_V])
    need = tl.sum(k, axis=0)
    pick, above = _pick_bucket(tl.histogram((key >> 20) + 2048, 4096, mask=key > INT32_MIN), need, 4096)
    need -= above
    prefix = pick - 2048                                                    # == key >> 20 of the k-th
    pick, above = _pick_bucket(tl.histogram((key >> 10) & 1023, 1024, mask=(key >> 20) == prefix), need, 1024)
    need -= above
    prefix = prefix * 1024 + pick                                           # == key >> 10 of the k-th
    pick, above = _pick_bucket(tl.histogram(key & 1023, 1024, mask=(key >> 10) == prefix), need, 1024)
    return tl.zeros([1], tl.int32) + (prefix * 1024 + pick)


@triton.jit
def _kth_key_bisect(key, k):
    """Exact k-th largest key per row ([R, V] keys, INT32_MIN = padding): the largest K with
    count(key >= K) >= k, by bisection."""
    lo = tl.min(tl.where(key > INT32_MIN, key, INT32_MAX), axis=1)      # count(>= lo) = #real >= k
    hi = tl.max(key, axis=1) + 1                                        # count(>= hi) = 0 < k
    for _ in range(32):
        mid = _floor_mid(lo, hi)
        enough = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo


@triton.jit
def _streamed_argmax(x_rows, s_rows, row_ok, vocab, above, at_least, BLOCK_ROWS: tl.constexpr,
                     BLOCK_V: tl.constexpr, SCAN: tl.constexpr):
    """First index (and key) of the largest race score among the entries with above < key and
    key >= at_least, per row. Streams x and s from scratch in SCAN-column steps: this rare path
    then needs no row-sized tensor beside the resident keys (x_rows, s_rows: [R] row pointers)."""
    best = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    t = tl.zeros([BLOCK_ROWS], tl.int32)
    key_t = tl.full([BLOCK_ROWS], INT32_MIN, tl.int32)
    for start in tl.static_range(0, BLOCK_V, SCAN):
        cols = start + tl.arange(0, SCAN)
        in_row = row_ok[:, None] & (cols < vocab)[None, :]
        key = _ordered_key(tl.load(x_rows[:, None] + cols[None, :], mask=in_row, other=float("-inf")))
        take = in_row & (key > above[:, None]) & (key >= at_least[:, None])
        s = tl.where(take, tl.load(s_rows[:, None] + cols[None, :], mask=in_row, other=float("-inf")), float("-inf"))
        cs, ci = tl.max(s, axis=1, return_indices=True)
        ck = tl.max(tl.where(tl.arange(0, SCAN)[None, :] == ci[:, None], key, INT32_MIN), axis=1)
        better = cs > best                                                # strict: the earlier step wins ties
        t = tl.where(better, start + ci, t)
        key_t = tl.where(better, ck, key_t)
        best = tl.where(better, cs, best)
    return t, key_t


@triton.jit
def _mass(key, keep, shift):
    """Softmax numerators exp(x - shift) where `keep`, else 0. The mask goes into the exponent, so a
    loop-variant mask keeps the compiler from hoisting a row-sized exp tensor out of the loop."""
    return tl.exp(tl.where(keep, _key_value(key) - shift[:, None], float("-inf")))


@triton.jit
def _filtered_race(x_ptr, s_ptr, rows64, row_ok, vocab, win, k, p, topk_on, topp_on,
                   BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr, SCAN: tl.constexpr,
                   TOP_P_ROUNDS: tl.constexpr):
    """Token per row: argmax of s over the top-k / top-p kept set (module doc). Only the keys stay
    live as a row tensor (masks and softmax numerators are recomputed from them), which keeps a
    16384-entry row in registers without spills."""
    cols = tl.arange(0, BLOCK_V)
    in_row = row_ok[:, None] & (cols < vocab)[None, :]
    # [R] row pointers + int32 columns: no row-sized 64-bit address tensor stays live
    x_rows = x_ptr + rows64 * vocab
    s_rows = s_ptr + rows64 * vocab
    key = _ordered_key(tl.load(x_rows[:, None] + cols[None, :], mask=in_row, other=float("-inf")))
    key = tl.where(in_row, key, INT32_MIN)                                # padding: below every kept key

    threshold = tl.full([BLOCK_ROWS], INT32_MIN + 1, tl.int32)            # kept <=> key >= threshold
    if tl.max(topk_on.to(tl.int32), axis=0) > 0:
        if BLOCK_ROWS == 1:
            kth = _kth_key_radix(key, k, BLOCK_V)
        else:
            kth = _kth_key_bisect(key, k)
        threshold = tl.where(topk_on, kth, threshold)

    t = win
    key_t = _ordered_key(tl.load(x_rows + win, mask=row_ok, other=0.0))
    lost = key_t < threshold                                              # the winner was cut by top-k
    if tl.max(lost.to(tl.int32), axis=0) > 0:
        no_bound = tl.full([BLOCK_ROWS], INT32_MIN, tl.int32)
        t2, key_t2 = _streamed_argmax(x_rows, s_rows, row_ok, vocab, no_bound, threshold, BLOCK_ROWS, BLOCK_V, SCAN)
        t = tl.where(lost, t2, t)
        key_t = tl.where(lost, key_t2, key_t)

    if tl.max(topp_on.to(tl.int32), axis=0) > 0:
        shift = tl.where(row_ok, _key_value(tl.max(key, axis=1)), 0.0)   # the row max; padding rows: 0
        total = tl.sum(_mass(key, key >= threshold[:, None], shift), axis=1)
        total = tl.where(row_ok, total, 1.0)                              # >= 1: the row max is kept
        lo = tl.full([BLOCK_ROWS], INT32_MIN, tl.int32)                   # invariant: M(lo) > p
        pending = topp_on
        rounds = 0
        while (rounds < TOP_P_ROUNDS) & (tl.max(pending.to(tl.int32), axis=0) > 0):
            above = tl.sum(_mass(key, key > key_t[:, None], shift), axis=1)
            rejected = pending & (above / total > p)
            lo = tl.where(rejected, key_t, lo)
            pending = rejected
            if tl.max(rejected.to(tl.int32), axis=0) > 0:
                t2, key_t2 = _streamed_argmax(x_rows, s_rows, row_ok, vocab, key_t, threshold,
                                              BLOCK_ROWS, BLOCK_V, SCAN)
                t = tl.where(rejected, t2, t)
                key_t = tl.where(rejected, key_t2, key_t)
            rounds += 1
        if tl.max(pending.to(tl.int32), axis=0) > 0:
            # exact cut: the smallest key v in (lo, max] with M(v) <= p (a key that is present and kept)
            e = _mass(key, key >= threshold[:, None], shift)
            hi = tl.max(key, axis=1)                                      # M(max) = 0 <= p
            while tl.max((lo + 1 < hi).to(tl.int32), axis=0) > 0:         # <= 32 steps
                mid = _floor_mid(lo, hi)
                small = tl.sum(tl.where(key > mid[:, None], e, 0.0), axis=1) / total <= p
                hi = tl.where(small, mid, hi)
                lo = tl.where(small, lo, mid)
            t2, _ = _streamed_argmax(x_rows, s_rows, row_ok, vocab, lo, threshold, BLOCK_ROWS, BLOCK_V, SCAN)
            t = tl.where(pending, t2, t)
    return t


@triton.jit
def _select_kernel(
    x_ptr, s_ptr, part_f_ptr, part_i_ptr,    # scratch written by _mix_race_kernel
    tokens_ptr,                              # [B] int64 out
    temp_ptr, temp_val, top_k_ptr, top_k_val, top_p_ptr, top_p_val,
    n_rows, vocab, n_blocks,
    KNOBS_PER_ROW: tl.constexpr, GREEDY: tl.constexpr, SAMPLE: tl.constexpr, FILTERS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_NB: tl.constexpr, SCAN: tl.constexpr,
    TOP_P_ROUNDS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    blocks = tl.arange(0, BLOCK_NB)
    pmask = row_ok[:, None] & (blocks < n_blocks)[None, :]
    at = rows[:, None] * n_blocks + blocks[None, :]
    plane = n_rows * n_blocks

    token = tl.zeros([BLOCK_ROWS], tl.int32)
    if GREEDY:  # the largest mixed logit, first index
        token = _combine_argmax(part_f_ptr, part_i_ptr, at, pmask)
    if SAMPLE:
        win = _combine_argmax(part_f_ptr + plane, part_i_ptr + plane, at, pmask)  # the unfiltered race winner
        temp = _row_knob(temp_ptr, temp_val, rows, row_ok, KNOBS_PER_ROW, tl.float32)
        sampled = temp != 0.0
        token = tl.where(sampled, win, token)
        if FILTERS:
            k = tl.minimum(_row_knob(top_k_ptr, top_k_val, rows, row_ok, KNOBS_PER_ROW, tl.int64), vocab).to(tl.int32)
            p = _row_knob(top_p_ptr, top_p_val, rows, row_ok, KNOBS_PER_ROW, tl.float32)
            topk_on = sampled & row_ok & (k > 0) & (k < vocab)
            topp_on = sampled & row_ok & (p < 1.0)
            if tl.max((topk_on | topp_on).to(tl.int32), axis=0) > 0:
                t = _filtered_race(x_ptr, s_ptr, rows64, row_ok, vocab, win, k, p, topk_on, topp_on,
                                   BLOCK_ROWS, BLOCK_V, SCAN, TOP_P_ROUNDS)
                token = tl.where(topk_on | topp_on, t, token)
    tl.store(tokens_ptr + rows, token.to(tl.int64), mask=row_ok)


# ------------------------------------------------------------------ launch configuration


@dataclass(frozen=True)
class LaunchConfig:
    rows_per_program: int   # R: rows per program in both kernels (power of 2)
    blocks_per_row: int     # NB: phase-1 programs per row (the vocabulary split); 1 = one per row
    chunk: int              # columns per phase-1 loop step (power of 2)
    chunks_per_block: int   # loop steps per phase-1 program; NB * chunk * chunks >= V
    mix_warps: int
    select_warps: int
    scan_chunk: int         # columns per step when the select kernel streams a row from scratch
    top_p_rounds: int       # rejection rounds before the exact top-p bisection


def launch_config(batch: int, vocab: int, device, *, blocks_per_row: Optional[int] = None,
                  rows_per_program: Optional[int] = None, top_p_rounds: int = 4) -> LaunchConfig:
    """Every launch setting of `fused_guided_sample`, from (batch, vocab, device) alone.

    GPU (why, for V = 16384 on an H100 with 132 SMs -- see docs/sampling.md):
      * select kernel: one program per row (rows of < 4096 entries are packed up to 4096 elements),
        num_warps = elements / 1024 clamped to [4, 32] (8 at least for packed rows): the row's
        keys live in registers (16 warps for V = 16384: 32 keys per thread; compiled for sm_90a it
        uses 128 registers and spills ~80 bytes of scalars, nothing in the per-element passes).
        Beyond V = 16384 a row no longer fits: ptxas spills it to local memory (V = 32768: ~600
        bytes per thread) -- correct, slower;
      * mix/race kernel: light 4-warp programs (~55 registers) over 1024-column chunks. This phase
        carries the bandwidth and the Philox arithmetic (~135 instructions per element), so it is
        split until there are ~8 programs per SM (enough resident warps to hide load latency) or
        the blocks shrink to 1024 columns: batch 1, 8 and 64 -> 16 blocks per row, batch 256 -> 8;
        a batch of >= 8 x SMs rows gets one program per row.
    CPU interpreter (TRITON_INTERPRET=1): every op costs Python overhead, so rows are packed up to
    65536 elements and a row is one block unless `blocks_per_row` asks otherwise.
    `blocks_per_row` / `rows_per_program` override the split (tests force the split path at small
    shapes; tuning); `top_p_rounds=0` sends every top-p row to the bisection (tests).
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
    # packed rows run the bisection on 2-D tiles: 8 warps keep them at ~16 values per thread
    select_warps = max(4 if rows == 1 else 8, min(32, rows * row_block // 1024)) if on_gpu else 4
    scan_chunk = min(row_block, max(1, (2048 if on_gpu else 65536) // rows))
    return LaunchConfig(rows_per_program=rows, blocks_per_row=blocks, chunk=chunk,
                        chunks_per_block=block_cols // chunk, mix_warps=4, select_warps=select_warps,
                        scan_chunk=scan_chunk, top_p_rounds=int(top_p_rounds))


# ------------------------------------------------------------------ launcher


def _as_logits(name: str, t: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise InvalidArgument(f"{name} must be a floating-point tensor [B, V]")
    if like is None:
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise InvalidArgument(f"{name} must be [B, V] with B > 0 and V > 0, got shape {list(t.shape)}")
        if t.shape[1] > MAX_VOCAB:
            raise InvalidArgument(f"vocab size must be <= {MAX_VOCAB} for the fused kernel, got {t.shape[1]}")
    elif t.shape != like.shape:
        raise InvalidArgument(f"{name} must have the shape of cond {list(like.shape)}, got {list(t.shape)}")
    elif t.device != like.device:
        raise InvalidArgument(f"{name} must be on {like.device}, got {t.device}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _per_row(value, name: str, batch: int, device, dtype, check_values: bool) -> torch.Tensor:
    """A Python number or a tensor ([] or [B]) -> contiguous [B] tensor on `device`."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise InvalidArgument(f"{name} must be a number or a tensor of shape [{batch}] (one per row), "
                                  f"got shape {list(value.shape)}")
        if check_values:
            _check_knob(name, value)
        return value.to(device=device, dtype=dtype).expand(batch).contiguous()
    _check_knob(name, value)
    return torch.full((batch,), value, device=device, dtype=dtype)


def _check_knob(name: str, value) -> None:
    if name in ("cfg_scale", "w2s_scale"):
        check_finite_scale(name, value)
    else:
        check_sampling_args(value if name == "temperature" else 1.0,
                            value if name == "top_k" else 0,
                            value if name == "top_p" else 1.0)


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
):
    """Launch the two kernels on [B, V] logits; tokens LongTensor [B] (and mixed fp32 [B, V]).

    Python-number knobs are passed as kernel arguments (no device tensors are built for them). If
    any knob is a tensor, all become [B] tensors, value-checked (a host sync) unless
    check_values=False, which the engine passes inside CUDA-graph capture after validating the
    request once. `config` overrides `launch_config(B, V, device)` (tests, tuning).
    """
    if mode not in MODE_IDS:
        raise InvalidArgument(f"mode must be one of {tuple(MODE_IDS)}, got {mode!r}")
    cond = _as_logits("cond", cond, None)
    uncond = _as_logits("uncond", uncond, cond)
    weak = _as_logits("weak", weak, cond)
    batch, vocab = cond.shape
    device = cond.device
    if MODE_TABLE[mode].weak and weak is None:
        raise InvalidArgument(f"mode {mode!r} needs the weak-model prediction `weak`")
    if MODE_TABLE[mode].uncond and uncond is None:
        if isinstance(cfg_scale, torch.Tensor) or float(cfg_scale) > 1.0:
            raise InvalidArgument(f"mode {mode!r} with cfg_scale > 1 needs the unconditional output `uncond`")
    seeds = check_seeds(seeds, batch, vocab, device)
    offset = check_offset(offset, batch, vocab, seeds.numel())
    seed_stride, offset_stride, counter_row_stride = counter_strides(seeds.numel(), vocab,
                                                                     per_row_offsets(offset, batch))

    knobs = dict(cfg_scale=cfg_scale, w2s_scale=w2s_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    per_row = any(isinstance(v, torch.Tensor) for v in knobs.values())
    if per_row:
        ptrs = {name: _per_row(v, name, batch, device, KNOB_DTYPES[name], check_values) for name, v in knobs.items()}
        vals = dict(cfg_scale=1.0, w2s_scale=1.0, temperature=1.0, top_k=0, top_p=1.0)
    else:
        for name, v in knobs.items():
            _check_knob(name, v)
        ptrs = dict.fromkeys(knobs, seeds)  # never read
        vals = dict(cfg_scale=float(cfg_scale), w2s_scale=float(w2s_scale), temperature=float(temperature),
                    top_k=min(int(top_k), vocab), top_p=float(top_p))
    cfg_mix = MODE_TABLE[mode].uncond and (per_row or vals["cfg_scale"] > 1.0)
    sample = per_row or vals["temperature"] != 0.0
    greedy = per_row or vals["temperature"] == 0.0
    scale = per_row or vals["temperature"] not in (0.0, 1.0)
    filters = sample and (per_row or 0 < vals["top_k"] < vocab or vals["top_p"] < 1.0)

    cfg = config or launch_config(batch, vocab, device)
    nb = cfg.blocks_per_row
    if nb * cfg.chunk * cfg.chunks_per_block < vocab or nb > triton.next_power_of_2(vocab):
        raise InvalidArgument(f"config {cfg} does not cover vocab {vocab}")
    row_elems = batch * vocab if filters else 0
    scratch = torch.empty(2 * row_elems + 4 * batch * nb, device=device, dtype=torch.int32)
    x_buf = scratch[:row_elems].view(torch.float32)
    s_buf = scratch[row_elems:2 * row_elems].view(torch.float32)
    part_f = scratch[2 * row_elems:2 * row_elems + 2 * batch * nb].view(torch.float32)
    part_i = scratch[2 * row_elems + 2 * batch * nb:]
    if not filters:
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
        OFFSET_FROM_PTR=offset_on_device, WRITE_MIXED=return_mixed, SCALE=scale, GREEDY=greedy, SAMPLE=sample,
        STORE_ROWS=filters, BLOCK_ROWS=cfg.rows_per_program, CHUNK=cfg.chunk, CHUNKS=cfg.chunks_per_block,
        num_warps=cfg.mix_warps, enable_fp_fusion=False,
    )
    _select_kernel[(row_groups,)](
        x_buf, s_buf, part_f, part_i, tokens,
        ptrs["temperature"], vals["temperature"], ptrs["top_k"], vals["top_k"], ptrs["top_p"], vals["top_p"],
        batch, vocab, nb,
        KNOBS_PER_ROW=per_row, GREEDY=greedy, SAMPLE=sample, FILTERS=filters, BLOCK_ROWS=cfg.rows_per_program,
        BLOCK_V=triton.next_power_of_2(vocab), BLOCK_NB=triton.next_power_of_2(nb), SCAN=cfg.scan_chunk,
        TOP_P_ROUNDS=cfg.top_p_rounds, num_warps=cfg.select_warps, enable_fp_fusion=False,
    )
    return (tokens, mixed) if return_mixed else tokens


# True when triton.jit produced an interpreter function (TRITON_INTERPRET=1 was set before triton
# was imported): the kernels then run on CPU tensors, slowly -- tests only.
INTERPRETED = interpreted(_select_kernel)
