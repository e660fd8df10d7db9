"""Which fused decode-layer kernels a decode step runs, per layer shape, chosen by measurement.

Why (docs/decode_kernels.md): the fused kernels were written without a GPU, so each replaces its group of the
unfused step only where it measured faster for that shape, and the engine can never be slower than that path.

Contract:
  * `DecodeOps(norm_qkv_rope, wo, norm_w13_swiglu, w2, workspace)`: what `model.run_blocks` runs at a device
    position with the Triton backend, one flag per group of the unfused step:
        norm_qkv_rope    add+RMSNorm, wqkv GEMM, RoPE + KV write  -> block_ops.norm_qkv_rope (one launch)
        wo               the out projection (cuBLAS)              -> block_ops.skinny_linear (split-K, one launch)
        norm_w13_swiglu  add+RMSNorm, W1|W3 GEMM, SwiGLU          -> block_ops.norm_w13_swiglu (one launch)
        w2               W2 (cuBLAS)                              -> block_ops.skinny_linear
    Attention is the same either way: the decode-attention kernel for one query per row (its split from
    kernels.decode_attention.num_kv_splits; one launch unsplit), SDPA with the device-built mask for a window.
    All four set: 5 launches per layer, 6 when attention splits. `workspace` is the caller's
    kernels.skinny_gemm.SplitKWorkspace, shared by every fused launch of a step on one stream. `key` (the four
    flags) joins a CUDA graph's key: the flags change what a graph holds.
  * `LayerShape.of(layers, rows, width)`: what one decision is for -- rows x width GEMM rows (a step: width 1; a
    Jacobi window: width W), the layer's dims and dtype. Every layer of a trunk has one shape, so one decision
    serves all of them; the weak model's trunk has its own shapes, hence its own decisions.
  * `choose(layers, rope, shape, device, workspace, chooser=None) -> DecodeOps`: per op, one
    kernels.dispatch.choose_decode_op call with the two candidates below (the unfused path first, the fused kernel
    second): timed once per (op, device, shape key) on CUDA and cached by the guard (kernels/timed_choice.py);
    call it before any CUDA-graph capture. On a CPU nothing is timed: auto keeps the unfused path,
    LLAMAGEN_CORE2_KERNELS=triton forces the fused one (under the interpreter: how the CPU tests run it). fp16
    never gets the fused norm kernels (block_ops.check_fused_norm_dtype).
  * `reserve(workspace, shape, device)`: grows the workspace to what any fused launch of `shape` needs
    (kernels.skinny_gemm.plan_launch, the launchers' own sizing); called before the timing, so neither a timing
    nor a capture grows it.
The candidates run on representative inputs (N(0, 1) activations from a fixed generator, the trunk's layer-0
weights, a scratch cache of `width` positions), allocated on their first run: nothing is allocated when a
decision is cached or forced, or on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import block_ops
from .memory import element_size

OPS = ("norm_qkv_rope", "wo", "norm_w13_swiglu", "w2")
GUARD_OPS = {"norm_qkv_rope": "decode.norm_qkv_rope", "wo": "decode.linear",  # the op names the guard keys by
             "norm_w13_swiglu": "decode.norm_w13_swiglu", "w2": "decode.linear"}
NORM_OPS = ("norm_qkv_rope", "norm_w13_swiglu")


@dataclass(frozen=True)
class DecodeOps:
    norm_qkv_rope: bool = False
    wo: bool = False
    norm_w13_swiglu: bool = False
    w2: bool = False
    workspace: Any = None  # kernels.skinny_gemm.SplitKWorkspace (the caller's); None when no flag is set

    @property
    def key(self) -> tuple:
        return (self.norm_qkv_rope, self.wo, self.norm_w13_swiglu, self.w2)


@dataclass(frozen=True)
class LayerShape:
    rows: int      # sequences R
    width: int     # positions per sequence L (1: a decode step; W: a Jacobi window)
    dim: int
    n_head: int
    head_dim: int
    ffn_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, layers, rows: int, width: int) -> "LayerShape":
        """The shape of `layers` (a trunk's TransformerBlocks) run over rows x width positions."""
        attention, ffn = layers[0].attention, layers[0].feed_forward
        return cls(rows, width, attention.wqkv.weight.shape[1], attention.n_head, attention.head_dim,
                   ffn.w13.shape[0] // 2, attention.wqkv.weight.dtype)

    @property
    def gemm_rows(self) -> int:
        return self.rows * self.width

    def guard_key(self, op: str) -> tuple:
        """The guard's shape key of `op`: the GEMM's rows, dims and dtype (and the window width for the RoPE op)."""
        M, d, F_, dtype = self.gemm_rows, self.dim, self.ffn_dim, str(self.dtype).replace("torch.", "")
        return {"norm_qkv_rope": (M, self.width, d, 3 * self.n_head * self.head_dim, dtype),
                "wo": (M, d, d, dtype),             # (rows, K, N, dtype) of decode.linear
                "norm_w13_swiglu": (M, d, F_, dtype),
                "w2": (M, F_, d, dtype)}[op]


class _Inputs:
    """Representative inputs made on first use (nothing is allocated unless a timing runs)."""

    def __init__(self, make: Callable[[torch.Generator], tuple], device):
        self.make, self.device, self.value = make, torch.device(device), None

    def __call__(self) -> tuple:
        if self.value is None:
            self.value = self.make(torch.Generator(device=self.device).manual_seed(0))
        return self.value


def candidates(layers, rope: torch.Tensor, shape: LayerShape, op: str, device, workspace) -> list:
    """[Candidate('unfused', 'torch', ...), Candidate('fused', 'triton', ...)] for `op` at `shape`: one call each of
    today's group (the Triton row kernels around cuBLAS) and of the fused kernel, on the same inputs."""
    from ..kernels.timed_choice import Candidate

    layer = layers[0]
    attention, ffn = layer.attention, layer.feed_forward
    R, L, M, d = shape.rows, shape.width, shape.gemm_rows, shape.dim
    H, D, dtype = shape.n_head, shape.head_dim, shape.dtype

    def randn(g, *size):
        return torch.randn(*size, generator=g, device=device, dtype=dtype)

    if op == "norm_qkv_rope":
        norm = layer.attention_norm
        inputs = _Inputs(lambda g: (randn(g, R, L, d), randn(g, R, L, d), torch.arange(L, device=device),
                                    torch.zeros(R, H, L, D, device=device, dtype=dtype),
                                    torch.zeros(R, H, L, D, device=device, dtype=dtype)), device)

        def unfused():
            x, residual, positions, cache_k, cache_v = inputs()
            normed, h = block_ops.add_rmsnorm(x, residual, norm.weight, norm.eps, backend="triton")
            return block_ops.rope_kv_write(F.linear(normed, attention.wqkv.weight), rope, positions, cache_k,
                                           cache_v, 0, backend="triton"), h

        def fused():
            x, residual, positions, cache_k, cache_v = inputs()
            return block_ops.norm_qkv_rope(x, residual, norm.weight, norm.eps, attention.wqkv.weight, rope,
                                           positions, cache_k, cache_v, 0, backend="triton", workspace=workspace)
    elif op == "norm_w13_swiglu":
        norm = layer.ffn_norm
        inputs = _Inputs(lambda g: (randn(g, R, L, d), randn(g, R, L, d)), device)

        def unfused():
            x, residual = inputs()
            normed, h = block_ops.add_rmsnorm(x, residual, norm.weight, norm.eps, backend="triton")
            return block_ops.swiglu(F.linear(normed, ffn.w13), backend="triton"), h

        def fused():
            x, residual = inputs()
            return block_ops.norm_w13_swiglu(x, residual, norm.weight, norm.eps, ffn.w13, backend="triton",
                                             workspace=workspace)
    elif op in ("wo", "w2"):
        weight = attention.wo.weight if op == "wo" else ffn.w2.weight
        inputs = _Inputs(lambda g: (randn(g, M, weight.shape[1]),), device)

        def unfused():
            return F.linear(inputs()[0], weight)

        def fused():
            return block_ops.skinny_linear(inputs()[0], weight, backend="triton", workspace=workspace)
    else:
        raise ValueError(f"unknown decode op {op!r}; allowed: {OPS}")
    return [Candidate("unfused", "torch", unfused), Candidate("fused", "triton", fused)]


def choose(layers, rope: torch.Tensor, shape: LayerShape, device, workspace, chooser=None) -> DecodeOps:
    """The fused ops for `layers` at `shape` on `device` (see the module doc). Never inside a graph capture."""
    from ..kernels.dispatch import choose_decode_op

    flags = {op: choose_decode_op(device, GUARD_OPS[op], shape.guard_key(op), shape.dtype,
                                  lambda op=op: candidates(layers, rope, shape, op, device, workspace),
                                  fused_norm=op in NORM_OPS, chooser=chooser) == "fused"
             for op in OPS}
    return DecodeOps(**flags, workspace=workspace if any(flags.values()) else None)


def reserve(workspace, shape: LayerShape, device) -> None:
    """Grow `workspace` (a kernels.skinny_gemm.SplitKWorkspace) to the room any fused launch of `shape` needs,
    chosen or not (nothing when none splits K): called before the candidates are timed, it is allocated on the
    caller's stream and never grows during a timing or a capture."""
    from ..kernels.norm_qkv_rope import plan_qkv_launch
    from ..kernels.norm_w13_swiglu import plan_w13_launch
    from ..kernels.skinny_gemm import plan_launch

    M, d, F_, size = shape.gemm_rows, shape.dim, shape.ffn_dim, element_size(shape.dtype)
    launches = (plan_qkv_launch(M, shape.n_head, shape.head_dim, d, device, size),
                plan_launch(M, d, d, device, size),                                              # wo
                plan_w13_launch(M, F_, d, device, size),
                plan_launch(M, d, F_, device, size))                                             # w2
    floats, counters = max(launch.floats for launch in launches), max(launch.counters for launch in launches)
    if floats:
        workspace.buffers(floats, counters, device)
