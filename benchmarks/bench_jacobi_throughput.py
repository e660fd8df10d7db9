"""Images/s of Jacobi vs sequential decoding with the same engine (GPU target: GPT-XL b1 and b8 CFG).

    python benchmarks/bench_jacobi_throughput.py --preset XL --batch 1 8 --device cuda

For each batch it times one full generation with sequential decoding and one with `decoding="jacobi"` (one reused
Engine, CUDA graphs on a GPU; an untimed first call of each captures them), 256 tokens, CFG 4.0, top-k 2000.
Weights are RANDOM (bench_generate.build_gpt) unless --checkpoint is given: a random model's tokens hardly depend
on their prefix the way a trained model's do, so its acceptance (passes per image) means nothing. What transfers
is the cost of one window pass (`ms_per_pass`, W positions per row) against one sequential step (`ms_per_step`);
`projected_images_per_s` applies a measured compression (`--compression`, forward passes per image of sequential
over Jacobi on a trained model, e.g. docs/decoding.md's mini-world figure) to that cost:
batch / (tokens / compression x ms_per_pass). Output: CSV rows and a final JSON line.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import build_gpt, sync  # noqa: E402

from llamagen_core2.decode.engine import Engine  # noqa: E402
from llamagen_core2.decode.generate import generate  # noqa: E402

FIELDS = ["preset", "device", "dtype", "batch", "tokens", "mode", "decoding", "window", "seconds", "images_per_s",
          "forward_passes", "passes_per_image", "ms_per_pass", "warmup_s", "compression_applied",
          "projected_images_per_s", "weights"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="XL", choices=["B", "L", "XL", "XXL", "tiny"])
    p.add_argument("--checkpoint", default=None, help="real LlamaGen checkpoint (acceptance then means something)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--tokens", type=int, default=256, choices=[256, 576, 1024], help="image tokens of the model")
    p.add_argument("--num-tokens", type=int, default=None, help="decode only the first tokens (smoke runs)")
    p.add_argument("--mode", default="cfg", choices=["cond", "cfg"])
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--compression", type=float, default=2.0,
                   help="passes per image sequential / Jacobi to project with (measured on a trained model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    gpt = build_gpt(args.preset, args.tokens, device, dtype, args.checkpoint)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    engine = Engine(gpt)
    num_tokens = args.num_tokens or args.tokens
    writer = csv.DictWriter(sys.stdout, FIELDS)
    writer.writeheader()
    rows = []
    for batch in args.batch:
        cond = torch.arange(batch, device=device) % gpt.config.num_classes
        per_decoding = {}
        for decoding in ("sequential", "jacobi"):
            kw = dict(mode=args.mode, cfg_scale=4.0, top_k=2000, engine=engine, decoding=decoding,
                      jacobi_window=args.window, return_stats=True, num_tokens=num_tokens)
            sync(device)
            t0 = time.perf_counter()
            generate(gpt, cond, seed=0, **kw)  # captures the graphs of this shape
            sync(device)
            warmup = time.perf_counter() - t0
            t0 = time.perf_counter()
            tokens, stats = generate(gpt, cond, seed=1, **kw)
            sync(device)
            seconds = time.perf_counter() - t0
            per_decoding[decoding] = tokens
            ms_pass = seconds / stats["forward_passes"] * 1e3
            row = dict(preset=f"GPT-{args.preset}", device=name, dtype=str(dtype).replace("torch.", ""), batch=batch,
                       tokens=num_tokens, mode=args.mode, decoding=decoding,
                       window=args.window if decoding == "jacobi" else 1, seconds=round(seconds, 4),
                       images_per_s=round(batch / seconds, 3), forward_passes=stats["forward_passes"],
                       passes_per_image=round(stats["forward_passes_mean"], 2), ms_per_pass=round(ms_pass, 4),
                       warmup_s=round(warmup, 3), weights="checkpoint" if args.checkpoint else "random")
            if decoding == "jacobi":
                row.update(compression_applied=args.compression,
                           projected_images_per_s=round(batch / (num_tokens / args.compression * ms_pass * 1e-3), 3))
            writer.writerow(row)
            sys.stdout.flush()
            rows.append(row)
        if not torch.equal(per_decoding["sequential"], per_decoding["jacobi"]):
            mismatched = int((per_decoding["sequential"] != per_decoding["jacobi"]).sum())
            print(f"# batch {batch}: {mismatched} of {per_decoding['jacobi'].numel()} tokens differ from sequential "
                  f"decoding ({str(dtype).replace('torch.', '')}: a multi-token forward rounds differently)",
                  file=sys.stderr)
            rows[-1]["mismatched_tokens"] = mismatched
    summary = dict(device=name, rows=rows)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
