"""Benchmark the transformer block's decode ops: Triton kernels vs their torch references (block_ops), with the %
of the bandwidth floor.

For each GPT preset (B, XL, XXL by default) x cache rows x filled length it times one decode-step call of
    add_rmsnorm       x, residual [rows, 1, dim] -> (normed, h)
    rope_kv_write     qkv [rows, 1, 3*dim] at position filled-1 -> q; K/V written into a [rows, H, S, D] cache
    swiglu            gate_up [rows, 1, 2*ffn] -> [rows, 1, ffn]
    decode_attention  q [rows, H, 1, D] over keys 0..filled-1 of the cache
and the fused decode-layer kernels of docs/decode_kernels.md (issue 21; the engine's step uses each where its
timed choice measured it faster than the unfused ops for that shape):
    norm_qkv_rope     add + RMSNorm + wqkv GEMM + RoPE + K/V write in one launch -> (q, h)
    norm_w13_swiglu   add + RMSNorm + [w1; w3] GEMM + SwiGLU in one launch -> (silu(w1 n) * w3 n, h)
    wo, w2            the skinny split-K GEMM: attention out [rows, dim] x [dim, dim]; FFN [rows, ffn] x [dim, ffn]
with the implementations
    triton       the kernel (CUDA, or the CPU interpreter with --interpret: a correctness smoke run, not a timing)
    unfused      fused ops only: what the step runs today for the same work -- the Triton row kernels
                 (add_rmsnorm, rope_kv_write, swiglu) around a cuBLAS F.linear
    torch        the reference in llamagen_core2.decode.block_ops (for wo / w2: F.linear, i.e. cuBLAS); for attention
                 SDPA with a boolean mask over the cache sliced to the static decoder's 64-position bucket end
                 (for the filled lengths here, multiples of 64, the bucket end is exactly the filled length: the
                 bucketed SDPA's best case)
    sdpa_nomask  attention only: SDPA over exactly the filled keys with no mask (what SDPA can do at best;
                 valid for c2i, where no prefix key is masked)
Only attention depends on the filled length; the other ops are timed once per (preset, rows) (filled = "-").
Before timing, every kernel's output is compared with the reference (max |diff| is reported; the run stops
if it exceeds --max-diff).

Timing: on CUDA, `--timing graph` (default) captures --iters calls in one CUDA graph and times its replay with
CUDA events (GPU time per call, as inside the engine's decode graph); `--timing eager` times plain calls
(includes Python launch overhead). On CPU, time.perf_counter over --iters calls. GB/s counts the compulsory
traffic: every input read once and every output written once (attention: q, the filled K and V, out; the GEMMs:
the weight, the activations in and out). floor_us = those bytes / the device's copy bandwidth (measured at
start-up, read + write counted, or --bandwidth-gbs); pct_of_floor = floor_us / us_per_call.

Writes benchmarks/results/block_kernels_<device>.csv and .md (one row per op x shape x impl) and prints the
CSV rows and a final JSON line.

    python benchmarks/bench_block_kernels.py                                   # GPU: bf16, the full grid
    python benchmarks/bench_block_kernels.py --issue-shapes                    # GPU: issue 21's shapes only
    python benchmarks/bench_block_kernels.py --device cpu --quick --threads 1  # CPU: fp32 references only
    python benchmarks/bench_block_kernels.py --device cpu --quick --threads 1 --interpret  # + interpreted kernels
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import copy_bandwidth  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BUCKET = 64  # the static decoder's attention length bucket
EPS = 1e-5
ISSUE_SHAPES = (("GPT-B", 2), ("GPT-XL", 16), ("GPT-XL", 128))  # issue 21: b1 CFG, b8 CFG, b64 CFG
OPS = ("add_rmsnorm", "rope_kv_write", "swiglu", "decode_attention", "norm_qkv_rope", "norm_w13_swiglu", "wo", "w2")
TINY = dict(dim=64, n_layer=2, n_head=4)  # --presets tiny: a smoke run on CPU (tests)


def preset_config(preset: str):
    from llamagen_core2.config import GPTConfig

    return GPTConfig.from_preset("GPT-B", **TINY) if preset == "tiny" else GPTConfig.from_preset(preset)


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy rate in GB/s over 256 MiB (16 MiB off a GPU): bench_generate.copy_bandwidth."""
    return copy_bandwidth(device, (256 if device.type == "cuda" else 16) * 2 ** 20) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def time_us(fn, device: torch.device, *, warmup: int, iters: int, timing: str) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e6 / iters
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if timing == "graph":
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()  # warm-up on the capture stream (allocator, cuBLAS/cuDNN workspaces)
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize(device)
        start.record()
        graph.replay()
        end.record()
    else:
        start.record()
        for _ in range(iters):
            fn()
        end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1e3 / iters


