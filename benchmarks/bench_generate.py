"""Throughput benchmark: our engine vs the LlamaGen-style baselines, eager and compiled, in one process.

Engines (--engines): "ours" (generate() with one reused Engine, or --engine eager), "baseline" (LlamaGen's
decode loop on the same weights, benchmarks/baseline_decoder.py) and "baseline-compiled" (the same loop with its
model step under torch.compile(mode="reduce-overhead", fullgraph=True), what LlamaGen's --compile does: the
strongest peer). Speedups are reported against both baselines (docs/design.md#performance-model).

For every preset x tokens x batch x mode x engine it runs a full generation (prefill + N decode steps) and
reports images/s, tokens/s, ms/step, the bytes a step must move (weights read once + the filled KV cache of
the rows the mode needs, + the weak model for fast/slow), the achieved GB/s and the % of the bandwidth floor
(floor = those bytes / the device-to-device copy bandwidth measured at start-up, counted as read + write
bytes), and peak memory. Output: one CSV row per run (stdout, and --csv), a final JSON line, a PNG plot of
images/s vs batch per mode with the floor (--plot). Configurations that cannot fit in free memory are
refused with a "refused" row (memory.py) instead of crashing.

Examples:
  python benchmarks/bench_generate.py --preset B --batch 8 --tokens 256 --modes cfg --device cpu
  python benchmarks/bench_generate.py --preset B XL --batch 1 64 --tokens 256 576 --modes cond cfg fast slow

Random weights of the preset's shapes are used unless --checkpoint is given (a LlamaGen .pt / converted
dir). fast/slow use an untrained `WeakModel` W-2 (the cost of a trained one). `warmup_s` is the first, untimed
call: CUDA-graph capture for ours, torch.compile for baseline-compiled. `--count-kernels` adds the CUDA kernels
per decode step of one extra run (torch.profiler). The timed-choice guard's decisions of our engine (the
sampler's select path, each fused decode-layer kernel vs today's ops, per shape) are logged to stderr, one line
each ("timed choice: ..."; benchmarks/gpu_report.py tabulates them).

`--profile` profiles one more generation of every configuration (torch.profiler) and prints, to stderr, its top
kernels by GPU time per step -- name, ms/step, launches/step, share of the GPU time (on CPU: the top ops by self
CPU time) -- as a markdown table; the JSON line carries the same rows under "profiles". Per step = over the whole
generation (prefill included) divided by the tokens. The decode step's table of issue 20 (the select kernel's
share at GPT-XL b8 CFG) is

  python benchmarks/bench_generate.py --preset XL --batch 8 --tokens 256 --modes cfg --engines ours --profile
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_decoder import BaselineDecoder  # noqa: E402

from llamagen_core2.config import GPTConfig  # noqa: E402
from llamagen_core2.core2.weak_model import WeakModel  # noqa: E402
from llamagen_core2.decode.engine import Engine  # noqa: E402
from llamagen_core2.decode.generate import generate  # noqa: E402
from llamagen_core2.decode.memory import check_fits, element_size, estimate_generation_bytes, weight_bytes  # noqa: E402
from llamagen_core2.decode.model import GPT  # noqa: E402
from llamagen_core2.errors import InvalidArgument  # noqa: E402
from llamagen_core2.guidance.config import GuidanceConfig  # noqa: E402

ENGINES = ("ours", "baseline", "baseline-compiled")

TOKENS_TO_IMAGE = {256: 256, 576: 384, 1024: 512}  # VQ-16 grid: 16x16, 24x24, 32x32
TINY = dict(dim=64, n_layer=2, n_head=4)  # --preset tiny: a smoke run of every engine on CPU (tests)
FIELDS = ["engine", "preset", "device", "dtype", "batch", "tokens", "mode", "status", "seconds", "images_per_s",
          "tokens_per_s", "ms_per_step", "bytes_per_step", "achieved_GBps", "floor_ms_per_step", "pct_of_floor",
          "peak_mem_MB", "warmup_s", "kernels_per_step", "weak_model", "note"]


# ---------------------------------------------------------------------- models
def make_weak(gpt: GPT, device, dtype):
    return WeakModel.for_base(gpt, "W-2", fingerprint=False).to(device=device, dtype=dtype).eval(), "WeakModel W-2"


def build_gpt(preset: str, tokens: int, device, dtype, checkpoint=None) -> GPT:
    image_size = TOKENS_TO_IMAGE[tokens]
    if checkpoint:
        return GPT.from_pretrained(checkpoint, device=device, dtype=dtype, image_size=image_size)
    config = GPTConfig.from_preset(f"GPT-{preset}", image_size=image_size) if preset != "tiny" else \
        GPTConfig.from_preset("GPT-B", image_size=image_size, **TINY)
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(config).parameters())
    check_fits(params * element_size(dtype), device, f"GPT-{preset} weights")
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config)  # random init (nn defaults) directly on the device
    return model.to(dtype=dtype).eval()


# ---------------------------------------------------------------------- measurement
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (best of a few)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def step_bytes(gpt: GPT, weak, batch: int, tokens: int, modes: list[str]) -> float:
    """Average bytes a step must read: decode weights (not the embedding tables) + filled KV of needed rows."""
    c = gpt.config
    decode_weights = weight_bytes(gpt.layers) + weight_bytes(gpt.norm) + weight_bytes(gpt.output)
    weak_w = weight_bytes(weak) if weak is not None else 0
    kv_per_pos_row = 2 * c.n_layer * c.dim * gpt.output.weight.element_size()
    total = 0.0
    for i, m in enumerate(modes):
        rows = 2 * batch if m in ("cfg", "slow") else batch
        total += decode_weights + (weak_w if m in ("fast", "slow") else 0) + rows * (c.cls_token_num + i) * kv_per_pos_row
    return total / tokens


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far (KiB on Linux)


def make_runner(engine: str, gpt, state: Engine, baselines: dict, cond, mode, weak, args):
    """-> call(num_tokens, seed) running one full generation with `engine`."""
    kw = dict(mode=mode, cfg_scale=args.cfg_scale, top_k=args.top_k, temperature=1.0,
              weak_model=weak if mode in ("fast", "slow") else None, w2s_scale=args.w2s_scale)
    if engine == "ours":
        ours = state if args.engine != "eager" else "eager"
        return lambda n, seed: generate(gpt, cond, num_tokens=n, seed=seed, engine=ours, **kw)
    compiled = engine == "baseline-compiled"
    if engine not in baselines:  # one decoder per engine and model: a compiled step is kept across calls
        baselines[engine] = BaselineDecoder(gpt, compile=compiled)
    baseline = baselines[engine]
    return lambda n, seed: baseline.generate(cond, num_tokens=n, seed=seed, **kw)


def count_kernels(call, tokens: int, device) -> float:
    """CUDA kernels per decode step of one generation (profiler events of device type CUDA / tokens)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(tokens, 0)
        sync(device)
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return kernels / tokens


