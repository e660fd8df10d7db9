"""The demo sheet: sample the shipped mini world into a PNG grid (one row per class, columns per mode).

Contract:
  * `run_demo(out_png, classes=None, modes=("cond", "cfg", "fast", "slow"), seed=0, samples_per_mode=2,
    scale=3, checkpoint_dir=None, decoding="sequential", jacobi_window=16, **sampling) -> dict` loads the shipped
    models (`pipeline.load_world`), samples `samples_per_mode` images per (class, mode) through `LlamaGenPipeline` (`sampling` overrides fields of
    `WORLD_GUIDANCE`) with the same seed for every mode, and writes the grid (images.labelled_grid, the sheet
    `generate` writes too): a header row of mode names, then one row per class with its name on the left. Modes "fast"/"slow" need
    the CoRe^2 weak model; without one they are skipped and the returned `notes` (also printed by the CLI) say
    so. Returns {"path", "size": (width, height), "modes", "classes", "skipped", "notes", "seconds", "base_rows",
    "forward_passes"} (per image and mode; Jacobi decoding draws the same images in fewer passes).
  * The `demo` subcommand that calls it is llamagen_core2/cli/demo.py.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from ..decode.jacobi import DEFAULT_WINDOW
from ..errors import InvalidArgument, check_int
from ..guidance.config import MODE_TABLE, MODES
from ..io.images import labelled_grid, save_png
from .dataset import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES
from .pipeline import WORLD_GUIDANCE, load_world

LABEL_W = 84
DEMO_MODES = ("cond", "cfg", "fast", "slow")


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

    sheet = labelled_grid([np.concatenate([column[r] for column in columns]) for r in range(len(classes))],
                          [CLASS_NAMES[c] for c in classes], column_labels=[(m, samples_per_mode) for m in modes],
                          scale=scale, label_width=LABEL_W)
    path = save_png(sheet, out_png)
    return dict(path=str(path), size=(sheet.shape[1], sheet.shape[0]), modes=modes, classes=classes, skipped=skipped, notes=notes,
                seconds=time.time() - start, base_rows=base_rows, forward_passes=passes)
