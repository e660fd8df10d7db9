"""Skinny GEMMs (M <= 128 rows) for the decode step, with split-K reduced inside the same launch.

Reference: llamagen_core2.decode.block_ops.skinny_linear_reference (F.linear, no bias).

    x [..., K], weight [N, K] (x's dtype: fp32, bf16 or fp16) -> out = x @ weight.T [..., N] in x's dtype,
    accumulated in fp32

At decode batch sizes every weight byte is used for M <= 128 multiply-adds only, so the GEMM is bound by reading
the weight once (docs/decode_kernels.md has the bandwidth arithmetic). The kernel therefore
  * covers all M rows in one tile (BLOCK_M = next power of two >= 16, at most 128): each weight tile is read
    from DRAM exactly once; rows beyond M are masked (their loads cost nothing, tl.dot needs 16 rows anyway);
  * splits K across programs (SPLIT_K) when the N tiles alone would leave SMs idle -- N = 1280 columns are only
    40 tiles of 32 for an H100's 132 SMs (FlashInfer PR #4266 and CUTLASS's split-K skinny kernels beat cuBLAS
    1.15-1.59x at M = 1-32 this way).

Split-K in one launch, graph-capturable, deterministic. Each program (tile, split) writes its fp32 partial tile
into a caller-owned workspace (`SplitKWorkspace`), then arrives at the tile's int32 counter (a CTA barrier, then
an acq_rel atomic add at GPU scope, as CUTLASS's semaphore). The program that arrives last sums the SPLIT_K
partials in split order 0, 1, ..., SPLIT_K-1 (so the result does not depend on which program finished first:
same seed, same images), runs the epilogue and resets the counter to 0, leaving the workspace ready for the next
call without a memset launch. No program ever waits for another (the last one to arrive does the work), so
the grid needs no co-residency and any size is safe. Atomic fp32 accumulation was rejected: it needs a zeroed
buffer (a memset, or a reset by the last program anyway) and its summation order -- hence the rounding --
changes from run to run.
The partials cost SPLIT_K * M * N * 4 bytes of L2 traffic each way, small next to the weight (M <= 128, N*K*2).

The same machinery (`_arrive`, `_sum_partials`) serves the fused kernels norm_qkv_rope.py and norm_w13_swiglu.py.
One workspace may serve every GEMM of a step on one stream: each call leaves its counters at zero. Its buffers
keep their addresses as long as no call needs more room than the largest seen: size it before a CUDA graph
capture (`plan_launch` gives each launch's room from the shapes; the engine reserves it that way,
llamagen_core2/decode_ops.reserve).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..decode.op_checks import check_skinny_linear_args
from ..errors import InvalidArgument
from .dispatch import interpreted, multiprocessor_count

MAX_BLOCK_M = 128
MAX_SPLIT_K = 16
MIN_K_BLOCKS_PER_SPLIT = 2  # a split's partial round trip (write, read, add) is amortised over >= 2 K tiles


class GemmConfig(NamedTuple):
    """Launch settings of the skinny GEMM kernels. block_n counts output *units*: columns for the plain GEMM,
    rotation pairs (2 weight rows) for norm_qkv_rope, gate/up column pairs (2 weight rows) for norm_w13_swiglu."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


