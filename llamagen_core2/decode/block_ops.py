"""The ops of one LlamaGen transformer block but its cuBLAS GEMMs: torch references and dispatching entry points.

The unfused decode step of a block is about ten launches: add+RMSNorm, QKV GEMM, RoPE+KV-write,
decode attention (one or two launches), out GEMM, add+RMSNorm, W1|W3 GEMM, SwiGLU, W2 GEMM, the GEMMs cuBLAS
(`F.linear`); the fused step is five or six: add+RMSNorm+QKV+RoPE+KV write, attention, a skinny out GEMM,
add+RMSNorm+W1|W3+SwiGLU, a skinny W2 GEMM (docs/decode_kernels.md). This module owns every op but the cuBLAS
GEMMs. Each has
  * `<op>_reference`: the torch formulation, written to reproduce LlamaGen's math bit for bit (the CPU path
    and the test oracle), and
  * `<op>(..., backend=...)`: the entry point the block calls. `backend` is "torch" or "triton", decided
    once by the caller with `llamagen_core2.kernels.dispatch.select_backend(device)`; "triton" calls the
    launcher in `llamagen_core2.kernels.<op>` (imported lazily: this module never imports triton).
Arguments are checked once here (`check_*`, shared with the launchers) and raise InvalidArgument naming the
argument. Values that live on the device (positions) cannot be checked without a host sync: positions
outside the cache are the caller's contract (the kernels skip such writes; the references raise on CPU).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------------- residual add + RMSNorm
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


def add_rmsnorm_reference(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., d], weight [d] -> (normed, h) with h = x + residual (x when residual is None).

    LlamaGen's RMSNorm: normalise in fp32, cast back to h's dtype, then scale in the weight/h dtype
    (the order matters in bf16)."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * weight
    return normed, h


def add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float, *,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed [..., d] in promote(x.dtype, weight.dtype), h [..., d] in x.dtype); see add_rmsnorm_reference."""
    check_backend(backend)
    if backend == "triton":
        from ..kernels.add_rmsnorm import add_rmsnorm_triton

        return add_rmsnorm_triton(x, residual, weight, eps)
    check_add_rmsnorm_args(x, residual, weight, eps)
    return add_rmsnorm_reference(x, residual, weight, eps)


