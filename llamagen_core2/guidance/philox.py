"""Counter-based race noise shared by the torch sampler and the fused Triton kernel.

Both sampling backends draw the uniforms of their race from Philox4x32-10 exactly as Triton's
`tl.rand(seed, counter)` computes them, so the same (seeds, offset) gives the same tokens on either
backend (up to the ulps of `log` on the GPU, see docs/sampling.md).

Layout rule (one place, used by both backends):
    seeds [1] (one key for the batch): row b, column j uses key seeds[0] and counter offset + b * V + j
    seeds [B] (one key per row):       row b, column j uses key seeds[b] and counter offset + j
    offset [B] (one counter base per row, either kind of seeds): row b, column j uses counter offset[b] + j,
        so row b draws exactly what a one-row call with its key and offset[b] draws (Jacobi decoding: rows at
        different token indices). A scalar offset o with one key is the same as the per-row offsets o + b * V.
Counters are 64-bit (Triton splits an int64 counter into the Philox words c0 = low 32 bits,
c1 = high 32 bits; below 2**32 this is the same stream as an int32 counter). A caller that reuses
its keys for another draw advances `offset` by the counters one draw uses: `V` with per-row keys,
`B * V` with one key -- `counters_per_draw` says which.
"""
from __future__ import annotations

from typing import Union

import torch

from ..errors import InvalidArgument

# Philox4x32 constants and round count of triton/language/random.py (N_ROUNDS_DEFAULT = 10).
PHILOX_ROUNDS = 10
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_LOW32 = 0xFFFFFFFF
# triton's uint_to_uniform_float scale for 32-bit inputs: the largest value with INT32_MAX * scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10
MAX_COUNTER = 2 ** 63 - 1

Offset = Union[int, torch.Tensor]




