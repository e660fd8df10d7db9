"""SwiGLU activation silu(gate) * up in one pass (reference: llamagen_core2.decode.block_ops.swiglu_reference).

    gate_up [..., 2F] (first half w1 x, second half w3 x: one GEMM against the row-concatenated [w1; w3])
    -> out [..., F] in gate_up's dtype

Rounding follows torch's two ops: F.silu in fp32 as gate / (1 + exp(-gate)) with an IEEE division (torch's CUDA
and CPU kernels use that formula) rounded to the dtype, then the product with `up` in fp32 (exact for two
bf16/fp16 values) rounded once. On a GPU exp is libdevice's expf (the function torch's CUDA silu calls);
under the interpreter it is numpy's exp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..decode.op_checks import check_swiglu_args, check_unit_stride
from .dispatch import interpreted, multiprocessor_count


@triton.jit
def _silu_mul(gate, up, LIBDEVICE_EXP: tl.constexpr):
    """silu(gate) * up in fp32 (the caller rounds it to the output dtype): silu = gate / (1 + exp(-gate)) in fp32
    with an IEEE division, rounded to gate's dtype like torch's F.silu, then the product with `up` in fp32 (exact
    for two bf16/fp16 values). Shared with the fused W1|W3 GEMM epilogue."""
    g = gate.to(tl.float32)
    if LIBDEVICE_EXP:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    silu = tl.div_rn(g, 1.0 + e).to(gate.dtype)
    return silu.to(tl.float32) * up.to(tl.float32)


@triton.jit
def _swiglu_kernel(
    gate_up_ptr, out_ptr,                # [M, 2F], [M, F] (unit stride along the last dim)
    n_cols,                              # F
    stride_gate_up, stride_out,
    LIBDEVICE_EXP: tl.constexpr,         # False under the interpreter, which has no libdevice
    BLOCK_F: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = cols < n_cols
    src = gate_up_ptr + row * stride_gate_up + cols
    gate = tl.load(src, mask=ok, other=0.0)
    up = tl.load(src + n_cols, mask=ok, other=0.0)
    out = _silu_mul(gate, up, LIBDEVICE_EXP).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=ok)


def launch_config(rows: int, ffn_dim: int, on_gpu: bool, sm_count: int = 132) -> tuple[int, int]:
    """(BLOCK_F, num_warps). Elementwise and memory bound: on a GPU, 1024 columns per program (4 warps, 8 values
    per thread) unless that leaves fewer than 2 programs per SM, then smaller blocks down to 256 so batch-1
    decode still spreads over the SMs. Under the interpreter, whole rows (fewest programs)."""
    if not on_gpu:
        return triton.next_power_of_2(ffn_dim), 1
    block = 1024
    while block > 256 and rows * triton.cdiv(ffn_dim, block) < 2 * sm_count:
        block //= 2
    return block, 4 if block >= 512 else 2


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Launcher: see the module doc. gate_up's last dimension must have unit stride."""
    ffn_dim = check_swiglu_args(gate_up)
    check_unit_stride(gate_up=gate_up)
    rows2 = gate_up.reshape(-1, 2 * ffn_dim)
    out = torch.empty(*gate_up.shape[:-1], ffn_dim, dtype=gate_up.dtype, device=gate_up.device)
    out2 = out.view(-1, ffn_dim)
    if rows2.shape[0] == 0:
        return out
    on_gpu = gate_up.device.type == "cuda" and not INTERPRETED
    block_f, num_warps = launch_config(rows2.shape[0], ffn_dim, on_gpu,
                                       multiprocessor_count(gate_up.device) if on_gpu else 132)
    grid = (rows2.shape[0], triton.cdiv(ffn_dim, block_f))
    _swiglu_kernel[grid](rows2, out2, ffn_dim, rows2.stride(0), out2.stride(0),
                         LIBDEVICE_EXP=on_gpu, BLOCK_F=block_f, num_warps=num_warps)
    return out


INTERPRETED = interpreted(_swiglu_kernel)
