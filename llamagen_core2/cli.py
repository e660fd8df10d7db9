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
import json
import sys
import time
from pathlib import Path

from .cli_common import (Parser, add_condition_args, add_model_args, add_refine_args, add_sampling_args,
                         add_threads_arg, add_vq_args, apply_threads, check_refine_args, guidance_from_args,
                         int_at_least, load_conditions, load_gpt, load_refine, load_vq, positive_float, positive_int,
                         run_subcommand)
from .files import check_output_dir

SUBCOMMAND_MODULES = (
    "llamagen_core2.core2_cli",  # collect, reflect, sample (CoRe^2)
    "llamagen_core2.world.demo",  # demo on the shipped mini-world checkpoints
    "llamagen_core2.diffusion.cli",  # diffuse (+ diffusion collect/reflect)
)


def cmd_generate(args) -> int:
    import torch

    from .images import make_grid, save_png
    from .pipeline import LlamaGenPipeline

    check_output_dir(args.out)
    check_refine_args(args)
    gpt = load_gpt(args)
    conds, cond_mask, _ = load_conditions(args, gpt)
    vq = load_vq(args)
    weak, schedule = load_refine(args, gpt)
    pipe = LlamaGenPipeline(gpt, vq, weak_model=weak, guidance=guidance_from_args(args, schedule))
    condition = dict(class_labels=conds) if gpt.config.model_type == "c2i" else \
        dict(prompt_embeds=conds, prompt_attention_mask=cond_mask)
    # --per-class images of every condition, in batches of --batch-size; image n uses image_key(--seed, n).
    t0 = time.perf_counter()
    out = pipe(**condition, num_images_per_prompt=args.per_class, seed=args.seed, batch_size=args.batch_size,
               output_type="np", progress=not args.quiet)
    seconds = time.perf_counter() - t0
    pixels = out.images
    order = torch.arange(len(conds)).repeat_interleave(args.per_class)
    out_dir = Path(args.out)
    grid = out_dir / "grid.png"
    save_png(make_grid(pixels, nrow=args.nrow), grid)
    for i, (image, c) in enumerate(zip(pixels, order.tolist())):
        label = f"class{int(conds[c])}" if gpt.config.model_type == "c2i" else f"caption{c}"
        save_png(image, out_dir / "images" / f"{i:05d}_{label}.png")
    if not args.quiet:
        print(f"wrote {grid} and {len(pixels)} images under {out_dir / 'images'} "
              f"({seconds:.2f} s of generation + VQ decode on {args.device})", file=sys.stderr)
    print(json.dumps({"grid": str(grid), "images_dir": str(out_dir / "images"), "num_images": len(pixels),
                      "tokens_per_image": gpt.config.num_image_tokens, "mode": args.mode,
                      "cfg_scale": args.cfg_scale, "top_k": args.top_k, "seed": args.seed,
                      "seconds": round(seconds, 4), "images_per_s": round(len(pixels) / seconds, 4),
                      "device": str(args.device)}))
    return 0


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
    add_vq_args(g)
    g.add_argument("--nrow", type=positive_int, default=8, help="images per row of grid.png")
    g.add_argument("--out", default="samples", help="output directory: grid.png + images/*.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar; only the final JSON line")
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
