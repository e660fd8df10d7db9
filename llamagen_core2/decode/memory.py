"""Memory estimates for generation, and a refusal that happens before the allocator fails.

Contract:
  * `kv_cache_bytes(config, rows, max_len, dtype)` is exactly what `GPT.new_cache` (a `KVCache`) allocates
    (K and V, every layer, [rows, n_head, max_len, head_dim]).
  * `sampling_workspace_bytes(rows, vocab)` bounds the per-step logits workspace: the fp32 logits of every
    row plus the sampler's temporaries (mixed, filtered, probs, random race, scores, sort keys + int64
    indices for top-p) -- ~8 fp32-sized copies of [rows, V].
  * `activation_bytes(config, rows, prefix_len, dtype)` bounds the prefill activations (the decode step is
    smaller): hidden, qkv, FFN and the [rows, heads, T, T] attention scores of the longest prefill.
  * `estimate_generation_bytes(...)` sums them (+ weights when they are not resident yet).
  * `available_bytes(device)`: CUDA -> free memory from `torch.cuda.mem_get_info` plus blocks PyTorch has
    reserved but not handed out; CPU -> `MemAvailable` from /proc/meminfo (psutil when installed).
  * `check_fits(required, device, what)` raises InvalidArgument naming the batch/need/free amounts when
    `required` exceeds `available * (1 - headroom)`; None when the amount cannot be determined.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidArgument

HEADROOM = 0.05  # fraction of free memory left for the allocator's fragmentation and other tensors
SAMPLER_COPIES = 8  # fp32 [rows, V] temporaries of guidance + sampling (sort-based top-p needs int64 idx)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(config, rows: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of the static KV cache: 2 (K, V) x n_layer x rows x n_head x max_len x head_dim."""
    return 2 * config.n_layer * rows * config.n_head * max_len * config.head_dim * element_size(dtype)


def sampling_workspace_bytes(rows: int, vocab: int) -> int:
    return SAMPLER_COPIES * rows * vocab * 4


def activation_bytes(config, rows: int, prefix_len: int, dtype: torch.dtype) -> int:
    """Largest transient activations of one forward over `prefix_len` positions (prefill dominates)."""
    width = config.dim * 5 + 3 * config.ffn_dim  # x, normed, q|k|v, attn out, w1/w3/act of the FFN
    scores = config.n_head * prefix_len * prefix_len * 4  # math-path attention probabilities in fp32
    return rows * (prefix_len * width * element_size(dtype) + scores)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def estimate_generation_bytes(config, *, batch: int, rows: int, num_tokens: int, dtype: torch.dtype,
                              weights: int = 0, cache_resident: bool = False, positions_per_pass: int = 1) -> int:
    """Device bytes a generate() call still needs: KV cache (unless already allocated) + workspaces + weights
    (pass `weights=0` when the model is already on the device). `positions_per_pass` > 1: Jacobi windows (the
    logits of every window position, the prefill with the window appended, window-by-cache attention scores)."""
    T, W = config.cls_token_num, positions_per_pass
    max_len = T + num_tokens
    kv = 0 if cache_resident else kv_cache_bytes(config, rows, max_len, dtype)
    window_scores = rows * config.n_head * W * max_len * 4 if W > 1 else 0
    return (weights + kv + sampling_workspace_bytes(rows * W, config.vocab_size)
            + activation_bytes(config, rows, T + W - 1, dtype) + window_scores + batch * num_tokens * 8)


def available_bytes(device) -> Optional[int]:
    """Memory the next allocations on `device` can still get, or None when it cannot be determined."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        try:
            import psutil  # optional

            return int(psutil.virtual_memory().available)
        except ImportError:
            pass
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def check_fits(required: int, device, what: str, available: Optional[int] = None) -> None:
    """Raise InvalidArgument when `required` bytes do not fit in the free memory of `device`."""
    free = available_bytes(device) if available is None else available
    if free is None:
        return
    usable = int(free * (1.0 - HEADROOM))
    if required > usable:
        raise InvalidArgument(
            f"{what} needs about {gib(required)} on {torch.device(device)}, but only {gib(usable)} is free "
            f"({gib(free)} available minus {HEADROOM:.0%} headroom); reduce the batch size or num_tokens, "
            f"or use bf16 weights and cache")


def check_generation_fits(gpt, *, batch: int, rows: int, num_tokens: int, positions_per_pass: int = 1,
                          cache_resident: bool = False) -> None:
    """Refuse a generation whose KV cache (`rows` cache rows; none to allocate when `cache_resident`) + workspaces
    (`positions_per_pass` positions per forward: Jacobi windows) do not fit in `gpt`'s device memory."""
    weight = gpt.output.weight
    T = gpt.config.cls_token_num
    need = estimate_generation_bytes(gpt.config, batch=batch, rows=rows, num_tokens=num_tokens, dtype=weight.dtype,
                                     cache_resident=cache_resident, positions_per_pass=positions_per_pass)
    check_fits(need, weight.device, f"batch {batch} ({rows} cache rows x {T + num_tokens} positions, KV cache + "
                                    f"sampling workspace)")
