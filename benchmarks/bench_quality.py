"""Quality vs compute on the mini world: cond, CFG, CoRe^2 fast / slow and slow->fast schedules.

    python benchmarks/bench_quality.py --images-per-class 20 --seeds 0,1,2 --out-dir benchmarks/results

For every configuration and seed it samples `images-per-class` images of every class with the shipped GPT
(+ weak model), decodes them with the shipped VQ and measures, with the shipped evaluator:
  * class accuracy (fraction classified as the class they were sampled for),
  * Fréchet distance (FD) of evaluator penultimate features to real dataset images,
  * base-model forward rows per image (generate()'s count: cond step 1 row, CFG/slow step 2 rows, plus any
    uncond catch-up prefill rows), weak-model steps per image and the weak model's per-step parameter fraction,
  * wall time per image (generation + VQ decode, CPU, batch = all images of one seed; the faster of two runs).
Reference rows: real images (a second real sample) and VQ reconstructions of real images (the ceiling for
any sampler on this tokenizer). Outputs: quality.csv (one row per config x seed), quality.md (mean ± std
over seeds) and quality.png (accuracy and FD vs time per image). Modes needing the weak model are skipped,
with a note, when none is shipped.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from llamagen_core2.guidance.config import make_schedule
from llamagen_core2.world.dataset import NUM_CLASSES, make_dataset
from llamagen_core2.world.evaluator import extract_features, frechet_distance_from_stats, gaussian_stats
from llamagen_core2.world.pipeline import WORLD_GUIDANCE, load_world


def configurations(args, has_weak: bool) -> list[dict]:
    cfg_default = args.cfg_for_core2
    configs = [dict(name="cond", mode="cond", cfg=1.0)]
    configs += [dict(name=f"cfg s={s:g}", mode="cfg", cfg=s) for s in args.cfg_scales]
    if has_weak:
        configs.append(dict(name="fast", mode="fast", cfg=cfg_default))
        configs += [dict(name=f"slow a={a:g}", mode="slow", cfg=cfg_default, w2s=a) for a in args.w2s_scales]
        configs += [dict(name=f"sched slow {f:g}", mode="schedule", cfg=cfg_default, w2s=args.schedule_w2s,
                         slow_fraction=f) for f in args.schedule_fractions]
    return configs


def weak_param_fraction(world) -> float:
    """Weak-model parameters touched per step (its own + the shared output head) / base-model parameters."""
    base = sum(p.numel() for p in world.gpt.parameters())
    weak = sum(p.numel() for p in world.weak.parameters()) + world.gpt.output.weight.numel()
    return weak / base


def run_config(world, config: dict, labels: torch.Tensor, seed: int, ref_stats) -> dict:
    n_tokens = world.gpt.config.num_image_tokens
    schedule = None
    if config["mode"] == "schedule":
        schedule = make_schedule(n_tokens, first="slow", then="fast", first_fraction=config["slow_fraction"])
    guidance = WORLD_GUIDANCE.replace(mode=config["mode"] if schedule is None else "cfg", schedule=schedule,
                                      cfg_scale=config["cfg"], w2s_scale=config.get("w2s", WORLD_GUIDANCE.w2s_scale))
    pipe = world.pipeline(guidance)
    # Two runs of the same batch shape (the first also warms up); the faster one is the time reported, because
    # the CPU is shared and a slower run measures other processes, not this sampler. Quality uses the second.
    seconds = []
    for run_seed in (seed + 10_000, seed):
        start = time.perf_counter()
        out = pipe(class_labels=labels, seed=run_seed, output_type="pt", progress=False)
        images, stats = out.images, out.stats
        seconds.append(time.perf_counter() - start)
    seconds = min(seconds)
    feats, logits = extract_features(world.evaluator, images)
    n = len(labels)
    return dict(config=config["name"], mode=config["mode"], cfg_scale=config["cfg"], w2s_scale=config.get("w2s", ""),
                slow_fraction=config.get("slow_fraction", ""), seed=seed, images=n,
                accuracy=float((logits.argmax(1) == labels).float().mean()),
                fd=frechet_distance_from_stats(*gaussian_stats(feats), *ref_stats),
                base_rows_per_image=stats["base_rows"] / n,
                weak_steps_per_image=stats["weak_steps_per_image"],
                ms_per_image=1000 * seconds / n)


def reference_rows(world, labels_seed: int, per_class: int, ref_stats) -> list[dict]:
    real, labels = make_dataset(per_class, seed=labels_seed)
    rows = []
    for name, images in (("real images", real), ("VQ reconstruction", None)):
        if images is None:
            with torch.inference_mode():
                images = world.vq.decode_codes(world.vq.encode(real))
        feats, logits = extract_features(world.evaluator, images)
        rows.append(dict(config=name, mode="reference", cfg_scale="", w2s_scale="", slow_fraction="", seed=labels_seed,
                         images=len(labels), accuracy=float((logits.argmax(1) == labels).float().mean()),
                         fd=frechet_distance_from_stats(*gaussian_stats(feats), *ref_stats),
                         base_rows_per_image=0, weak_steps_per_image=0, ms_per_image=0.0))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        group = [r for r in rows if r["config"] == name]
        summary = {k: group[0][k] for k in ("config", "mode", "cfg_scale", "w2s_scale", "slow_fraction")}
        summary["seeds"] = len(group)
        for key in ("accuracy", "fd", "base_rows_per_image", "weak_steps_per_image", "ms_per_image"):
            values = [float(r[key]) for r in group]
            summary[key] = statistics.mean(values)
            summary[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(summary)
    return out


def markdown(summary: list[dict], header: str) -> str:
    lines = [header, "",
             "| config | class accuracy | FD to real | base rows / image | weak steps / image | ms / image |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['config']} | {s['accuracy']:.3f} ± {s['accuracy_std']:.3f} | {s['fd']:.2f} ± {s['fd_std']:.2f} "
                     f"| {s['base_rows_per_image']:.1f} | {s['weak_steps_per_image']:.0f} "
                     f"| {s['ms_per_image']:.2f} ± {s['ms_per_image_std']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; skipping the plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    groups = {"cond": ("cond", "tab:gray", "s"), "cfg": ("CFG", "tab:blue", "o"), "fast": ("CoRe^2 fast", "tab:green", "^"),
              "slow": ("CoRe^2 slow", "tab:red", "v"), "schedule": ("slow->fast schedule", "tab:orange", "D")}
    for ax, key, label in ((axes[0], "accuracy", "class accuracy (higher is better)"),
                           (axes[1], "fd", "Fréchet distance to real (lower is better)")):
        for mode, (name, colour, marker) in groups.items():
            pts = [s for s in summary if s["mode"] == mode]
            if not pts:
                continue
            ax.errorbar([s["ms_per_image"] for s in pts], [s[key] for s in pts], yerr=[s[key + "_std"] for s in pts],
                        fmt=marker, color=colour, label=name, capsize=3, linestyle="-" if mode in ("cfg", "schedule") else "none")
            for s in pts:
                ax.annotate(s["config"].split(" ", 1)[-1] if mode != "cond" else "", (s["ms_per_image"], s[key]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        for s in summary:
            if s["mode"] == "reference":
                ax.axhline(s[key], color="black", linestyle=":" if "real" in s["config"] else "--", linewidth=1,
                           label=s["config"])
        ax.set_xlabel("wall time per image (ms, CPU)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("mini world: quality vs time per image")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--images-per-class", type=int, default=20)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cfg-scales", type=floats, default=floats("1.5,2,3,4,5"))
    p.add_argument("--cfg-for-core2", type=float, default=None,
                   help="CFG scale inside fast/slow/schedule runs (default: the scale the weak model was trained for)")
    p.add_argument("--w2s-scales", type=floats, default=floats("1,1.5,2,2.5"))
    p.add_argument("--schedule-w2s", type=float, default=WORLD_GUIDANCE.w2s_scale)
    p.add_argument("--schedule-fractions", type=floats, default=floats("0,0.25,0.5,0.75,1"))
    p.add_argument("--real-per-class", type=int, default=100, help="real images per class for the FD reference")
    p.add_argument("--checkpoints", default=None)
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = load_world(args.checkpoints, with_evaluator=True)
    if args.cfg_for_core2 is None:
        trained = getattr(world.weak, "cfg_scale", None) if world.weak is not None else None
        args.cfg_for_core2 = float(trained) if trained else WORLD_GUIDANCE.cfg_scale
    notes = [] if world.weak is not None else ["no CoRe^2 weak model shipped: fast / slow / schedule rows skipped"]
    real, _ = make_dataset(args.real_per_class, seed=8000)
    ref_feats, _ = extract_features(world.evaluator, real)
    ref_stats = gaussian_stats(ref_feats)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.images_per_class)
    rows = reference_rows(world, 8001, args.images_per_class, ref_stats)
    for config in configurations(args, world.weak is not None):
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = run_config(world, config, labels, seed, ref_stats)
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    with open(out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    extra = f", weak-model params per step = {weak_param_fraction(world):.3f} x base" if world.weak is not None else ""
    header = (f"Mini world, {NUM_CLASSES} classes x {args.images_per_class} images per seed, seeds {args.seeds}; "
              f"CFG inside CoRe^2 steps s={args.cfg_for_core2:g}; temperature 1, full vocabulary; "
              f"{platform.processor() or platform.machine()} CPU, {args.threads} threads, {date.today()}{extra}. "
              f"FD reference: {args.real_per_class * NUM_CLASSES} real images. " + " ".join(notes))
    md = markdown(summary, header)
    (out / "quality.md").write_text(md)
    plotted = plot(summary, out / "quality.png")
    print(md)
    print(json.dumps(dict(csv=str(out / "quality.csv"), markdown=str(out / "quality.md"),
                          plot=str(out / "quality.png") if plotted else None, notes=notes)))


if __name__ == "__main__":
    main()
