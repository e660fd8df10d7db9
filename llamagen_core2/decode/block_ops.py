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
Arguments are checked once per call, by the torch path here or by the launcher, with the checks both share
(`op_checks.check_<op>_args`): InvalidArgument naming the argument.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .op_checks import (check_add_rmsnorm_args, check_backend, check_decode_attention_args, check_fused_norm_dtype,
                        check_norm_qkv_rope_args, check_norm_w13_swiglu_args, check_rope_kv_write_args,
                        check_skinny_linear_args, check_swiglu_args)


# ---------------------------------------------------------------------- residual add + RMSNorm
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
def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K], weight [N, K] -> x @ weight.T [..., N] (F.linear, no bias: wo and w2 of a block)."""
    return F.linear(x, weight)


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


def norm_w13_swiglu_reference(x: torch.Tensor, residual: Optional[torch.Tensor], norm_weight: torch.Tensor,
                              eps: float, w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN half's entry of one block: x, residual [..., d] -> (silu(w1 n) * w3 n [..., F], h [..., d]) with
    h = x + residual and n = RMSNorm(h): add_rmsnorm, the [w1; w3] GEMM (FeedForward.w13), then swiglu."""
    normed, h = add_rmsnorm_reference(x, residual, norm_weight, eps)
    return swiglu_reference(F.linear(normed, w13)), h


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