# ---------------------------------------------------------------------- RoPE + K/V cache write
def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [R, L, H, D], rope [L, D/2, 2] (cos, sin) -> rotated x; interleaved pairs (2m, 2m+1), computed in fp32
    and cast back to x.dtype (LlamaGen's apply_rotary_emb). Prefix positions have cos = sin = 0: q, k -> 0."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = rope[None, :, None, :, 0]
    sin = rope[None, :, None, :, 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


def check_rope_kv_write_args(qkv, rope, positions, cache_k, cache_v, row_start) -> tuple[int, int, int, int, int]:
    """-> (R, L, H, S, D)."""
    _check_float("qkv", qkv, 3)
    rows_total, H, S, D = _check_cache(cache_k, cache_v, qkv)
    R, L, width = qkv.shape
    if width != 3 * H * D:
        raise InvalidArgument(f"qkv must be [R, L, 3*H*D] = [.., .., {3 * H * D}] for the cache's H={H}, D={D}, "
                              f"got {_shape(qkv)}")
    if D % 2:
        raise InvalidArgument(f"head_dim must be even for RoPE, got the cache's D={D}")
    _check_float("rope", rope, 3)
    if rope.shape[1:] != (D // 2, 2):
        raise InvalidArgument(f"rope must be a (cos, sin) table [P, {D // 2}, 2], got {_shape(rope)}")
    _check_same_device("rope", rope, qkv)
    _check_positions("positions", positions, L, qkv)
    _check_row_start(row_start, R, rows_total)
    return R, L, H, S, D


def rope_kv_write_reference(qkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor,
                            cache_k: torch.Tensor, cache_v: torch.Tensor, row_start: int) -> torch.Tensor:
    """qkv [R, L, 3*H*D] (q | k | v, heads contiguous) at sequence positions [L] -> rotated q [R, H, L, D].

    Rotates q and k with rope[positions] ([L, D/2, 2] (cos, sin)) on interleaved pairs (2m, 2m+1) in fp32,
    cast back to qkv.dtype (LlamaGen's apply_rotary), and writes rotated k and raw v into
    cache[row_start + r, :, positions[l], :]."""
    R, L, _ = qkv.shape
    H, D = cache_k.shape[1], cache_k.shape[3]
    table = rope.index_select(0, positions).float()  # [L, D/2, 2]
    q, k, v = qkv.view(R, L, 3, H, D).unbind(2)
    rows = slice(row_start, row_start + R)
    cache_k[rows].index_copy_(2, positions, apply_rotary(k, table).transpose(1, 2))
    cache_v[rows].index_copy_(2, positions, v.transpose(1, 2))
    return apply_rotary(q, table).transpose(1, 2).contiguous()


def rope_kv_write(qkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, row_start: int, *, backend: str) -> torch.Tensor:
    """Rotated q [R, H, L, D] (contiguous); K/V written into the cache. See rope_kv_write_reference."""
    check_backend(backend)
    if backend == "triton":
        from ..kernels.rope_kv_write import rope_kv_write_triton

        return rope_kv_write_triton(qkv, rope, positions, cache_k, cache_v, row_start)
    check_rope_kv_write_args(qkv, rope, positions, cache_k, cache_v, row_start)
    return rope_kv_write_reference(qkv, rope, positions, cache_k, cache_v, row_start)


# ---------------------------------------------------------------------- SwiGLU
def check_swiglu_args(gate_up) -> int:
    """-> F (half the last dimension)."""
    _check_float("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise InvalidArgument(f"gate_up must be [..., 2F] (w1 x | w3 x) with an even, non-zero last dimension, "
                              f"got {_shape(gate_up)}")
    return gate_up.shape[-1] // 2


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] = (w1 x | w3 x) -> silu(w1 x) * w3 x [..., F], each op rounded to the dtype like torch."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor, *, backend: str) -> torch.Tensor:
    check_backend(backend)
    if backend == "triton":
        from ..kernels.swiglu import swiglu_triton

        return swiglu_triton(gate_up)
    check_swiglu_args(gate_up)
    return swiglu_reference(gate_up)


# ---------------------------------------------------------------------- attention masks / decode attention
def attention_mask(positions: torch.Tensor, max_end: int, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool mask [R|1, 1, L, max_end] for queries at `positions` [L] (device) over keys 0..max_end-1: causal, and
    with key_valid [R, >= max_end] (t2i padding) padded prefix keys hidden except on the diagonal (LlamaGen)."""
    keys = torch.arange(max_end, device=positions.device)
    mask = keys[None, :] <= positions[:, None]  # [L, max_end]
    if key_valid is None:
        return mask[None, None]
    mask = (mask[None] & key_valid[:, None, :max_end]) | (keys[None, :] == positions[:, None])[None]
    return mask[:, None]


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


def decode_attention_reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, row_start: int,
                               position: torch.Tensor, key_valid: Optional[torch.Tensor],
                               max_end: int) -> torch.Tensor:
    """q [R, H, 1, D] at sequence `position` ([1] on the device) -> attention output [R, H, 1, D].

    Key p of cache row row_start + r is attended iff p <= position and (key_valid is None or
    key_valid[row_start + r, p] or p == position): the t2i prefix mask with LlamaGen's diagonal kept.
    SDPA (scale 1/sqrt(D)) over the cache sliced to [:max_end] with a boolean mask, as the static decoder
    reads a length bucket."""
    R = q.shape[0]
    rows = slice(row_start, row_start + R)
    mask = attention_mask(position, max_end, None if key_valid is None else key_valid[rows])
    return F.scaled_dot_product_attention(q, cache_k[rows, :, :max_end], cache_v[rows, :, :max_end], attn_mask=mask)


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, row_start: int,
                     position: torch.Tensor, key_valid: Optional[torch.Tensor], max_end: int, *,
                     backend: str) -> torch.Tensor:
    """out [R, H, 1, D] in q.dtype; see decode_attention_reference. The Triton kernel reads `position` from the
    device and walks keys 0..position only: max_end does not change its work or its result."""
    check_backend(backend)
    if backend == "triton":
        from ..kernels.decode_attention import decode_attention_triton

        return decode_attention_triton(q, cache_k, cache_v, row_start, position, key_valid, max_end)
    check_decode_attention_args(q, cache_k, cache_v, row_start, position, key_valid, max_end)
    return decode_attention_reference(q, cache_k, cache_v, row_start, position, key_valid, max_end)


# ---------------------------------------------------------------------- fused decode-layer ops (issue 21)
# Each fused kernel in kernels/ (norm_qkv_rope.py, norm_w13_swiglu.py, skinny_gemm.py) has its reference here,
# composed from the references above and F.linear, so every piece of math has one implementation. The decode step
# of run_blocks calls the entry points below where the engine's timed choice picked them for the layer's shape
# (decode_ops.py, docs/decode_kernels.md). `workspace` is the caller's kernels.skinny_gemm.SplitKWorkspace (the
# split-K scratch; ignored by the torch path).
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


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight [N, K] -> x @ weight.T [..., N] (F.linear, no bias: wo and w2 of a block)."""
    return F.linear(x, weight)


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
    if D % 2:
        raise InvalidArgument(f"head_dim must be even for RoPE, got the cache's D={D}")
    _check_float("rope", rope, 3)
    if rope.shape[1:] != (D // 2, 2):
        raise InvalidArgument(f"rope must be a (cos, sin) table [P, {D // 2}, 2], got {_shape(rope)}")
    _check_same_device("rope", rope, x)
    _check_positions("positions", positions, L, x)
    _check_row_start(row_start, R, rows_total)
    return R, L, H, S, D


def norm_qkv_rope_reference(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
                            eps: float, wqkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor,
                            cache_k: torch.Tensor, cache_v: torch.Tensor,
                            row_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention half's entry of one block: x, residual [R, L, d] at sequence positions [L] (device) ->
    (rotated q [R, H, L, D], h [R, L, d]); rotated k and raw v written into cache rows row_start.. at positions.

    add_rmsnorm (h = x + residual, normed = RMSNorm(h)), the wqkv GEMM, then rope_kv_write."""
    normed, h = add_rmsnorm_reference(x, residual, norm_weight, eps)
    q = rope_kv_write_reference(F.linear(normed, wqkv), rope, positions, cache_k, cache_v, row_start)
    return q, h


def check_norm_w13_swiglu_args(x, residual, norm_weight, eps, w13) -> int:
    """-> F (the FFN width; w13 is [2F, d], rows w1 | w3)."""
    check_add_rmsnorm_args(x, residual, norm_weight, eps)
    d = x.shape[-1]
    _check_weight("w13", w13, None, d, torch.promote_types(x.dtype, norm_weight.dtype), x,
                  "2F x d: w1 rows 0:F, w3 rows F:2F")
    if w13.shape[0] % 2:
        raise InvalidArgument(f"w13 must be [2F, d] (w1 | w3) with an even number of rows, got {_shape(w13)}")
    return w13.shape[0] // 2


def norm_w13_swiglu_reference(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
                              eps: float, w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN half's entry of one block: x, residual [..., d] -> (silu(w1 n) * w3 n [..., F], h [..., d]) with
    h = x + residual and n = RMSNorm(h): add_rmsnorm, the [w1; w3] GEMM (FeedForward.w13), then swiglu."""
    normed, h = add_rmsnorm_reference(x, residual, norm_weight, eps)
    return swiglu_reference(F.linear(normed, w13)), h


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


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, *, backend: str, workspace=None) -> torch.Tensor:
    """x [..., K] @ weight.T -> [..., N] (wo, w2 of a decode step): the split-K skinny GEMM, or F.linear."""
    check_backend(backend)
    if backend == "triton":
        from ..kernels.skinny_gemm import skinny_linear_triton

        return skinny_linear_triton(x, weight, workspace=workspace)
    check_skinny_linear_args(x, weight)
    return skinny_linear_reference(x, weight)


def norm_qkv_rope(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                  wqkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, row_start: int, *, backend: str,
                  workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q [R, H, L, D], h [R, L, d]); K/V written into the cache. See norm_qkv_rope_reference."""
    check_backend(backend)
    if backend == "triton":
        from ..kernels.norm_qkv_rope import norm_qkv_rope_triton

        check_fused_norm_dtype(wqkv.dtype)
        return norm_qkv_rope_triton(x, residual, norm_weight, eps, wqkv, rope, positions, cache_k, cache_v,
                                    row_start, workspace=workspace)
    check_norm_qkv_rope_args(x, residual, norm_weight, eps, wqkv, rope, positions, cache_k, cache_v, row_start)
    return norm_qkv_rope_reference(x, residual, norm_weight, eps, wqkv, rope, positions, cache_k, cache_v, row_start)


def norm_w13_swiglu(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor, eps: float,
                    w13: torch.Tensor, *, backend: str, workspace=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(w1 n) * w3 n [..., F], h [..., d]). See norm_w13_swiglu_reference."""
    check_backend(backend)
    if backend == "triton":
        from ..kernels.norm_w13_swiglu import norm_w13_swiglu_triton

        check_fused_norm_dtype(w13.dtype)
        return norm_w13_swiglu_triton(x, residual, norm_weight, eps, w13, workspace=workspace)
    check_norm_w13_swiglu_args(x, residual, norm_weight, eps, w13)
    return norm_w13_swiglu_reference(x, residual, norm_weight, eps, w13)
