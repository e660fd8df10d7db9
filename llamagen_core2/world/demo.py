"""`llamagen-core2 demo`: sample the shipped mini world and write a PNG grid (one row per class, columns per mode).

Contract:
  * `run_demo(out_png, classes=None, modes=("cond", "cfg", "fast", "slow"), seed=0, samples_per_mode=2,
    scale=3, checkpoint_dir=None, decoding="sequential", jacobi_window=16, **sampling) -> dict` loads the shipped
    models (`pipeline.load_world`), samples `samples_per_mode` images per (class, mode) through `LlamaGenPipeline` (`sampling` overrides fields of
    `WORLD_GUIDANCE`) with the same seed for every mode, and writes the grid (images.labelled_grid, the sheet
    `generate` writes too): a header row of mode names, then one row per class with its name on the left. Modes "fast"/"slow" need
    the CoRe^2 weak model; without one they are skipped and the returned `notes` (also printed by the CLI) say
    so. Returns {"path", "size": (width, height), "modes", "classes", "skipped", "notes", "seconds", "base_rows",
    "forward_passes"} (per image and mode; Jacobi decoding draws the same images in fewer passes).
  * `grid_size(num_classes, num_columns, scale)` gives the PNG size (width, height) for a layout.
  * `add_subcommand(subparsers)` registers `demo` on an argparse subparsers object (cli.py wires it).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence

import numpy as np
from ..cli_common import (add_decoding_args, add_threads_arg, apply_threads, class_names_help, int_in,
                          non_negative_float, non_negative_int, seed_int)
from ..errors import InvalidArgument, check_int
from ..files import check_output_file
from ..guidance_config import MODE_TABLE, MODES
from ..images import GRID_PAD as PAD, HEADER_HEIGHT as HEADER_H, labelled_grid, save_png
from ..jacobi import DEFAULT_WINDOW
from .dataset import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from .pipeline import WORLD_GUIDANCE, load_world

LABEL_W = 84
DEMO_MODES = ("cond", "cfg", "fast", "slow")


def grid_size(num_classes: int, num_columns: int, scale: int) -> tuple[int, int]:
    """(width, height) of the demo PNG: label column + image columns; header row + one row per class."""
    cell = IMAGE_SIZE * scale + PAD
    return LABEL_W + num_columns * cell + PAD, HEADER_H + num_classes * cell + PAD


def _check(classes, modes, samples_per_mode, scale) -> tuple[list[int], list[str]]:
    classes = list(range(NUM_CLASSES)) if classes is None else \
        [check_int("class id", c, minimum=0, maximum=NUM_CLASSES - 1) for c in classes]
    if not classes:
        raise InvalidArgument(f"classes must be a non-empty list of ids in [0, {NUM_CLASSES - 1}], got {classes}")
    modes = list(modes)
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise InvalidArgument(f"modes must be a non-empty subset of {MODES}, got {modes}")
    check_int("samples_per_mode", samples_per_mode, minimum=1)
    check_int("scale", scale, minimum=1, maximum=16)
    return classes, modes


def run_demo(out_png, classes: Optional[Sequence[int]] = None, modes: Sequence[str] = DEMO_MODES, seed: int = 0,
             samples_per_mode: int = 2, scale: int = 3, checkpoint_dir=None, decoding: str = "sequential",
             jacobi_window: int = DEFAULT_WINDOW, **sampling) -> dict:
    start = time.time()
    classes, modes = _check(classes, modes, samples_per_mode, scale)
    world = load_world(checkpoint_dir)
    guidance = WORLD_GUIDANCE.replace(**sampling)
    skipped, notes = [], []
    if world.weak is None and any(MODE_TABLE[m].weak for m in modes):
        skipped = [m for m in modes if MODE_TABLE[m].weak]
        notes.append(f"skipped {skipped}: no CoRe^2 weak model shipped at {world.checkpoint_dir / 'world_weak'} "
                     f"(train one with `llamagen-core2 collect` + `reflect`)")
        modes = [m for m in modes if m not in skipped]
    if not modes:
        raise InvalidArgument(f"no mode left to draw after skipping {skipped}")

    pipe = world.pipeline(guidance)
    columns, base_rows, passes = [], {}, {}
    for mode in modes:
        out = pipe(class_labels=classes, num_images_per_prompt=samples_per_mode, guidance=guidance.replace(mode=mode),
                   seed=seed, output_type="np", progress=False, decoding=decoding,
                   jacobi_window=jacobi_window)  # condition-major: [C * k, H, W, 3] uint8
        columns.append(out.images.reshape(len(classes), samples_per_mode, IMAGE_SIZE, IMAGE_SIZE, 3))
        base_rows[mode] = out.stats["base_rows"] / out.stats["images"]
        passes[mode] = out.stats["forward_passes_per_image"]

    n_cols = len(modes) * samples_per_mode
    width, height = grid_size(len(classes), n_cols, scale)
    sheet = labelled_grid([np.concatenate([column[r] for column in columns]) for r in range(len(classes))],
                          [CLASS_NAMES[c] for c in classes], column_labels=[(m, samples_per_mode) for m in modes],
                          scale=scale, label_width=LABEL_W)
    path = save_png(sheet, out_png)
    return dict(path=str(path), size=(width, height), modes=modes, classes=classes, skipped=skipped, notes=notes,
                seconds=time.time() - start, base_rows=base_rows, forward_passes=passes)


def _main(args: argparse.Namespace) -> int:
    apply_threads(args)
    check_output_file(args.out)
    from ..collect import parse_class_ids

    classes = parse_class_ids(args.classes, NUM_CLASSES) if args.classes else None
    sampling = {k: v for k, v in dict(cfg_scale=args.cfg_scale, w2s_scale=args.w2s_scale,
                                      temperature=args.temperature, top_k=args.top_k).items() if v is not None}
    info = run_demo(args.out, classes=classes, modes=args.modes.split(","), seed=args.seed,
                    samples_per_mode=args.samples, scale=args.scale, checkpoint_dir=args.checkpoints,
                    decoding=args.decoding, jacobi_window=args.jacobi_window, **sampling)
    for note in info["notes"]:
        print(f"note: {note}")
    rows = ", ".join(f"{m} {r:.0f}" for m, r in info["base_rows"].items())
    passes = ", ".join(f"{m} {p:.1f}" for m, p in info["forward_passes"].items())
    print(f"wrote {info['path']} ({info['size'][0]}x{info['size'][1]}): {len(info['classes'])} classes x modes "
          f"{info['modes']} in {info['seconds']:.1f}s; base-model rows per image: {rows}; forward passes per image "
          f"({args.decoding}): {passes}")
    return 0


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `demo` on an argparse subparsers object; the parser's `func` runs it and returns an exit code."""
    p = subparsers.add_parser("demo", help="sample the shipped mini world (cond / cfg / CoRe^2 fast / slow) into a PNG grid",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo.png", help="output PNG path")
    p.add_argument("--classes", default=None,
                   help=f"comma-separated class ids in [0, {NUM_CLASSES - 1}] (default: all); {class_names_help()}")
    p.add_argument("--modes", default=",".join(DEMO_MODES), help="comma-separated modes")
    p.add_argument("--samples", type=int_in(1, 64), default=2, help="images per class and mode")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed")
    p.add_argument("--scale", type=int_in(1, 16), default=3, help="pixel upscaling of each 24x24 image")
    p.add_argument("--cfg-scale", type=non_negative_float, default=None, help="default: the mini world's 3.0")
    p.add_argument("--w2s-scale", type=non_negative_float, default=None, help="default: the mini world's 1.5")
    p.add_argument("--temperature", type=non_negative_float, default=None, help="default: 1.0")
    p.add_argument("--top-k", type=non_negative_int, default=None, help="default: 0 (full vocabulary)")
    p.add_argument("--checkpoints", default=None, help="directory holding world_vq/, world_gpt/, world_weak/ "
                                                       "(default: $LLAMAGEN_CORE2_CHECKPOINTS or <repo>/checkpoints)")
    add_decoding_args(p)
    add_threads_arg(p)
    p.set_defaults(func=_main)
    return p
