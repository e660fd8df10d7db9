"""`llamagen-core2` command line: generate, convert, plus the subcommands other modules register.

Each feature module that owns a subcommand exposes `add_subcommand(subparsers)`; the modules are listed in
SUBCOMMAND_MODULES and imported lazily here, so `llamagen-core2 --help` stays fast and a missing optional
dependency (e.g. diffusers) only affects its own subcommand. `main` is the one place that maps the error
families a user can fix (errors.user_error_message: bad arguments, unreadable or mismatched files, file system
errors, NaN refusals, a missing optional package, out of memory) to one line and exit status 2; any other
exception is a bug and keeps its traceback. Usage errors are one line too (cli_common.Parser), and every
subcommand's --help shows defaults.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path

from .cli_common import (Parser, add_compile_arg, add_condition_args, add_decoding_args, add_model_args,
                         add_refine_args, add_sampling_args, add_threads_arg, add_vq_args, apply_threads,
                         check_refine_args, checkpoint_source, guidance_from_args, int_at_least, int_in,
                         load_conditions, load_gpt, load_refine, load_vq, positive_float, positive_int, print_json,
                         run_subcommand)
from .files import check_output_dir

MIN_GRID_TILE = 64  # --scale's default: the smallest upscaling that makes grid.png's tiles at least this wide (px)

SUBCOMMAND_MODULES = (
    "llamagen_core2.core2_cli",  # collect, reflect, sample (CoRe^2)
    "llamagen_core2.world.demo",  # demo on the shipped mini-world checkpoints
    "llamagen_core2.diffusion.cli",  # diffuse (+ diffusion collect/reflect)
)


def cmd_generate(args) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from .images import save_png
    from .pipeline import LlamaGenPipeline
    from .run_settings import check_run_settings
    from .sample import SEED_RULE

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
    batches = [list(range(start, min(start + args.batch_size, total))) for start in range(0, total, args.batch_size)]
    todo = [index for index in batches if not all(paths[n].is_file() for n in index)]  # the rest: an earlier run's
    bar = tqdm(total=len(todo) * gpt.config.num_image_tokens, desc="tokens", unit="token", disable=args.quiet)
    t0 = time.perf_counter()
    pixels, generated, passes = {}, 0, 0.0
    for index in todo:
        rows = torch.tensor(index) // args.per_class
        condition = dict(class_labels=conds[rows]) if c2i else \
            dict(prompt_embeds=conds[rows], prompt_attention_mask=cond_mask[rows])
        out = pipe(**condition, seed=args.seed, first_image_index=index[0], output_type="np", progress=bar,
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

    from .images import labelled_grid

    rows, labels = [], []
    for c, label in enumerate(row_labels):
        own = images[c * args.per_class:(c + 1) * args.per_class]
        for start in range(0, len(own), args.nrow):
            rows.append(np.stack(own[start:start + args.nrow]))
            labels.append("" if start else label)
    scale = args.scale or max(1, math.ceil(MIN_GRID_TILE / image_size))
    return labelled_grid(rows, labels, column_labels=[(title, min(args.nrow, args.per_class))], scale=scale)


def cmd_convert(args) -> int:
    from .checkpoint import read_state_dict
    from .model import GPT
    from .vq import VQModel

    check_output_dir(args.out, "output directory")
    kind = args.kind
    if kind == "auto":
        keys = read_state_dict(args.src).keys()
        kind = "vq" if any(k.startswith("encoder.") for k in keys) else "gpt"
    if kind == "gpt":
        model = GPT.from_pretrained(args.src, preset=args.preset,
                                    **({"image_size": args.image_size} if args.image_size else {}))
    else:
        model = VQModel.from_pretrained(args.src, preset=args.preset)
    files = model.save_pretrained(args.out, max_shard_bytes=int(args.max_shard_mb * 2 ** 20)) if kind == "gpt" \
        else model.save_pretrained(args.out)
    print(f"converted {args.src} ({kind}) -> {args.out}: {', '.join(Path(f).name for f in files)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llamagen-core2", description="LlamaGen inference with CoRe^2 guidance")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample images from a GPT checkpoint + VQ tokenizer into a PNG grid")
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

    c = sub.add_parser("convert", help="official .pt -> safetensors + config.json (sharded past --max-shard-mb)")
    c.add_argument("src", help="checkpoint file (.pt / .safetensors) or directory")
    c.add_argument("out", help="output directory")
    c.add_argument("--kind", default="auto", choices=("auto", "gpt", "vq"), help="auto: vq if it has encoder.* keys")
    c.add_argument("--preset", default=None, help="GPT-* or VQ-* preset; default: inferred (VQ-16 for a VQ)")
    c.add_argument("--image-size", type=positive_int, default=None, help="GPT image size; default: from the file name")
    c.add_argument("--max-shard-mb", type=positive_float, default=4096, help="safetensors shard size")
    add_threads_arg(c)
    c.set_defaults(func=cmd_convert)

    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the feature module itself is absent from this install
                continue
            raise
        module.add_subcommand(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    status, result = run_subcommand(f"llamagen-core2 {args.command}", args, args.func)
    return status or int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
