"""Benchmark guided sampling: the fused Triton kernels vs a LlamaGen-style op chain (and the torch reference).

One CFG sampling step on fp32 logits laid out as LlamaGen does ([2B, V] = cond half then uncond half),
cfg 4.0, temperature 1.0, for every batch x top_k x top_p:
    fused        llamagen_core2.kernels.fused_guided_sample, eager: knobs as Python numbers, one Philox
                 key per row and the counter offset as device tensors (what the engine passes)
    fused_graph  the same call captured in a CUDA graph, GRAPH_CALLS calls per graph, time per call:
                 the GPU time the engine pays when sampling sits inside its decode graph
    torchsel_graph  (--torch-select) the same graph with select="torch": the kept-set thresholds from
                 torch.topk / torch.sort between the two launches -- the candidate the engine's dispatch times
                 against the select kernel before capture (kernels/timed_choice.py)
    torch        llamagen_core2.guidance mix_guidance + sample_logits (the reference / CPU path)
    chain        split, mix, / temperature, topk mask, sort + softmax + cumsum top-p, softmax,
                 torch.multinomial -- the op-by-op structure of LlamaGen's sampler (eager)
Times: CUDA events on a GPU, time.perf_counter on CPU; mean over --iters calls after --warmup calls.
GB/s counts the compulsory traffic only (reading 2 * B * V fp32 logits, writing B int64 tokens);
pct_of_copy is that rate over the device-to-device copy bandwidth measured at start-up (read + write
counted). speedup_vs_chain = chain us / impl us. The fused kernels are checked before timing: the
mixed logits equal mix_guidance and every token lies in the reference top-k / top-p support.

Outputs: CSV rows on stdout, a final JSON line (with the issue's targets checked), and with --out DIR
the files DIR/kernels_<device>.csv and DIR/kernels_<device>.md.

    python benchmarks/bench_kernels.py --out benchmarks/results            # CUDA: the whole grid
    python benchmarks/bench_kernels.py --device cpu --quick --threads 1    # CPU: torch vs chain only
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

from llamagen_core2.guidance import filter_logits, mix_guidance, sample_logits
from llamagen_core2.kernels.timed_choice import cuda_graph_timer

CFG_SCALE = 4.0
TEMPERATURE = 1.0
GRAPH_CALLS = 20
FIELDS = ["device", "impl", "batch", "vocab", "top_k", "top_p", "us_per_call", "gb_per_s", "pct_of_copy",
          "speedup_vs_chain", "launch"]
# issue targets (V = 16384, fp32, CFG rows, inside a CUDA graph: fused_graph): us per call for batch <= 64 and at 256
# (issue 20, H200); fused / chain at b64, top-k 2000, top-p 1 (issue 13)
TARGET_US_SMALL, TARGET_US_256, TARGET_SPEEDUP_B64 = 10.0, 25.0, 10.0


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


def make_fused(batch: int, vocab: int, device: torch.device, top_k: int, top_p: float, blocks_per_row,
               select: str = "kernel"):
    """The eager fused call, after checking it against the reference on the benchmark's inputs."""
    from llamagen_core2.kernels.fused_guided_sample import fused_guided_sample, launch_config

    config = launch_config(batch, vocab, device, blocks_per_row=blocks_per_row)
    keys = torch.randint(0, 2 ** 62, (batch,), device=device, dtype=torch.int64)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    knobs = dict(mode="cfg", cfg_scale=CFG_SCALE, temperature=TEMPERATURE, top_k=top_k, top_p=top_p,
                 seeds=keys, offset=offset, check_values=False, config=config, select=select)

    probe = torch.randn(2 * batch, vocab, device=device) * 3.0
    tokens, mixed = fused_guided_sample(probe[:batch], probe[batch:], return_mixed=True, **knobs)
    ref = mix_guidance(probe[:batch], probe[batch:], mode="cfg", cfg_scale=CFG_SCALE)
    diff = (mixed - ref).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"fused kernel disagrees with the reference mix (max abs diff {diff})")
    if diff > 0:
        print(f"# warning: fused mix differs from mix_guidance by up to {diff} (expected bit-exact)", file=sys.stderr)
    allowed = torch.isfinite(filter_logits(ref / TEMPERATURE, top_k=top_k, top_p=top_p))
    if not bool(allowed.gather(1, tokens[:, None]).all()):
        raise SystemExit(f"fused kernel drew a token outside the top-k {top_k} / top-p {top_p} support")

    def fused(logits: torch.Tensor, **_) -> torch.Tensor:
        cond, uncond = torch.split(logits, batch, dim=0)
        return fused_guided_sample(cond, uncond, **knobs)

    label = f"nb={config.blocks_per_row} r={config.rows_per_program} warps={config.mix_warps}/{config.select_warps}"
    return fused, label


def time_us(fn, logits, device, *, warmup: int, iters: int, **kw) -> float:
    for _ in range(warmup):
        fn(logits, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn(logits, **kw)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) * 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(logits, **kw)
    return (time.perf_counter() - t0) * 1e6 / iters