def philox_uniform(seeds: torch.Tensor, offset: Offset, vocab: int) -> torch.Tensor:
    """seeds int64 [B] (Philox keys), offset int or int64 tensor [1] or [B] (per row) -> float32 [B, vocab].

    Element (b, j) is bit for bit `tl.rand(seeds[b], offset + j)` (per-row offsets: `offset[b] + j`) of the
    installed Triton: the key
    is the seed's (low, high) 32-bit words, the counter words are (low, high, 0, 0) of the 64-bit
    counter, 10 rounds, and the first output word becomes a float in [0, 1) by Triton's
    `uint_to_uniform_float` (an int32 bitcast, ~x for negatives, times 4.6566127342e-10 in fp32).
    Vectorised int64 arithmetic; `offset` may live on the device (no host sync).
    """
    if not isinstance(seeds, torch.Tensor) or seeds.dim() != 1 or seeds.dtype != torch.int64:
        raise InvalidArgument(f"seeds must be an int64 tensor [B], got {_describe(seeds)}")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
        raise InvalidArgument(f"vocab must be a positive int, got {vocab!r}")
    device = seeds.device
    cols = torch.arange(vocab, device=device, dtype=torch.int64)
    if isinstance(offset, torch.Tensor):
        if offset.numel() not in (1, seeds.shape[0]):
            raise InvalidArgument(f"offset must be an int or an integer tensor with 1 or {seeds.shape[0]} (one per "
                                  f"row) elements, got {_describe(offset)}")
        base = offset.to(device=device, dtype=torch.int64).reshape(-1, 1)  # [1, 1] or [B, 1]
    else:
        base = torch.full((1, 1), int(offset), device=device, dtype=torch.int64)
    counter = base + cols  # [1, V] or [B, V]
    if device.type != "cpu":
        return _philox(seeds, counter)
    # CPU: tiles of ~2**16 counters keep the ten rounds' int64 temporaries in cache (3x faster at 4M)
    out = torch.empty(seeds.shape[0], vocab, dtype=torch.float32)
    rows = max(1, _CPU_TILE // vocab)
    width = min(vocab, _CPU_TILE)
    for r in range(0, seeds.shape[0], rows):
        rows_counter = counter if counter.shape[0] == 1 else counter[r:r + rows]
        for c in range(0, vocab, width):
            out[r:r + rows, c:c + width] = _philox(seeds[r:r + rows], rows_counter[:, c:c + width])
    return out


_CPU_TILE = 2 ** 16


def _philox(seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Keys [R] x counters [1, C] (shared) or [R, C] (per row) -> float32 uniforms [R, C] (philox_uniform's
    arithmetic)."""
    shape = (seeds.shape[0], counter.shape[-1])
    c0 = (counter & _LOW32).expand(shape)
    c1 = ((counter >> 32) & _LOW32).expand(shape)
    c2 = torch.zeros(shape, dtype=torch.int64, device=counter.device)
    c3 = c2
    k0 = (seeds & _LOW32)[:, None]
    k1 = ((seeds >> 32) & _LOW32)[:, None]
    for _ in range(PHILOX_ROUNDS):
        # 32x32 -> 64-bit products of uint32 values held in int64: the multiply wraps modulo 2**64,
        # which keeps the low 64 bits exact; hi = (p >> 32) & mask, lo = p & mask. In place where
        # possible: the row-sized temporaries dominate the cost on a CPU.
        prod_b = c2 * _ROUND_B
        prod_a = c0 * _ROUND_A
        lo_b = prod_b & _LOW32
        lo_a = prod_a & _LOW32
        c0 = prod_b.bitwise_right_shift_(32).bitwise_and_(_LOW32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = prod_a.bitwise_right_shift_(32).bitwise_and_(_LOW32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1, c3 = lo_b, lo_a
        k0 = (k0 + _KEY_A) & _LOW32
        k1 = (k1 + _KEY_B) & _LOW32
    # uint32 -> int32 bitcast; negative x becomes ~x = 2**32 - 1 - c0 as a non-negative int.
    folded = torch.where(c0 >= 2 ** 31, _LOW32 - c0, c0)
    return folded.to(torch.float32) * _UNIFORM_SCALE  # a Python float: no host-to-device copy per draw


def counters_per_draw(n_seeds: int, batch: int, vocab: int, per_row_offsets: bool = False) -> int:
    """How far a draw moves the counter: V with per-row keys or per-row offsets (each row's own base), B * V with
    one key for the batch and one offset."""
    return vocab if n_seeds > 1 or per_row_offsets else batch * vocab


def per_row_offsets(offset: Offset, batch: int) -> bool:
    """True when `offset` is a tensor holding one counter base per row (B > 1 elements); for B = 1 both layouts
    are the same stream."""
    return isinstance(offset, torch.Tensor) and batch > 1 and offset.numel() == batch


def counter_strides(n_seeds: int, vocab: int, offsets_per_row: bool = False) -> tuple[int, int, int]:
    """(seed stride, offset stride, counter row stride) of the layout rule: key index = row * seed stride,
    counter = offset[row * offset stride] + row * counter row stride + column."""
    if offsets_per_row:
        return (1 if n_seeds > 1 else 0), 1, 0
    return (1, 0, 0) if n_seeds > 1 else (0, 0, vocab)


def race_uniforms(seeds: torch.Tensor, offset: Offset, batch: int, vocab: int) -> torch.Tensor:
    """The race uniforms [B, V] of the layout rule (module doc) for checked keys [1] or [B] and a checked offset
    (int, [1] or [B])."""
    if per_row_offsets(offset, batch):
        return philox_uniform(seeds.reshape(-1).expand(batch) if seeds.numel() == 1 else seeds, offset, vocab)
    if seeds.numel() == 1:
        return philox_uniform(seeds.reshape(1), offset, batch * vocab).view(batch, vocab)
    return philox_uniform(seeds, offset, vocab)


def check_seeds(seeds, batch: int, vocab: int, device) -> torch.Tensor:
    """An int in [0, 2**63), or an integer tensor with 1 or B elements -> int64 tensor [1] or [B] on
    `device`. Also checks that one draw's counters fit (B * V <= 2**31 - 1 with a single key)."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype not in (torch.int64, torch.int32) or seeds.numel() not in (1, batch) or seeds.dim() > 1:
            raise InvalidArgument(f"seeds must be an int, or an integer tensor with 1 or {batch} (one per row) "
                                  f"elements, got {_describe(seeds)}")
        seeds = seeds.to(device=device, dtype=torch.int64).reshape(-1)
    elif isinstance(seeds, bool) or not isinstance(seeds, int) or not (0 <= seeds < 2 ** 63):
        raise InvalidArgument(f"seeds must be an int in [0, 2**63) or an integer tensor, got {seeds!r}")
    else:
        seeds = torch.full((1,), seeds, device=device, dtype=torch.int64)  # a fill kernel: no host copy
    span = counters_per_draw(seeds.numel(), batch, vocab)
    if span > 2 ** 31 - 1:
        raise InvalidArgument(f"one draw needs {span} counters (batch * vocab with a single seed); "
                              f"at most 2**31 - 1 are supported -- pass one seed per row")
    return seeds


def check_offset(offset, batch: int, vocab: int, n_seeds: int) -> Offset:
    """An int with offset + one draw's counters <= 2**63 - 1, or an integer tensor with one element or B (one
    counter base per row; device-resident, unchecked: its values are never read on the host)."""
    if isinstance(offset, torch.Tensor):
        if offset.numel() not in (1, batch) or offset.dim() > 1 or offset.dtype not in (torch.int64, torch.int32):
            raise InvalidArgument(f"offset must be an int or an integer tensor with 1 or {batch} (one per row) "
                                  f"elements, got {_describe(offset)}")
        return offset
    span = counters_per_draw(n_seeds, batch, vocab)
    if isinstance(offset, bool) or not isinstance(offset, int) or not (0 <= offset <= MAX_COUNTER - span):
        raise InvalidArgument(f"offset must be an int in [0, 2**63 - {span}] or an integer tensor with one element, "
                              f"got {offset!r}")
    return offset


def draw_keys(generator, batch: int, device) -> torch.Tensor:
    """One fresh int64 Philox key per row [B], drawn with torch.randint on the generator's own device
    (no host sync on CUDA; the default generator of `device` when `generator` is None), then moved
    to `device`."""
    gen_device = generator.device if generator is not None else torch.device(device)
    keys = torch.randint(0, MAX_COUNTER, (batch,), generator=generator, device=gen_device, dtype=torch.int64)
    return keys.to(device)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} with shape {list(value.shape)}"
    return repr(value)
