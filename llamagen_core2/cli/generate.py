"""`llamagen-core2 generate`: sample images from a GPT checkpoint + VQ tokenizer into a labelled PNG grid.

Writes `grid.png` (the demo's labelled sheet: a row per class or caption, wrapped after `--nrow` images), one PNG
per image under `images/` and `settings.json`, and ends with a JSON summary line. Image n of the run uses
`image_key(--seed, n)`, so it does not depend on `--batch-size`, and a rerun with the same settings skips the
images already written (docs/cli.md).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ..io.files import check_output_dir
from .args import (add_compile_arg, add_condition_args, add_decoding_args, add_model_args, add_refine_args,
                   add_sampling_args, add_vq_args, check_refine_args, int_at_least, int_in, positive_int)
from .loading import checkpoint_source, guidance_from_args, load_conditions, load_gpt, load_refine, load_vq
from .runner import print_json

MIN_GRID_TILE = 64  # --scale's default: the smallest upscaling that makes grid.png's tiles at least this wide (px)


def cmd_generate(args) -> int:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from ..core2.sample import SEED_RULE, batch_condition, pending_batches
    from ..io.images import save_png
    from ..io.run_settings import check_run_settings
    from ..pipeline import LlamaGenPipeline

    check_output_dir(args.out)
    check_refine_args(args)
    gpt = load_gpt(args)
    conds, cond_mask, names = load_conditions(args, gpt)
    vq = load_vq(args)
    weak, schedule = load_refine(args, gpt)
    guidance = guidance_from_args(args, schedule)
    pipe = LlamaGenPipeline(gpt, vq, weak_model=weak, guidance=guidance)
    c2i = gpt.config.model_type == "c2i"
    # --per-class images of every condition, condition-major; image n uses image_key(--seed, n), so it does not
    # depend on --batch-size, and a rerun can skip the batches already written.
    total = len(conds) * args.per_class
    out_dir = Path(args.out)
    image_dir = out_dir / "images"
    labels = [f"class{int(c)}" for c in conds] if c2i else [f"caption{i}" for i in range(len(conds))]
    paths = [image_dir / f"{n:05d}_{labels[n // args.per_class]}.png" for n in range(total)]
    settings = dict(conditions=conds.tolist() if c2i else names, per_condition=args.per_class,
                    gpt=checkpoint_source(args.gpt, args.gpt_filename), gpt_config=gpt.config.to_dict(),
                    dtype=args.dtype, vq=checkpoint_source(args.vq, args.vq_filename),
                    weak=None if args.weak is None else checkpoint_source(args.weak), **guidance.describe(),
                    seed=args.seed, seed_rule=SEED_RULE)
    check_run_settings(out_dir / "settings.json", settings, has_results=any(image_dir.glob("*.png")), write=True,
                       results="images")
    todo = pending_batches(paths, args.batch_size)  # the rest: an earlier run's
    bar = tqdm(total=len(todo) * gpt.config.num_image_tokens, desc="tokens", unit="token", disable=args.quiet)
    t0 = time.perf_counter()
    pixels, generated, passes = {}, 0, 0.0
    for index in todo:
        out = pipe(**batch_condition(gpt, conds, cond_mask, index, args.per_class), seed=args.seed, first_image_index=index[0], output_type="np", progress=bar,
                   decoding=args.decoding, jacobi_window=args.jacobi_window)
        passes += out.stats["forward_passes_per_image"] * len(index)
        for n, image in zip(index, out.images):
            save_png(image, paths[n])
            pixels[n] = image
        generated += len(index)
    bar.close()
    seconds = time.perf_counter() - t0
    for n in range(total):
        if n not in pixels:
            with Image.open(paths[n]) as im:
                pixels[n] = np.asarray(im.convert("RGB"))
    grid = out_dir / "grid.png"
    row_labels = [f"class {int(c)}" for c in conds] if c2i else [f"{i}: {name[:24]}" for i, name in enumerate(names)]
    title = (f"{'schedule' if schedule is not None else args.mode}, cfg {args.cfg_scale:g}, top-k {args.top_k}, "
             f"seed {args.seed}")
    save_png(_labelled_sheet([pixels[n] for n in range(total)], row_labels, title, args, gpt.config.image_size), grid)
    if not args.quiet:
        print(f"wrote {grid} and {generated} of {total} images under {image_dir} "
              f"({seconds:.2f} s of generation + VQ decode on {args.device})", file=sys.stderr)
    print_json({"grid": str(grid), "images_dir": str(image_dir), "num_images": total, "images_generated": generated,
                "tokens_per_image": gpt.config.num_image_tokens, "mode": args.mode, "cfg_scale": args.cfg_scale,
                "top_k": args.top_k, "seed": args.seed, "decoding": args.decoding,
                "forward_passes_per_image": round(passes / generated, 3) if generated else None,
                "seconds": round(seconds, 4),
                "images_per_s": round(generated / seconds, 4) if generated and seconds > 0 else None,
                "device": str(args.device)})
    return 0


def _labelled_sheet(images: list, row_labels: list, title: str, args, image_size: int):
    """generate's grid.png, the demo's labelled sheet (images.labelled_grid): a row per condition, its label on the
    left, wrapped after --nrow images; tiles upscaled --scale x (default: to at least MIN_GRID_TILE px)."""
    import numpy as np

    from ..io.images import labelled_grid

    rows, labels = [], []
    for c, label in enumerate(row_labels):
        own = images[c * args.per_class:(c + 1) * args.per_class]
        for start in range(0, len(own), args.nrow):
            rows.append(np.stack(own[start:start + args.nrow]))
            labels.append("" if start else label)
    scale = args.scale or max(1, math.ceil(MIN_GRID_TILE / image_size))
    return labelled_grid(rows, labels, column_labels=[(title, min(args.nrow, args.per_class))], scale=scale)


def add_subcommand(subparsers) -> None:
    g = subparsers.add_parser("generate", help="sample images from a GPT checkpoint + VQ tokenizer into a PNG grid")
    add_model_args(g)
    add_condition_args(g)
    add_sampling_args(g, cfg_default=4.0, top_k_default=2000)
    add_refine_args(g)
    g.add_argument("--cfg-interval", type=int_at_least(-1), default=-1, help="CFG for tokens 0..N+1 only (-1 = all)")
    add_decoding_args(g)
    add_vq_args(g)
    g.add_argument("--nrow", type=positive_int, default=8,
                   help="images per row of grid.png: a row per class / caption, wrapped after this many")
    g.add_argument("--scale", type=int_in(1, 16), default=None,
                   help=f"pixel upscaling of each image in grid.png; default: the smallest giving tiles >= "
                        f"{MIN_GRID_TILE} px (3 for the mini world's 24 px images, 1 for 256 px)")
    g.add_argument("--out", default="samples", help="output directory: grid.png + images/*.png + settings.json")
    g.add_argument("--quiet", action="store_true", help="no progress bar; only the final JSON line")
    add_compile_arg(g)
    g.set_defaults(func=cmd_generate)
