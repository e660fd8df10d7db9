"""Fused guidance + sampling: mix + temperature + top-k + top-p + sample in one Triton kernel.

Contract (same semantics as `llamagen_core2.guidance.guided_sample`, the torch reference):
    cond, uncond, weak : [B, V] logits (any float dtype, read once, computed in fp32)
    mode               : "cond" | "cfg" | "fast" | "slow"  (see guidance.py for the formulas)
    cfg_scale, w2s_scale, temperature, top_k, top_p : Python numbers or per-row tensors [B]
    seed, offset       : int64 tensors with one element (or Python ints) -- the Philox key and
                         the first counter; token draws use counters offset + row * V + column,
                         so a caller that reuses `seed` must advance `offset` by B * V per call.
    returns tokens LongTensor [B] (and the fp32 mixed logits [B, V] when return_mixed=True).

How it works, per row (no sort, no host synchronisation -- built to be captured in a CUDA graph,
which has not yet been exercised on a GPU):
  * the row is loaded once into registers (vocab <= MAX_VOCAB = 65536), mixed in fp32, divided by
    the temperature with IEEE division. Under the interpreter the mixed logits are bit-identical
    to the reference; compiled for a GPU, Triton may contract `u + s (c - u)` into an FMA, which
    can move a result by an ulp;
  * top-k: a 32-step bisection over the order-preserving int32 image of the fp32 values finds the
    exact k-th largest value; every logit >= it is kept, so ties at the k-th value survive exactly
    as in LlamaGen's `logits < topk(...)[-1]` filter;
  * top-p: a second 32-step bisection finds the smallest kept value v whose strictly-larger mass
    M(v) = sum_{x_j > v} softmax_j is <= p; every kept logit >= v survives. For distinct values
    this is LlamaGen's "smallest sorted prefix whose mass reaches p, including the token that
    crosses p". Difference at exact ties at the top-p cut: the kernel keeps *all* tokens tied
    with the crossing token, the reference keeps the tied tokens that `torch.sort` happens to
    put first (sort-order dependent). Rounding differs too (a sum vs a sequential cumsum), so a
    token whose cumulative mass is within ~1e-6 of p may be kept by one and not the other;
  * sampling: an exponential race / Gumbel-max, argmax_j (x_j - log E_j), E_j = -log U_j with
    U_j = tl.rand(seed, counter) (Philox), which draws exactly from softmax over the kept set;
  * temperature 0 = greedy: argmax of the mixed logits (first index on ties, like torch.argmax).
NaN logits give an unspecified token (the engine detects NaN/inf separately, DESIGN §7).

Grid: one program per row for vocabularies >= 4096 on a GPU; smaller vocabularies (and the CPU
interpreter, TRITON_INTERPRET=1, where Python overhead per op dominates) pack several rows into
one program -- every reduction is along the vocab axis, so rows never interact.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgument, check_finite_scale, check_sampling_args
from ..guidance_config import MODE_TABLE

MAX_VOCAB = 65536  # a whole row lives in registers: 65536 fp32 over 32 warps = 64 per thread
MODE_IDS = {"cond": 0, "cfg": 1, "fast": 2, "slow": 3}


@triton.jit
def _ordered_key(x):
    """Map fp32 to int32 so that integer order == float order (-0.0 is folded into +0.0 first)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _floor_mid(lo, hi):
    """floor((lo + hi) / 2) for int32 without overflow."""
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)