def time_graph_us(fn, logits, device, *, iters: int) -> float:
    """us per call of `fn` replayed from a CUDA graph holding GRAPH_CALLS back-to-back calls (the dispatch's own
    timer, kernels.timed_choice.cuda_graph_timer, so the benchmark and the guard measure alike)."""
    return cuda_graph_timer(lambda: fn(logits), device, calls=GRAPH_CALLS, replays=iters, warmup=3) * 1e6


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Device-to-device copy rate, read + write bytes counted."""
    n = (256 if device.type == "cuda" else 32) * 2 ** 20 // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    seconds = time_us(lambda x: dst.copy_(x), src, device, warmup=3, iters=10) * 1e-6
    return 2 * n * 4 / seconds / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def targets(rows: list[dict]) -> dict:
    """The issue's targets against the measured rows (None where a row is missing)."""
    def us(impl, batch):
        return [r["us_per_call"] for r in rows if r["impl"] == impl and r["batch"] == batch]

    out = {}
    for impl in ("fused", "fused_graph"):
        small = [u for b in sorted({r["batch"] for r in rows}) if b <= 64 for u in us(impl, b)]
        big = us(impl, 256)
        speed = [r["speedup_vs_chain"] for r in rows if (r["impl"], r["batch"], r["top_k"], r["top_p"]) ==
                 (impl, 64, 2000, 1.0)]
        out[impl] = {
            f"max_us_batch_le_64 (target <= {TARGET_US_SMALL})": max(small) if small else None,
            f"max_us_batch_256 (target <= {TARGET_US_256})": max(big) if big else None,
            f"speedup_vs_chain_b64_k2000_p1 (target >= {TARGET_SPEEDUP_B64})": speed[0] if speed else None,
        }
    return out


def write_outputs(out_dir: Path, name: str, rows: list[dict], header: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    with open(out_dir / f"kernels_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Guided sampling kernels: {name}", "",
             *(f"- {k}: {v}" for k, v in header.items()), "",
             "| batch | top_k | top_p | " + " | ".join(f"{i} us" for i in header["impls"]) +
             " | fused x chain | graph x chain | fused GB/s | graph % of copy |",
             "|---" * (7 + len(header["impls"])) + "|"]
    for key in sorted({(r["batch"], r["top_k"], r["top_p"]) for r in rows}):
        by = {r["impl"]: r for r in rows if (r["batch"], r["top_k"], r["top_p"]) == key}

        def get(impl, field):
            return by[impl][field] if impl in by else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " +
                     " | ".join(str(get(i, "us_per_call")) for i in header["impls"]) +
                     f" | {get('fused', 'speedup_vs_chain')} | {get('fused_graph', 'speedup_vs_chain')}"
                     f" | {get('fused', 'gb_per_s')} | {get('fused_graph', 'pct_of_copy')} |")
    (out_dir / f"kernels_{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="few iterations (CPU smoke run)")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--blocks-per-row", type=int, default=None,
                    help="override the vocabulary split of the fused kernels (tuning; default: launch_config)")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch reference (slow at large batch)")
    ap.add_argument("--torch-select", action="store_true",
                    help="also time the fused call with select='torch' in a CUDA graph (torchsel_graph rows)")
    ap.add_argument("--out", type=Path, default=None, help="directory for kernels_<device>.csv / .md")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 avoids OpenMP spin-wait collapse on shared, loaded cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    iters = args.iters or (3 if args.quick else 200)
    warmup = args.warmup or (1 if args.quick else 20)
    name = device_name(device)
    copy_gbs = copy_bandwidth_gbs(device)

    impls = {"chain": llamagen_chain} if args.no_torch else {"torch": torch_reference, "chain": llamagen_chain}
    run_fused = device.type == "cuda"
    if not run_fused:
        print("# fused Triton kernels skipped: they need a CUDA device (CPU runs torch vs chain only)",
              file=sys.stderr)
    torch.manual_seed(0)
    rows = []
    writer = csv.DictWriter(sys.stdout, FIELDS)
    writer.writeheader()
    for batch in [int(b) for b in args.batches.split(",")]:
        logits = torch.randn(2 * batch, args.vocab, device=device) * 3.0
        bytes_moved = 2 * batch * args.vocab * 4 + batch * 8
        for top_k in (0, 2000):
            for top_p in (1.0, 0.9):
                timings, labels = {}, {}
                if run_fused:
                    fused, labels["fused"] = make_fused(batch, args.vocab, device, top_k, top_p, args.blocks_per_row)
                    labels["fused_graph"] = labels["fused"]
                    timings["fused"] = time_us(fused, logits, device, warmup=warmup, iters=iters)
                    timings["fused_graph"] = time_graph_us(fused, logits, device, iters=max(1, iters // 10))
                    if args.torch_select and (top_k > 0 or top_p < 1.0):
                        torchsel, labels["torchsel_graph"] = make_fused(batch, args.vocab, device, top_k, top_p,
                                                                        args.blocks_per_row, select="torch")
                        timings["torchsel_graph"] = time_graph_us(torchsel, logits, device,
                                                                  iters=max(1, iters // 10))
                for impl, fn in impls.items():
                    timings[impl] = time_us(fn, logits, device, warmup=warmup, iters=iters, top_k=top_k, top_p=top_p)
                for impl, us in timings.items():
                    gbs = bytes_moved / us / 1e3
                    row = dict(device=name, impl=impl, batch=batch, vocab=args.vocab, top_k=top_k, top_p=top_p,
                               us_per_call=round(us, 2), gb_per_s=round(gbs, 2),
                               pct_of_copy=round(100 * gbs / copy_gbs, 1),
                               speedup_vs_chain=round(timings["chain"] / us, 2), launch=labels.get(impl, ""))
                    rows.append(row)
                    writer.writerow(row)
                    sys.stdout.flush()

    header = {"device": name, "torch": torch.__version__, "dtype": "fp32 logits, CFG rows [2B, V]",
              "vocab": args.vocab, "cfg_scale": CFG_SCALE, "temperature": TEMPERATURE, "iters": iters,
              "copy_bandwidth_gbs": round(copy_gbs, 1), "graph_calls": GRAPH_CALLS,
              "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "impls": (["fused", "fused_graph"] if run_fused else []) +
              (["torchsel_graph"] if run_fused and args.torch_select else []) + list(impls)}
    if args.out:
        write_outputs(args.out, name, rows, header)
    print(json.dumps({**header, "targets": targets(rows) if run_fused else None, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