def profile_steps(call, tokens: int, device, top: int = 15) -> list[dict]:
    """One profiled generation -> the top kernels (CUDA) or ops (CPU) by time per step: dicts with name,
    ms_per_step, launches_per_step, pct (of the total device time, or of the total self CPU time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        call(tokens, 0)
        sync(device)
    totals: dict = {}
    for e in prof.events():
        if on_cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()
        else:
            us = e.self_cpu_time_total
        time_us, count = totals.get(e.name, (0.0, 0))
        totals[e.name] = (time_us + us, count + 1)
    everything = sum(t for t, _ in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return [dict(name=name, ms_per_step=round(t / tokens / 1e3, 4), launches_per_step=round(n / tokens, 2),
                 pct=round(100 * t / everything, 1)) for name, (t, n) in ranked]


def print_profile(label: str, rows: list[dict], device, total_ms: float) -> None:
    what, by = ("kernel", "GPU time") if device.type == "cuda" else ("op", "self CPU time")
    lines = [f"# profile {label}: top {len(rows)} {what}s by {by} per step ({total_ms:.3f} ms/step together)", "",
             f"| {what} | ms/step | launches/step | % of all {by} |", "|---|---|---|---|"]
    lines += [f"| {r['name'][:90]} | {r['ms_per_step']:.4f} | {r['launches_per_step']:.2f} | {r['pct']:.1f} |"
              for r in rows]
    print("\n".join(lines) + "\n", file=sys.stderr, flush=True)


def run_one(call, tokens: int, args, device) -> tuple[float, float]:
    """-> (best seconds over --repeats, warm-up seconds)."""
    warm = tokens if args.warmup_tokens is None else min(args.warmup_tokens, tokens)
    warmup_s = 0.0
    if warm > 0:
        sync(device)
        t0 = time.perf_counter()
        call(warm, 0)  # CUDA graph capture / torch.compile / kernel selection / allocator warm-up
        sync(device)
        warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for r in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        call(tokens, 1 + r)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), warmup_s


def main(argv=None):
    # the timed-choice guard's decisions (sampler select, fused decode-layer kernels), one stderr line each
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("llamagen_core2.kernels").setLevel(logging.INFO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["B", "L", "XL", "XXL"], choices=["B", "L", "XL", "XXL", "3B", "tiny"])
    p.add_argument("--checkpoint", default=None, help="real LlamaGen checkpoint (then give one --preset)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32, 64, 128])
    p.add_argument("--tokens", nargs="+", type=int, default=[256], choices=sorted(TOKENS_TO_IMAGE))
    p.add_argument("--modes", nargs="+", default=["cond", "cfg", "fast", "slow"],
                   choices=["cond", "cfg", "fast", "slow"])
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--engine", default="auto", choices=["auto", "static", "eager"], help="our generate() engine")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--w2s-scale", type=float, default=1.5)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup-tokens", type=int, default=None, help="default: all tokens on CUDA, 4 on CPU")
    p.add_argument("--baseline-max-batch", type=int, default=None, help="skip the baseline above this batch")
    p.add_argument("--copy-mb", type=int, default=None, help="copy-bandwidth buffer (default 1024 CUDA, 256 CPU)")
    p.add_argument("--count-kernels", action="store_true", help="CUDA kernels per step (one extra profiled run)")
    p.add_argument("--profile", action="store_true",
                   help="top kernels by GPU time per step of one extra profiled run (stderr table + JSON)")
    p.add_argument("--profile-top", type=int, default=15, help="rows of the --profile table")
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.warmup_tokens is None and device.type != "cuda":
        args.warmup_tokens = 4
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    bw = copy_bandwidth(device, (args.copy_mb or (1024 if device.type == "cuda" else 256)) * 2 ** 20)
    print(f"# device {device_name}, dtype {str(dtype).replace('torch.', '')}, copy bandwidth {bw / 1e9:.1f} GB/s "
          f"(read+write)", file=sys.stderr)
    writer = csv.DictWriter(sys.stdout, FIELDS)
    writer.writeheader()
    rows, profiles = [], []
    for preset in args.preset:
        for tokens in args.tokens:
            try:
                gpt = build_gpt(preset, tokens, device, dtype, args.checkpoint)
            except InvalidArgument as err:
                print(f"# GPT-{preset} refused: {err}", file=sys.stderr)
                continue
            weak, weak_name = make_weak(gpt, device, dtype) if {"fast", "slow"} & set(args.modes) else (None, "")
            state, baselines = Engine(gpt), {}
            for batch in args.batch:
                cond = torch.arange(batch, device=device) % gpt.config.num_classes
                for mode in args.modes:
                    modes = GuidanceConfig(mode=mode, cfg_scale=args.cfg_scale).token_modes(tokens)
                    nbytes = step_bytes(gpt, weak if mode in ("fast", "slow") else None, batch, tokens, modes)
                    floor_ms = nbytes / bw * 1e3
                    for engine in args.engines:
                        row = dict(engine=engine, preset=f"GPT-{preset}", device=device_name,
                                   dtype=str(dtype).replace("torch.", ""), batch=batch, tokens=tokens, mode=mode,
                                   bytes_per_step=int(nbytes), floor_ms_per_step=round(floor_ms, 4),
                                   weak_model=weak_name if mode in ("fast", "slow") else "", note="")
                        if engine != "ours" and args.baseline_max_batch and batch > args.baseline_max_batch:
                            continue
                        try:
                            rows_needed = 2 * batch if (mode != "cond" and args.cfg_scale > 1) else batch
                            check_fits(estimate_generation_bytes(gpt.config, batch=batch, rows=rows_needed,
                                                                 num_tokens=tokens, dtype=dtype),
                                       device, f"batch {batch} x {tokens} tokens ({mode})")
                            call = make_runner(engine, gpt, state, baselines, cond, mode, weak, args)
                            seconds, warmup_s = run_one(call, tokens, args, device)
                            kernels = count_kernels(call, tokens, device) if args.count_kernels else ""
                            if args.profile:
                                top = profile_steps(call, tokens, device, args.profile_top)
                                label = f"{engine} GPT-{preset} b{batch} {mode} {tokens} tokens on {device_name}"
                                print_profile(label, top, device, sum(r["ms_per_step"] for r in top))
                                profiles.append(dict(engine=engine, preset=f"GPT-{preset}", batch=batch, mode=mode,
                                                     tokens=tokens, rows=top))
                        except InvalidArgument as err:
                            row.update(status="refused", note=str(err))
                            writer.writerow(row)
                            rows.append(row)
                            continue
                        ms_step = seconds / tokens * 1e3
                        row.update(status="ok", seconds=round(seconds, 4), images_per_s=round(batch / seconds, 4),
                                   tokens_per_s=round(batch * tokens / seconds, 2), ms_per_step=round(ms_step, 4),
                                   achieved_GBps=round(nbytes / (ms_step * 1e-3) / 1e9, 2),
                                   pct_of_floor=round(100 * floor_ms / ms_step, 2),
                                   peak_mem_MB=round(peak_memory_mb(device), 1), warmup_s=round(warmup_s, 3),
                                   kernels_per_step=kernels if kernels == "" else round(kernels, 1))
                        writer.writerow(row)
                        sys.stdout.flush()
                        rows.append(row)
            del gpt, weak, state, baselines
    summary = dict(device=device_name, dtype=str(dtype).replace("torch.", ""), copy_GBps=round(bw / 1e9, 2),
                   torch=torch.__version__, engine_setting=args.engine,
                   speedup_vs_baseline=speedups(rows, "baseline"),
                   speedup_vs_baseline_compiled=speedups(rows, "baseline-compiled"), rows=rows)
    if args.profile:
        summary["profiles"] = profiles
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            w.writeheader()
            w.writerows(rows)
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps(summary))


def speedups(rows, peer: str) -> dict:
    """ours / peer images/s for every configuration measured by both."""
    ours = {(r["preset"], r["tokens"], r["batch"], r["mode"]): r for r in rows if r["engine"] == "ours" and r["status"] == "ok"}
    out = {}
    for r in rows:
        key = (r["preset"], r["tokens"], r["batch"], r["mode"])
        if r["engine"] == peer and r["status"] == "ok" and key in ours:
            out["/".join(map(str, key))] = round(ours[key]["images_per_s"] / r["images_per_s"], 3)
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    groups = sorted({(r["preset"], r["tokens"]) for r in ok})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (preset, tokens) in zip(axes[0], groups):
        sel = [r for r in ok if (r["preset"], r["tokens"]) == (preset, tokens)]
        for mode in sorted({r["mode"] for r in sel}):
            for engine, style in (("ours", "-o"), ("baseline", "--x"), ("baseline-compiled", "-.+")):
                pts = sorted((r["batch"], r["images_per_s"]) for r in sel if r["mode"] == mode and r["engine"] == engine)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{engine} {mode}")
            floor = sorted({(r["batch"], r["batch"] / (r["tokens"] * r["floor_ms_per_step"] * 1e-3))
                            for r in sel if r["mode"] == mode})
            ax.plot(*zip(*floor), ":", marker="_", markersize=14, color="gray", label=f"bandwidth floor {mode}")
        ax.set(xscale="log", yscale="log", xlabel="batch (images)", ylabel="images/s",
               title=f"{preset}, {tokens} tokens, {sel[0]['dtype']} on {sel[0]['device']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
