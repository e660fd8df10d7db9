"""Jacobi decoding on the shipped mini world: base-model forward passes per image vs sequential decoding, with the
tokens checked identical.

    python benchmarks/bench_jacobi.py --out-dir benchmarks/results

For every mode (cond, cfg, fast, slow, slow->fast 25%) and window W it decodes 14 classes x 2 images (seed 0,
CFG 3.0, W2S 1.5, full vocabulary, temperature 1: the mini world's defaults) with `generate(...,
decoding="jacobi")` on one reused Engine and compares with sequential decoding of the same seed:
  * together: the 28 images as one batch (windows start at the batch's smallest frontier, images ahead keep
    their final tokens): the batch's forward passes, the mean pass after which an image was complete, base-model
    row-positions computed per image, CPU seconds of the batch (one thread; best of --repeats, Jacobi and
    sequential alternating in the same run);
  * alone: each image as a batch of one (what a window per image gives): mean and max passes per image;
  * mismatched: tokens that differ from sequential decoding (0 = identical), over all images.
A second table compares the first-guess rules (`jacobi_guess`: left, above, zero) for cfg and fast. Outputs:
jacobi.csv, jacobi.md and a final JSON line. `--quick` runs a small subset (the test suite's smoke run).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from llamagen_core2.decode.engine import Engine
from llamagen_core2.decode.generate import generate
from llamagen_core2.guidance.config import make_schedule
from llamagen_core2.guidance.seeding import row_keys
from llamagen_core2.world.dataset import NUM_CLASSES
from llamagen_core2.world.pipeline import WORLD_GUIDANCE, load_world

MODES = ("cond", "cfg", "fast", "slow", "slow->fast")
FIELDS = ("table", "mode", "window", "guess", "batch_passes", "passes_per_image", "alone_mean", "alone_max",
          "compression_batch", "compression_per_image", "compression_alone", "rows_per_image", "mismatched_tokens",
          "seconds", "sequential_seconds")


def guidance_for(mode: str, num_tokens: int):
    if mode == "slow->fast":
        return WORLD_GUIDANCE.replace(schedule=make_schedule(num_tokens, first="slow", then="fast",
                                                             first_fraction=0.25))
    return WORLD_GUIDANCE.replace(mode=mode)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_row(world, engine, labels, keys, mode: str, window: int, guess: str, alone: bool, repeats: int):
    gpt = world.gpt
    N = gpt.config.num_image_tokens
    sequential = dict(guidance=guidance_for(mode, N), weak_model=world.weak, engine=engine)
    kw = dict(sequential, decoding="jacobi", jacobi_window=window, jacobi_guess=guess, return_stats=True)
    seconds, seq_seconds = float("inf"), float("inf")
    for _ in range(repeats):  # alternating, best of each: the shared CPU's load changes from second to second
        reference, t = timed(lambda: generate(gpt, labels, seeds=keys, **sequential))
        seq_seconds = min(seq_seconds, t)
        (tokens, stats), t = timed(lambda: generate(gpt, labels, seeds=keys, **kw))
        seconds = min(seconds, t)
    mismatched = int((tokens != reference).sum())
    row = dict(mode=mode, window=window, guess=guess, batch_passes=stats["forward_passes"],
               passes_per_image=round(stats["forward_passes_mean"], 2),
               rows_per_image=round(stats["base_rows"] / len(labels), 1), seconds=round(seconds, 3),
               sequential_seconds=round(seq_seconds, 3))
    row["compression_batch"] = round(N / stats["forward_passes"], 3)
    row["compression_per_image"] = round(N / stats["forward_passes_mean"], 3)
    if alone:
        passes = []
        for b in range(len(labels)):
            one, one_stats = generate(gpt, labels[b:b + 1], seeds=keys[b:b + 1], **kw)
            mismatched += int((one != reference[b:b + 1]).sum())
            passes.append(one_stats["forward_passes"])
        row.update(alone_mean=round(sum(passes) / len(passes), 2), alone_max=max(passes),
                   compression_alone=round(N / (sum(passes) / len(passes)), 3))
    row["mismatched_tokens"] = mismatched
    return row


def markdown(rows: list[dict], table: str, N: int) -> str:
    if table == "modes":
        head = ("| mode | W | batch passes | passes/image (in batch) | passes/image (alone: mean, max) | compression "
                "batch / in batch / alone | rows/image | mismatched tokens | CPU s jacobi / sequential |\n"
                "|---|---|---|---|---|---|---|---|---|\n")
        lines = [f"| {r['mode']} | {r['window']} | {r['batch_passes']} | {r['passes_per_image']} | "
                 f"{r.get('alone_mean', '-')}, {r.get('alone_max', '-')} | {r['compression_batch']}x / "
                 f"{r['compression_per_image']}x / {r.get('compression_alone', '-')}x | {r['rows_per_image']} | "
                 f"{r['mismatched_tokens']} | {r['seconds']} / {r['sequential_seconds']} |" for r in rows]
    else:
        head = ("| mode | W | first guess | batch passes | passes/image (in batch) | passes/image (alone) | "
                "mismatched tokens |\n|---|---|---|---|---|---|---|\n")
        lines = [f"| {r['mode']} | {r['window']} | {r['guess']} | {r['batch_passes']} | {r['passes_per_image']} | "
                 f"{r.get('alone_mean', '-')} | {r['mismatched_tokens']} |" for r in rows]
    return f"Sequential decoding: {N} forward passes per image.\n\n" + head + "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--windows", nargs="+", type=int, default=[4, 8, 16, 36])
    p.add_argument("--guesses", nargs="*", default=["left", "above", "zero"], help="none: no guess table")
    p.add_argument("--guess-windows", nargs="+", type=int, default=[8, 16])
    p.add_argument("--images-per-class", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-alone", action="store_true", help="skip decoding every image alone (faster)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of the batch (best of)")
    p.add_argument("--quick", action="store_true", help="cfg only, W=16, 3 classes, no guess table (smoke test)")
    p.add_argument("--out-dir", default=None, help="write jacobi.csv and jacobi.md here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    classes = list(range(NUM_CLASSES))
    if args.quick:
        args.modes, args.windows, args.guesses, classes, args.repeats = ["cfg"], [16], [], [0, 5, 13], 1
    world = load_world()
    gpt = world.gpt
    N = gpt.config.num_image_tokens
    labels = torch.tensor(classes).repeat_interleave(args.images_per_class)
    keys = row_keys(len(labels), seed=args.seed)
    engine = Engine(gpt)
    generate(gpt, labels, seeds=keys, guidance=WORLD_GUIDANCE, engine=engine)  # warm-up (allocations)
    rows = []
    for mode in args.modes:
        for window in args.windows:
            row = run_row(world, engine, labels, keys, mode, window, "left", not args.no_alone, args.repeats)
            rows.append(dict(table="modes", **row))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for mode in [m for m in ("cfg", "fast") if m in args.modes and args.guesses]:
        for window in args.guess_windows:
            for guess in args.guesses:
                row = run_row(world, engine, labels, keys, mode, window, guess, not args.no_alone, 1)
                rows.append(dict(table="guesses", **row))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = (f"Mini world, {len(classes)} classes x {args.images_per_class} images, seed {args.seed}, "
            f"{platform.processor() or platform.machine()} CPU, 1 thread, torch {torch.__version__}, "
            f"{date.today()}\n\n" + markdown([r for r in rows if r["table"] == "modes"], "modes", N))
    guesses = [r for r in rows if r["table"] == "guesses"]
    if guesses:
        text += "\nFirst guesses of tokens no pass has predicted yet:\n\n" + markdown(guesses, "guesses", N)
    print(text)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "jacobi.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: r.get(k, "") for k in FIELDS})
        (out / "jacobi.md").write_text(text)
    summary = dict(tokens_per_image=N, images=len(labels), rows=rows,
                   all_identical=all(r["mismatched_tokens"] == 0 for r in rows))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
