"""Benchmark guided sampling: fused Triton kernel vs torch reference vs a LlamaGen-style chain.

For each batch B, vocab V, top_k and top_p it times one CFG sampling step on fp32 logits laid out
as LlamaGen does ([2B, V] = cond half then uncond half):
    fused   llamagen_core2.kernels.fused_guided_sample (CUDA only; skipped on CPU with a message);
            knobs, seed and offset are pre-built device tensors, as the engine passes them
    torch   llamagen_core2.guidance mix_guidance + sample_logits (the reference / CPU path)
    chain   split, mix, / temperature, topk mask, sort + softmax + cumsum top-p, softmax,
            torch.multinomial -- the op-by-op structure of LlamaGen's sampler
Prints CSV rows (device name in each) and a final JSON line. Times: CUDA events on a GPU,
time.perf_counter on CPU, mean over --iters calls after --warmup calls. Effective GB/s counts
the compulsory traffic only: reading 2 * B * V fp32 logits and writing B int64 tokens.

    python benchmarks/bench_kernels.py                      # GPU, full grid
    python benchmarks/bench_kernels.py --device cpu --quick --threads 1   # CPU: torch vs chain
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from llamagen_core2.guidance import mix_guidance, sample_logits

CFG_SCALE = 4.0
TEMPERATURE = 1.0


def llamagen_chain(logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """[2B, V] -> [B] tokens with LlamaGen's separate ops (written for this benchmark)."""
    cond, uncond = torch.split(logits, logits.shape[0] // 2, dim=0)
    mixed = uncond + CFG_SCALE * (cond - uncond)
    mixed = mixed / max(TEMPERATURE, 1e-5)
    if top_k > 0:
        kth = torch.topk(mixed, min(top_k, mixed.shape[-1]), dim=-1).values[..., -1, None]
        mixed = mixed.masked_fill(mixed < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(mixed, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        mixed = mixed.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    probs = torch.softmax(mixed, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)


def torch_reference(logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    cond, uncond = torch.split(logits, logits.shape[0] // 2, dim=0)
    mixed = mix_guidance(cond, uncond, mode="cfg", cfg_scale=CFG_SCALE)
    return sample_logits(mixed, temperature=TEMPERATURE, top_k=top_k, top_p=top_p)


def make_fused(batch: int, device: torch.device, top_k: int, top_p: float):
    from llamagen_core2.kernels.fused_guided_sample import fused_guided_sample

    def row(value, dtype):
        return torch.full((batch,), value, device=device, dtype=dtype)

    knobs = dict(cfg_scale=row(CFG_SCALE, torch.float32), temperature=row(TEMPERATURE, torch.float32),
                 top_k=row(top_k, torch.int64), top_p=row(top_p, torch.float32),
                 seed=torch.tensor([1234], device=device), offset=torch.zeros(1, dtype=torch.int64, device=device))

    # Sanity check before timing: the kernel's mixed logits equal the reference mix.
    probe = torch.randn(2 * batch, 16384, device=device)
    _, mixed = fused_guided_sample(probe[:batch], probe[batch:], mode="cfg", check_values=False,
                                   return_mixed=True, **knobs)
    diff = (mixed - mix_guidance(probe[:batch], probe[batch:], mode="cfg", cfg_scale=CFG_SCALE)).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"fused kernel disagrees with the reference mix (max abs diff {diff})")

    def fused(logits: torch.Tensor, **_) -> torch.Tensor:
        cond, uncond = torch.split(logits, batch, dim=0)
        return fused_guided_sample(cond, uncond, mode="cfg", check_values=False, **knobs)

    return fused


def time_us(fn, logits, device, *, warmup: int, iters: int, **kw) -> float:
    for _ in range(warmup):
        fn(logits, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(logits, **kw)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(logits, **kw)
    return (time.perf_counter() - t0) * 1e6 / iters


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="few iterations (CPU smoke run)")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 avoids OpenMP spin-wait collapse on shared, loaded cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    iters = args.iters or (3 if args.quick else 100)
    warmup = args.warmup or (1 if args.quick else 10)
    name = device_name(device)

    impls = {"torch": torch_reference, "chain": llamagen_chain}
    run_fused = device.type == "cuda"
    if not run_fused:
        print("# fused Triton kernel skipped: it needs a CUDA device (CPU runs torch vs chain only)",
              file=sys.stderr)
    torch.manual_seed(0)
    rows = []
    print("device,impl,batch,vocab,top_k,top_p,us_per_call,gb_per_s,speedup_vs_chain")
    for batch in [int(b) for b in args.batches.split(",")]:
        logits = torch.randn(2 * batch, args.vocab, device=device) * 3.0
        bytes_moved = 2 * batch * args.vocab * 4 + batch * 8
        for top_k in (0, 2000):
            for top_p in (1.0, 0.9):
                todo = dict(impls)
                if run_fused:
                    todo = {"fused": make_fused(batch, device, top_k, top_p), **todo}
                timings = {impl: time_us(fn, logits, device, warmup=warmup, iters=iters, top_k=top_k, top_p=top_p)
                           for impl, fn in todo.items()}
                for impl, us in timings.items():
                    row = dict(device=name, impl=impl, batch=batch, vocab=args.vocab, top_k=top_k, top_p=top_p,
                               us_per_call=round(us, 1), gb_per_s=round(bytes_moved / us / 1e3, 3),
                               speedup_vs_chain=round(timings["chain"] / us, 2))
                    rows.append(row)
                    print(",".join(str(v) for v in row.values()), flush=True)

    def speedup(impl, batch=64, top_k=2000, top_p=1.0):
        hits = [r for r in rows if (r["impl"], r["batch"], r["top_k"], r["top_p"]) == (impl, batch, top_k, top_p)]
        return hits[0]["speedup_vs_chain"] if hits else None

    summary = {"device": name, "dtype": "fp32", "vocab": args.vocab, "iters": iters,
               "speedup_vs_chain_b64_k2000": {impl: speedup(impl) for impl in ("fused", "torch")},
               "rows": rows}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