def gemm_config(rows: int, units: int, K: int, on_gpu: bool, sm_count: int = 132,
                weight_rows_per_unit: int = 1, element_size: int = 2) -> GemmConfig:
    """Tiles and split-K from the shapes and the SM count (a pure function; the timed choice measures it).

    GPU: BLOCK_M covers all rows (<= 128: the weight is read once); BLOCK_N = 32 units while BLOCK_M <= 32 (more
    programs for the same bytes; tl.dot needs >= 16) or while 64 would give more than 8192 accumulators (the
    fused kernels at 128 rows: two [128, 64] tiles spilled), else 64; BLOCK_K = 128 (64 at BLOCK_M = 128 or for fp32
    weights, so a pipeline stage of x and weight tiles stays <= 48 KB of shared memory); 4 warps, 8 when the
    accumulators would exceed 32 fp32 per thread (ptxas spilled the fused kernels' two [128, 64] accumulators at
    4 warps: benchmarks/kernel_resources.py --block); up to 4 pipeline stages in 160 KB; split-K is the smallest
    that gives >= one program per SM, at most K/(2 BLOCK_K) and MAX_SPLIT_K, rounded so that no split is empty
    (FA3's num_splits_heuristic skips split counts that leave an empty split the same way). Interpreter: one
    program per 64 units and no split (every program costs Python time; tests pass split configs explicitly)."""
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(rows)))
    if not on_gpu:
        return GemmConfig(block_m, min(64, max(16, triton.next_power_of_2(units))),
                          min(64, max(16, triton.next_power_of_2(K))), 1, 4, 1)
    block_n = 64 if block_m > 32 and block_m * 64 * weight_rows_per_unit <= 8192 else 32
    block_k = 64 if block_m >= 128 or element_size >= 4 else 128
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(units, block_n)
    k_blocks = triton.cdiv(K, block_k)
    split_k = max(1, min(triton.cdiv(sm_count, tiles), k_blocks // MIN_K_BLOCKS_PER_SPLIT, MAX_SPLIT_K))
    split_k = split_layout(K, block_k, split_k)[0]
    stage_bytes = (block_m + block_n * weight_rows_per_unit) * block_k * element_size
    num_stages = max(2, min(4, (160 * 1024) // stage_bytes))
    num_warps = 4 if block_m * block_n * weight_rows_per_unit <= 32 * 128 else 8  # <= 32 fp32 accumulators/thread
    return GemmConfig(block_m, block_n, block_k, split_k, num_warps, num_stages)


def split_layout(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(splits that are not empty, K per split: a multiple of block_k)."""
    k_per_split = triton.cdiv(triton.cdiv(K, block_k), split_k) * block_k
    return triton.cdiv(K, k_per_split), k_per_split


class SplitLaunch(NamedTuple):
    """One launch of a skinny GEMM kernel: its settings, the non-empty splits, K per split, the grid (m tiles,
    n tiles, splits) and the SplitKWorkspace room it needs (fp32 entries, int32 counters; 0 and 0 unsplit)."""
    config: GemmConfig
    split_k: int
    k_per_split: int
    grid: tuple
    floats: int
    counters: int


def plan_launch(rows: int, units: int, K: int, device, element_size: int, *, weight_rows_per_unit: int = 1,
                row_sums: bool = False, config: Optional[GemmConfig] = None) -> SplitLaunch:
    """The launch of a GEMM over `rows` rows, `units` output units of `weight_rows_per_unit` weight rows each, and
    K, on `device` (gemm_config unless `config` is given). `row_sums`: the norm-prologue kernels also keep each
    split's per-row sum of squares ([tiles, SPLIT_K, BLOCK_M] after the partials). A pure function of the
    shapes and the device: the launchers use it, and so does a caller that sizes its workspace before a CUDA
    graph capture (engine.Engine)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda" and not INTERPRETED
    if config is None:  # gemm_config's own are valid; a caller's is checked
        config = gemm_config(rows, units, K, on_gpu, multiprocessor_count(device) if on_gpu else 132,
                             weight_rows_per_unit=weight_rows_per_unit, element_size=element_size)
    else:
        config = check_config(config)
    split_k, k_per_split = split_layout(K, config.block_k, config.split_k)
    grid = (triton.cdiv(rows, config.block_m), triton.cdiv(units, config.block_n), split_k)
    tiles = grid[0] * grid[1]
    floats = counters = 0
    if split_k > 1:
        floats = split_k * (rows * units * weight_rows_per_unit + (tiles * config.block_m if row_sums else 0))
        counters = tiles
    return SplitLaunch(config, split_k, k_per_split, grid, floats, counters)


def check_config(config) -> GemmConfig:
    if not isinstance(config, GemmConfig):
        raise InvalidArgument(f"config must be a skinny_gemm.GemmConfig, got {type(config).__name__}")
    for name in ("block_m", "block_n", "block_k"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise InvalidArgument(f"config.{name} must be a power of two >= 16, got {value}")
    if config.block_m > MAX_BLOCK_M:
        raise InvalidArgument(f"config.block_m must be <= {MAX_BLOCK_M}, got {config.block_m}")
    if not 1 <= config.split_k <= MAX_SPLIT_K:
        raise InvalidArgument(f"config.split_k must be in [1, {MAX_SPLIT_K}], got {config.split_k}")
    if config.num_warps not in (1, 2, 4, 8, 16) or config.num_stages < 1:
        raise InvalidArgument(f"config.num_warps must be a power of two <= 16 and num_stages >= 1, got "
                              f"{config.num_warps}, {config.num_stages}")
    return config


class SplitKWorkspace:
    """Caller-owned scratch of the split-K reduction: fp32 partials and int32 arrival counters.

    The counters are zero between calls (each kernel's last-arriving program resets its own), so one workspace
    serves any number of sequential calls on one stream. Buffers grow when a call needs more; growing changes
    their address, so a CUDA graph must be captured after the largest shape has run once."""

    def __init__(self):
        self.partials: Optional[torch.Tensor] = None
        self.counters: Optional[torch.Tensor] = None

    def buffers(self, floats: int, counters: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 [>= floats], int32 [>= counters], all zero) on `device`."""
        device = torch.device(device)
        if self.partials is None or self.partials.device != device or self.partials.numel() < floats:
            self.partials = torch.empty(max(floats, 1), dtype=torch.float32, device=device)
        if self.counters is None or self.counters.device != device or self.counters.numel() < counters:
            self.counters = torch.zeros(max(counters, 1), dtype=torch.int32, device=device)
        return self.partials, self.counters


def workspace_buffers(workspace: Optional[SplitKWorkspace], floats: int, counters: int, device):
    if workspace is None:
        workspace = SplitKWorkspace()  # one-off: a counter memset per call; callers that care pass their own
    elif not isinstance(workspace, SplitKWorkspace):
        raise InvalidArgument(f"workspace must be None or a skinny_gemm.SplitKWorkspace, got "
                              f"{type(workspace).__name__}")
    return workspace.buffers(floats, counters, device)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: IEEE fp32 (tl.dot defaults to TF32 on a GPU, 10 mantissa bits); 16-bit: ignored."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------- split-K pieces shared by the kernels
@triton.jit
def _arrive(counter_ptr):
    """Count this program in at its tile's counter -> how many arrived before it (SPLIT_K - 1: the last).
    The barrier orders every thread's partial stores before the release; acq_rel makes the other programs'
    partials visible to this one when it is the last (CUTLASS's split-K semaphore, at GPU scope)."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _sum_partials(ptr, mask, split_stride, SPLIT_K: tl.constexpr):
    """Sum of the SPLIT_K fp32 partials at ptr + s * split_stride (any tile shape), in split order: the same
    rounding whichever program arrived last. Read through L2 (.cg): written by other SMs in this launch."""
    total = tl.load(ptr, mask=mask, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        total += tl.load(ptr + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _reset(counter_ptr):
    """The last program leaves its tile's counter at zero for the next call."""
    tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _split_k_dual_reduce(acc_a, acc_b, sum_squares, part, b_offset, out_ok, row_ok, squares_ptr, counter_ptr, tile,
                         split, split_stride, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """The split-K exchange both fused norm GEMMs end with: store this split's two partial tiles (at `part` and
    `part + b_offset`, splits `split_stride` apart) and its row sums of squares, count in at the tile's counter;
    -> (last, acc_a, acc_b, sum_squares): for the last split to arrive, the sums of every split's partials (in
    split order: skinny_gemm._sum_partials). The caller runs its epilogue where `last` and then resets the counter."""
    tl.store(part + split * split_stride, acc_a, mask=out_ok)
    tl.store(part + split * split_stride + b_offset, acc_b, mask=out_ok)
    squares_part = squares_ptr + tile * SPLIT_K * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(squares_part + split * BLOCK_M, sum_squares)
    last = _arrive(counter_ptr + tile) == SPLIT_K - 1
    if last:
        acc_a = _sum_partials(part, out_ok, split_stride, SPLIT_K)
        acc_b = _sum_partials(part + b_offset, out_ok, split_stride, SPLIT_K)
        sum_squares = _sum_partials(squares_part, row_ok, BLOCK_M, SPLIT_K)
    return last, acc_a, acc_b, sum_squares

@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, out_ptr,                 # [M, K] (unit stride on K), [N, K] (unit stride on K), [M, N]
    partial_ptr, counter_ptr,              # fp32 [SPLIT_K, M, N], int32 [m tiles x n tiles] (zero)
    M, N, K, k_per_split,
    stride_x, stride_w, stride_out,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
    lo = split * k_per_split
    hi = tl.minimum(lo + k_per_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hi
        x = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :]
    if SPLIT_K > 1:
        part = partial_ptr + (rows[:, None] * N + cols[None, :])
        tl.store(part + split * M * N, acc, mask=tile_ok)
        counter = counter_ptr + pid_m * tl.num_programs(1) + pid_n
        if _arrive(counter) == SPLIT_K - 1:
            acc = _sum_partials(part, tile_ok, M * N, SPLIT_K)
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
            _reset(counter)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, *, workspace: Optional[SplitKWorkspace] = None,
                         config: Optional[GemmConfig] = None) -> torch.Tensor:
    """Launcher: see the module doc. x's last dimension and weight's rows need unit stride. `workspace`: the
    caller's split-K scratch (a one-off one when None); `config`: overrides gemm_config (tests, benchmarks)."""
    N, K = check_skinny_linear_args(x, weight)
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise InvalidArgument(f"x and weight must have unit stride along their last dimension, got strides "
                              f"{x.stride()} and {weight.stride()}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    out2 = out.view(M, N)
    launch = plan_launch(M, N, K, x.device, weight.element_size(), config=config)
    config, split_k = launch.config, launch.split_k
    if split_k > 1:
        partials, counters = workspace_buffers(workspace, launch.floats, launch.counters, x.device)
    else:
        partials, counters = out2, out2  # never touched without a split
    _skinny_gemm_kernel[launch.grid](
        x2, weight, out2, partials, counters, M, N, K, launch.k_per_split,
        x2.stride(0), weight.stride(0), out2.stride(0),
        SPLIT_K=split_k, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages)
    return out


INTERPRETED = interpreted(_skinny_gemm_kernel)
