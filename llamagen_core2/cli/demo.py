"""`llamagen-core2 demo`: sample the shipped mini world and write a PNG grid (one row per class, columns per mode).

The drawing is `world.demo.run_demo`; this module parses its options and prints what it drew.
"""
from __future__ import annotations

import argparse

from ..io.files import check_output_file
from ..world.dataset import NUM_CLASSES
from ..world.demo import DEMO_MODES, run_demo
from .args import add_decoding_args, add_threads_arg, class_names_help, int_in, non_negative_float, \
    non_negative_int, seed_int


def _main(args: argparse.Namespace) -> int:
    check_output_file(args.out)
    from ..core2.collect import parse_class_ids

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
    p = subparsers.add_parser("demo", description=__doc__.splitlines()[0],
                              help="sample the shipped mini world (cond / cfg / CoRe^2 fast / slow) into a PNG grid")
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