@triton.jit
def _fused_guided_sample_kernel(
    cond_ptr, uncond_ptr, weak_ptr,          # [B, V] logits, unit stride along V
    cfg_scale_ptr, w2s_scale_ptr,            # [B] fp32
    temperature_ptr, top_p_ptr,              # [B] fp32
    top_k_ptr,                               # [B] int64
    seed_ptr, offset_ptr,                    # [1] int64 Philox key / first counter
    tokens_ptr, mixed_ptr,                   # [B] int64 out, [B, V] fp32 out (if WRITE_MIXED)
    n_rows, vocab,
    stride_cond, stride_uncond, stride_weak, stride_mixed,
    MODE: tl.constexpr,                      # 0 cond, 1 cfg, 2 fast, 3 slow
    WRITE_MIXED: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)   # [R]
    cols = tl.arange(0, BLOCK_V)                                      # [V]
    row_ok = rows < n_rows
    valid = row_ok[:, None] & (cols[None, :] < vocab)                # [R, V]
    rows64 = rows.to(tl.int64)

    # ---- mix (fp32, reference association u + s (c - u) and w + a (cfg - w)) ----
    c = tl.load(cond_ptr + rows64[:, None] * stride_cond + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    if MODE == 0:
        mixed = c
    elif MODE == 2:
        mixed = tl.load(weak_ptr + rows64[:, None] * stride_weak + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    else:
        u = tl.load(uncond_ptr + rows64[:, None] * stride_uncond + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        s = tl.load(cfg_scale_ptr + rows, mask=row_ok, other=1.0)[:, None]
        mixed = tl.where(s > 1.0, u + s * (c - u), c)   # a scale <= 1 means cond-only
        if MODE == 3:
            w = tl.load(weak_ptr + rows64[:, None] * stride_weak + cols[None, :], mask=valid, other=0.0).to(tl.float32)
            a = tl.load(w2s_scale_ptr + rows, mask=row_ok, other=1.0)[:, None]
            mixed = w + a * (mixed - w)
    if WRITE_MIXED:
        tl.store(mixed_ptr + rows64[:, None] * stride_mixed + cols[None, :], mixed, mask=valid)
    mixed = tl.where(valid, mixed, float("-inf"))
    greedy_token = tl.argmax(mixed, axis=1)                           # [R], first index on ties

    # ---- temperature (IEEE division so thresholds match the reference bit for bit) ----
    temp = tl.load(temperature_ptr + rows, mask=row_ok, other=1.0)
    is_greedy = temp == 0.0
    x = tl.fdiv(mixed, tl.where(is_greedy, 1.0, temp)[:, None], ieee_rounding=True)
    x = tl.where(valid, x, float("-inf"))
    key = _ordered_key(x)                                             # [R, V] int32

    # ---- top-k: largest key K with count(key >= K) >= k (= exact k-th largest value) ----
    k = tl.load(top_k_ptr + rows, mask=row_ok, other=0).to(tl.int32)
    topk_on = (k > 0) & (k < vocab)
    kept = valid
    if tl.max(topk_on.to(tl.int32), axis=0) > 0:
        lo = tl.min(tl.where(valid, key, 2147483647), axis=1)         # count(>= lo) = V >= k
        hi = tl.max(tl.where(valid, key, -2147483647), axis=1) + 1    # count(>= hi) = 0 < k
        for _ in range(32):
            mid = _floor_mid(lo, hi)
            count = tl.sum((valid & (key >= mid[:, None])).to(tl.int32), axis=1)
            enough = count >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        kept = valid & ((key >= lo[:, None]) | ~topk_on[:, None])

    # ---- softmax numerators over the kept set ----
    row_max = tl.max(tl.where(kept, x, float("-inf")), axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)       # padding rows: avoid inf - inf
    e = tl.where(kept, tl.exp(x - row_max[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    total = tl.where(total > 0.0, total, 1.0)

    # ---- top-p: smallest kept key K with mass(key > K) / total <= p ----
    p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
    topp_on = p < 1.0
    if tl.max(topp_on.to(tl.int32), axis=0) > 0:
        lo_p = tl.min(tl.where(kept, key, 2147483647), axis=1) - 1    # mass(> lo_p) = 1 > p
        hi_p = tl.max(tl.where(kept, key, -2147483647), axis=1)       # mass(> hi_p) = 0 <= p
        for _ in range(32):
            mid = _floor_mid(lo_p, hi_p)
            above = tl.sum(tl.where(key > mid[:, None], e, 0.0), axis=1)
            small = above / total <= p
            hi_p = tl.where(small, mid, hi_p)
            lo_p = tl.where(small, lo_p, mid)
        kept = kept & ((key >= hi_p[:, None]) | ~topp_on[:, None])

    # ---- exponential race over the kept set: argmax x - log(E), E = -log U ----
    seed = tl.load(seed_ptr)
    counter = tl.load(offset_ptr) + rows64[:, None] * vocab + cols[None, :]
    uniform = tl.rand(seed, counter)
    score = tl.where(kept, x - tl.log(-tl.log(uniform)), float("-inf"))
    sampled = tl.argmax(score, axis=1)
    token = tl.where(is_greedy, greedy_token, sampled)
    tl.store(tokens_ptr + rows, token.to(tl.int64), mask=row_ok)


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


def _philox_tensor(value, name: str, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype not in (torch.int64, torch.int32):
            raise InvalidArgument(f"{name} must be an integer tensor with one element, got "
                                  f"{value.dtype} with shape {list(value.shape)}")
        return value.to(device=device, dtype=torch.int64).reshape(1)
    if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value < 2 ** 63):
        raise InvalidArgument(f"{name} must be an int in [0, 2**63) or a one-element int64 tensor, got {value!r}")
    return torch.full((1,), value, device=device, dtype=torch.int64)  # a fill kernel: no host copy


def launch_config(vocab: int, on_gpu: bool, rows_per_program: Optional[int] = None) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_V, num_warps). On a GPU: one row per program once a row has >= 4096
    entries, smaller rows packed up to 4096 elements; on the CPU interpreter, where every op costs
    Python overhead, rows are packed up to 65536 elements. num_warps keeps <= 32 fp32 per thread
    per live tensor up to 32K elements (V = 16384: 16 warps, 128 registers, no spills when
    compiled for sm_90a with ptxas 13.4; V = 65536 at the 32-warp cap spills ~4 KB per thread)."""
    block_v = triton.next_power_of_2(vocab)
    if rows_per_program is None:
        rows_per_program = max(1, min(256, (4096 if on_gpu else 65536) // block_v))
    block_rows = triton.next_power_of_2(max(1, int(rows_per_program)))
    num_warps = max(4, min(32, block_rows * block_v // 1024))
    return block_rows, block_v, num_warps


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
    seed=0,
    offset=0,
    return_mixed: bool = False,
    check_values: bool = True,
    rows_per_program: Optional[int] = None,
):
    """Launch the fused kernel on [B, V] logits; tokens LongTensor [B] (and mixed fp32 [B, V]).

    Per-row knobs given as tensors are value-checked (a host sync) unless check_values=False,
    which the engine passes inside CUDA-graph capture after validating the request once.
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
        uncond = cond  # never read: a scale <= 1 selects cond

    f32 = torch.float32
    cfg_t = _per_row(cfg_scale, "cfg_scale", batch, device, f32, check_values)
    w2s_t = _per_row(w2s_scale, "w2s_scale", batch, device, f32, check_values)
    temp_t = _per_row(temperature, "temperature", batch, device, f32, check_values)
    top_k_t = _per_row(top_k, "top_k", batch, device, torch.int64, check_values)
    top_p_t = _per_row(top_p, "top_p", batch, device, f32, check_values)
    seed_t = _philox_tensor(seed, "seed", device)
    offset_t = _philox_tensor(offset, "offset", device)

    tokens = torch.empty(batch, device=device, dtype=torch.int64)
    mixed = torch.empty(batch, vocab, device=device, dtype=f32) if return_mixed else tokens  # dummy ptr
    block_rows, block_v, num_warps = launch_config(vocab, device.type == "cuda" and not INTERPRETED,
                                                   rows_per_program)
    grid = (math.ceil(batch / block_rows),)
    _fused_guided_sample_kernel[grid](
        cond, uncond if uncond is not None else cond, weak if weak is not None else cond,
        cfg_t, w2s_t, temp_t, top_p_t, top_k_t, seed_t, offset_t, tokens, mixed,
        batch, vocab,
        cond.stride(0), (uncond if uncond is not None else cond).stride(0),
        (weak if weak is not None else cond).stride(0), mixed.stride(0) if return_mixed else 0,
        MODE=MODE_IDS[mode], WRITE_MIXED=return_mixed, BLOCK_ROWS=block_rows, BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return (tokens, mixed) if return_mixed else tokens


# True when triton.jit produced an interpreter function (TRITON_INTERPRET=1 was set before triton
# was imported): the kernel then runs on CPU tensors, slowly -- tests only.
INTERPRETED = type(_fused_guided_sample_kernel).__name__ == "InterpretedFunction"