def max_diff(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def op_cases(config, rows: int, filled_lengths, max_len: int, dtype, device):
    """Yields (op, filled, bytes moved, {impl: callable}) for one preset and row count."""
    from llamagen_core2.decode import block_ops

    dim, H, D, ffn = config.dim, config.n_head, config.head_dim, config.ffn_dim
    elt = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device="cpu").manual_seed(rows)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x, residual, weight = rand(rows, 1, dim), rand(rows, 1, dim), rand(dim)
    yield "add_rmsnorm", "-", (4 * rows * dim + dim) * elt, {
        backend: (lambda b=backend: block_ops.add_rmsnorm(x, residual, weight, EPS, backend=b))
        for backend in ("triton", "torch")}

    qkv = rand(rows, 1, 3 * dim)
    rope = torch.randn(max_len, D // 2, 2, generator=g).to(device)
    position = torch.tensor([min(filled_lengths) - 1], device=device)
    caches = {backend: (rand(rows, H, max_len, D), rand(rows, H, max_len, D)) for backend in ("triton", "torch")}
    yield "rope_kv_write", "-", 6 * rows * dim * elt + D * 4, {
        backend: (lambda b=backend: block_ops.rope_kv_write(qkv, rope, position, *caches[b], 0, backend=b))
        for backend in ("triton", "torch")}

    gate_up = rand(rows, 1, 2 * ffn, scale=2.0)
    yield "swiglu", "-", 3 * rows * ffn * elt, {
        backend: (lambda b=backend: block_ops.swiglu(gate_up, backend=b)) for backend in ("triton", "torch")}

    q = rand(rows, H, 1, D)
    cache_k, cache_v = rand(rows, H, max_len, D), rand(rows, H, max_len, D)
    for filled in filled_lengths:
        pos = torch.tensor([filled - 1], device=device)
        bucket_end = min(math.ceil(filled / BUCKET) * BUCKET, max_len)
        k_filled, v_filled = cache_k[:, :, :filled], cache_v[:, :, :filled]
        impls = {backend: (lambda b=backend, p=pos, e=bucket_end:
                           block_ops.decode_attention(q, cache_k, cache_v, 0, p, None, e, backend=b))
                 for backend in ("triton", "torch")}
        impls["sdpa_nomask"] = lambda kf=k_filled, vf=v_filled: torch.nn.functional.scaled_dot_product_attention(
            q, kf, vf)
        yield "decode_attention", filled, (2 * rows * H * D + 2 * rows * H * filled * D) * elt, impls

    yield from fused_op_cases(config, rows, max_len, position, rope, rand, elt)


def fused_op_cases(config, rows: int, max_len: int, position, rope, rand, elt: int):
    """The fused decode-layer kernels (issue 21) vs today's step ops ("unfused") and the references ("torch")."""
    import torch.nn.functional as F

    from llamagen_core2.decode import block_ops

    dim, H, D, ffn = config.dim, config.n_head, config.head_dim, config.ffn_dim
    x, residual, norm_weight = rand(rows, 1, dim), rand(rows, 1, dim), rand(dim)
    wqkv, wo = rand(3 * dim, dim, scale=dim ** -0.5), rand(dim, dim, scale=dim ** -0.5)
    w13, w2 = rand(2 * ffn, dim, scale=dim ** -0.5), rand(dim, ffn, scale=ffn ** -0.5)
    caches = {impl: (rand(rows, H, max_len, D), rand(rows, H, max_len, D)) for impl in ("triton", "unfused", "torch")}

    def kernels():
        from llamagen_core2.kernels import norm_qkv_rope, norm_w13_swiglu, skinny_gemm
        return norm_qkv_rope, norm_w13_swiglu, skinny_gemm

    workspace = []  # one split-K workspace for every fused call of this shape, made on first use

    def ws():
        if not workspace:
            workspace.append(kernels()[2].SplitKWorkspace())
        return workspace[0]

    def qkv_unfused(backend, cache):
        normed, h = block_ops.add_rmsnorm(x, residual, norm_weight, EPS, backend=backend)
        return block_ops.rope_kv_write(F.linear(normed, wqkv), rope, position, *cache, 0, backend=backend), h

    yield "norm_qkv_rope", "-", (3 * dim * dim + 6 * rows * dim + dim) * elt + rows * D * 4, {
        "triton": lambda: kernels()[0].norm_qkv_rope_triton(x, residual, norm_weight, EPS, wqkv, rope, position,
                                                            *caches["triton"], 0, workspace=ws()),
        "unfused": lambda: qkv_unfused("triton", caches["unfused"]),
        "torch": lambda: block_ops.norm_qkv_rope_reference(x, residual, norm_weight, EPS, wqkv, rope, position,
                                                           *caches["torch"], 0)}

    def w13_unfused():
        normed, h = block_ops.add_rmsnorm(x, residual, norm_weight, EPS, backend="triton")
        return block_ops.swiglu(F.linear(normed, w13), backend="triton"), h

    yield "norm_w13_swiglu", "-", (2 * ffn * dim + 3 * rows * dim + rows * ffn + dim) * elt, {
        "triton": lambda: kernels()[1].norm_w13_swiglu_triton(x, residual, norm_weight, EPS, w13, workspace=ws()),
        "unfused": w13_unfused,
        "torch": lambda: block_ops.norm_w13_swiglu_reference(x, residual, norm_weight, EPS, w13)}

    attn, hidden = rand(rows, 1, dim), rand(rows, 1, ffn)
    for op, act, weight in (("wo", attn, wo), ("w2", hidden, w2)):
        N, K = weight.shape
        yield op, "-", (N * K + rows * K + rows * N) * elt, {
            "triton": lambda a=act, w=weight: kernels()[2].skinny_linear_triton(a, w, workspace=ws()),
            "torch": lambda a=act, w=weight: block_ops.skinny_linear_reference(a, w)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--quick", action="store_true", help="small grid, few iterations (CPU smoke run)")
    ap.add_argument("--presets", default="GPT-B,GPT-XL,GPT-XXL", help="comma list; 'tiny' = a 64-wide smoke model")
    ap.add_argument("--rows", default=None, help="cache rows (batch x 2 with CFG); default 1,2,16,128")
    ap.add_argument("--filled", default=None, help="filled KV lengths; default 64,256,1024 (128,256 with "
                                                    "--issue-shapes)")
    ap.add_argument("--issue-shapes", action="store_true",
                    help="only issue 21's shapes: GPT-B 2 rows, GPT-XL 16 and 128 rows (overrides --presets/--rows)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="the floor's bandwidth (default: a device copy measured at start-up)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--timing", choices=("graph", "eager"), default="graph", help="CUDA only")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU: also run the Triton kernels under TRITON_INTERPRET=1 (slow; a correctness smoke run)")
    ap.add_argument("--max-diff", type=float, default=None,
                    help="stop when a kernel differs from its reference by more (default 0.05 bf16/fp16, 1e-4 fp32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu" and args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    quick = args.quick
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        ap.error(f"--ops: unknown {unknown}; choose from {OPS}")
    rows_list = [int(r) for r in (args.rows or ("1,2" if quick else "1,2,16,128")).split(",")]
    shapes = list(ISSUE_SHAPES) if args.issue_shapes else \
        [(preset, rows) for preset in args.presets.split(",") for rows in rows_list]
    default_filled = "128,256" if args.issue_shapes else "64,256" if quick else "64,256,1024"
    filled_list = [int(f) for f in (args.filled or default_filled).split(",")]
    iters = args.iters or (3 if quick else 100)
    warmup = args.warmup or (1 if quick else 10)
    limit = args.max_diff if args.max_diff is not None else (1e-4 if dtype == torch.float32 else 0.05)
    run_kernels = device.type == "cuda" or args.interpret
    if not run_kernels:
        print("# Triton kernels skipped on CPU (pass --interpret to run them under the interpreter)", file=sys.stderr)
    if device.type == "cpu" and args.interpret:
        iters, warmup = 1, 0
    max_len = max(filled_list) + BUCKET
    name = device_name(device)
    bandwidth = args.bandwidth_gbs or copy_bandwidth_gbs(device)
    print(f"# {name}: floor bandwidth {bandwidth:.1f} GB/s ({'given' if args.bandwidth_gbs else 'measured copy'})",
          file=sys.stderr)

    results = []
    fields = ["device", "dtype", "timing", "op", "preset", "rows", "filled", "impl", "us_per_call", "gb_per_s",
              "floor_us", "pct_of_floor", "speedup_vs_torch", "speedup_vs_unfused", "max_abs_diff_vs_torch"]
    print(",".join(fields))
    for preset, rows in shapes:
        config = preset_config(preset)
        for op, filled, nbytes, impls in op_cases(config, rows, filled_list, max_len, dtype, device):
            if op not in ops:
                continue
            if not run_kernels:
                impls.pop("triton")
                impls.pop("unfused", None)
            diffs = {}
            for impl in ("triton", "unfused"):
                if impl in impls:
                    diffs[impl] = max_diff(impls[impl](), impls["torch"]())
                    if not diffs[impl] <= limit:
                        raise SystemExit(f"{op} {preset} rows={rows} filled={filled}: {impl} differs from the "
                                         f"reference by {diffs[impl]} (> {limit})")
            timing = "perf_counter" if device.type == "cpu" else args.timing
            us = {impl: time_us(fn, device, warmup=warmup, iters=iters, timing=args.timing)
                  for impl, fn in impls.items()}
            floor_us = nbytes / bandwidth / 1e3
            for impl, t in us.items():
                row = dict(device=name, dtype=dtype_name, timing=timing, op=op, preset=preset, rows=rows,
                           filled=filled, impl=impl, us_per_call=round(t, 2), gb_per_s=round(nbytes / t / 1e3, 2),
                           floor_us=round(floor_us, 3), pct_of_floor=round(100 * floor_us / t, 1),
                           speedup_vs_torch=round(us["torch"] / t, 2),
                           speedup_vs_unfused=round(us["unfused"] / t, 2) if "unfused" in us else "",
                           max_abs_diff_vs_torch="" if impl not in diffs else f"{diffs[impl]:.3g}")
                results.append(row)
                print(",".join(str(row[f]) for f in fields), flush=True)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"block_kernels_{device.type}"
    with open(f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
    command = "python benchmarks/bench_block_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Block kernels: {name}, {dtype_name}, timing {results[0]['timing'] if results else '-'}", "",
             f"Command: `{command.strip()}`; {time.strftime('%Y-%m-%d')}; iters {iters}; floor bandwidth "
             f"{bandwidth:.1f} GB/s.", "",
             "| op | preset | rows | filled | impl | us/call | GB/s | % of floor | x torch | x unfused | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['preset']} | {r['rows']} | {r['filled']} | {r['impl']} | {r['us_per_call']} | "
              f"{r['gb_per_s']} | {r['pct_of_floor']} | {r['speedup_vs_torch']} | {r['speedup_vs_unfused']} | "
              f"{r['max_abs_diff_vs_torch']} |" for r in results]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"device": name, "dtype": dtype_name, "iters": iters, "bandwidth_gbs": round(bandwidth, 1),
                      "csv": f"{stem}.csv", "markdown": f"{stem}.md", "rows": len(results)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
