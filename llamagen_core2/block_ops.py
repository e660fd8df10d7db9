"""The non-GEMM ops of a LlamaGen transformer block: torch references and the fused-kernel dispatch.

Each op has one torch reference here (the CPU path and the test oracle, LlamaGen's math exactly) and a Triton
kernel of the same signature in `llamagen_core2.kernels`; `backend` ("torch" | "triton") is decided once per
generation by `kernels.dispatch.select_backend` and passed in.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def add_rmsnorm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float, *,
                backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., d] -> (normed, h) with h = x + residual (or x); LlamaGen's RMSNorm of h: normalise in
    fp32, cast back, then scale (the order matters in bf16)."""
    h = x if residual is None else x + residual
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).type_as(h) * weight, h


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [R, L, H, D], rope [L, D/2, 2] (cos, sin) -> rotated x; interleaved pairs (2m, 2m+1), computed in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos = rope[None, :, None, :, 0]
    sin = rope[None, :, None, :, 1]
    rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                           pairs[..., 1] * cos + pairs[..., 0] * sin], dim=-1)
    return rotated.flatten(3).type_as(x)


def rope_kv_write(qkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                  cache_v: torch.Tensor, row_start: int, *, backend: str = "torch") -> torch.Tensor:
    """qkv [R, L, 3*H*D] at sequence positions [L] (device) -> rotated q [R, H, L, D]; rotated k and v are written
    into cache rows row_start.. at those positions (cache [rows_total, H, S, D])."""
    R, L, _ = qkv.shape
    H, D = cache_k.shape[1], cache_k.shape[3]
    q, k, v = qkv.view(R, L, 3, H, D).unbind(2)
    table = rope.index_select(0, positions)
    cache_k[row_start:row_start + R].index_copy_(2, positions, apply_rotary(k, table).transpose(1, 2))
    cache_v[row_start:row_start + R].index_copy_(2, positions, v.transpose(1, 2))
    return apply_rotary(q, table).transpose(1, 2)


def swiglu(gate_up: torch.Tensor, *, backend: str = "torch") -> torch.Tensor:
    """gate_up [..., 2F] (w1 x | w3 x from one GEMM) -> silu(w1 x) * w3 x [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention_mask(positions: torch.Tensor, max_end: int, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool mask [R|1, 1, L, max_end] for queries at `positions` [L] over keys 0..max_end-1: causal, and with
    key_valid [R, >= max_end] (t2i padding) padded prefix keys hidden except on the diagonal (LlamaGen)."""
    keys = torch.arange(max_end, device=positions.device)
    mask = keys[None, :] <= positions[:, None]  # [L, max_end]
    if key_valid is None:
        return mask[None, None]
    mask = (mask[None] & key_valid[:, None, :max_end]) | (keys[None, :] == positions[:, None])[None]
    return mask[:, None]


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, row_start: int,
                     position: torch.Tensor, key_valid: Optional[torch.Tensor], max_end: int, *,
                     backend: str = "torch") -> torch.Tensor:
    """q [R, H, 1, D] at the device position [1] over cache rows row_start.. -> [R, H, 1, D]; keys 0..position
    (the reference reads [:max_end] masked, max_end a host bound >= position + 1)."""
    R = q.shape[0]
    rows = slice(row_start, row_start + R)
    mask = attention_mask(position, max_end, None if key_valid is None else key_valid[rows])
    return F.scaled_dot_product_attention(q, cache_k[rows, :, :max_end], cache_v[rows, :, :max_end], attn_mask=mask)
