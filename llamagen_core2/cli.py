"""`llamagen-core2` command line: generate, convert, plus the subcommands other modules register.

Each feature module that owns a subcommand exposes `add_subcommand(subparsers)`; the modules are listed in
SUBCOMMAND_MODULES and imported lazily here, so `llamagen-core2 --help` stays fast and a missing optional
dependency (e.g. diffusers) only affects its own subcommand. Errors the user can fix (InvalidArgument,
CheckpointError, missing files) are printed as one line and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from .errors import CheckpointError, InvalidArgument

SUBCOMMAND_MODULES = (
    "llamagen_core2.core2_cli",  # collect, reflect, sample (CoRe^2)
    "llamagen_core2.world.demo",  # demo on the shipped mini-world checkpoints
    "llamagen_core2.diffusion.cli",  # diffuse (+ diffusion collect/reflect)
)

DTYPES = ("float32", "bfloat16", "float16")


def parse_classes(text: str) -> list[int]:
    """'1,2,3' or '0-9' or '1,5-7' -> [ints]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InvalidArgument(f"--classes must be ids like '1,2,3' or ranges like '0-9', got {text!r}") from None
    if not out:
        raise InvalidArgument("--classes is empty")
    return out


def pick_device(name: str | None):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling knobs shared by generate / sample / collect (LlamaGen c2i demo defaults)."""
    p.add_argument("--mode", default="cfg", choices=("cond", "cfg", "fast", "slow"))
    p.add_argument("--slow-first", type=float, default=None, metavar="FRACTION",
                   help="schedule: slow for the first FRACTION of tokens, then fast (needs --weak)")
    p.add_argument("--fast-first", type=float, default=None, metavar="FRACTION",
                   help="schedule: fast for the first FRACTION of tokens, then slow (needs --weak)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--cfg-interval", type=int, default=-1, help="CFG for tokens 0..N+1 only (-1 = all)")
    p.add_argument("--w2s-scale", type=float, default=1.5, help="CoRe^2 slow-mode weak-to-strong scale")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=DTYPES)


def schedule_from_args(args, num_tokens: int):
    from .generate import make_schedule

    if args.slow_first is not None and args.fast_first is not None:
        raise InvalidArgument("give at most one of --slow-first and --fast-first")
    if args.slow_first is not None:
        return make_schedule(num_tokens, first="slow", then="fast", first_fraction=args.slow_first)
    if args.fast_first is not None:
        return make_schedule(num_tokens, first="fast", then="slow", first_fraction=args.fast_first)
    return None


def load_weak(path, gpt, device, dtype):
    if path is None:
        return None
    from .weak_model import WeakModel

    return WeakModel.from_pretrained(path, gpt, device=device, dtype=dtype)  # refuses a weak model of another base


def cmd_generate(args) -> int:
    import torch

    from .generate import generate
    from .images import make_grid, save_png, to_uint8
    from .model import GPT
    from .vq import VQModel

    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype)
    gpt = GPT.from_pretrained(args.gpt, preset=args.preset, device=device, dtype=dtype,
                              **({"image_size": args.image_size} if args.image_size else {}))
    vq = VQModel.from_pretrained(args.vq, preset=args.vq_preset, device=device)
    if gpt.config.model_type == "c2i":
        if args.classes is None:
            raise InvalidArgument("a class-conditional model needs --classes (e.g. --classes 207,360,387)")
        cond, cond_mask = torch.tensor(parse_classes(args.classes), device=device), None
    else:
        if args.prompts is None or args.t5 is None:
            raise InvalidArgument("a text-conditional model needs --prompts FILE (one caption per line) and --t5 DIR")
        from .text import CaptionEncoder

        prompts = [l.strip() for l in Path(args.prompts).read_text().splitlines() if l.strip()]
        cond, cond_mask = CaptionEncoder.from_pretrained(args.t5, device=device).encode(prompts)
    weak = load_weak(args.weak, gpt, device, dtype)
    n = gpt.config.num_image_tokens
    t0 = time.perf_counter()
    tokens = generate(gpt, cond, cond_mask=cond_mask, mode=args.mode, schedule=schedule_from_args(args, n),
                      cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, weak_model=weak,
                      w2s_scale=args.w2s_scale, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    with torch.inference_mode():
        images = vq.decode_codes(tokens)
    pixels = to_uint8(images)
    out = Path(args.out)
    grid = out / "grid.png"
    save_png(make_grid(pixels, nrow=args.nrow), grid)
    names = [f"{i:05d}_class{int(c)}.png" if gpt.config.model_type == "c2i" else f"{i:05d}.png"
             for i, c in enumerate(cond if gpt.config.model_type == "c2i" else range(len(pixels)))]
    for name, image in zip(names, pixels):
        save_png(image, out / "images" / name)
    if not args.quiet:
        print(f"wrote {grid} and {len(pixels)} images under {out / 'images'} "
              f"({seconds:.2f} s of token generation on {device})", file=sys.stderr)
    print(json.dumps({"grid": str(grid), "images_dir": str(out / "images"), "num_images": len(pixels),
                      "tokens_per_image": n, "mode": args.mode, "seconds": round(seconds, 4),
                      "images_per_s": round(len(pixels) / seconds, 4), "device": str(device)}))
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import read_state_dict
    from .model import GPT
    from .vq import VQModel

    kind = args.kind
    if kind == "auto":
        keys = read_state_dict(args.src).keys()
        kind = "vq" if any(k.startswith("encoder.") for k in keys) else "gpt"
    if kind == "gpt":
        model = GPT.from_pretrained(args.src, preset=args.preset,
                                    **({"image_size": args.image_size} if args.image_size else {}))
    else:
        model = VQModel.from_pretrained(args.src, preset=args.preset or "VQ-16")
    files = model.save_pretrained(args.out, max_shard_bytes=int(args.max_shard_mb * 2 ** 20)) if kind == "gpt" \
        else model.save_pretrained(args.out)
    print(f"converted {args.src} ({kind}) -> {args.out}: {', '.join(Path(f).name for f in files)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamagen-core2", description="LlamaGen inference with CoRe^2 guidance")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample images from a GPT checkpoint + VQ tokenizer into a PNG grid")
    g.add_argument("--gpt", required=True, help="official .pt, .safetensors, or a converted directory")
    g.add_argument("--preset", default=None, help="GPT preset (GPT-B ... GPT-3B, '-t2i'); inferred if omitted")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--vq", required=True, help="VQ tokenizer checkpoint (.pt / .safetensors / directory)")
    g.add_argument("--vq-preset", default="VQ-16", choices=("VQ-16", "VQ-8"))
    g.add_argument("--classes", default=None, help="class ids, e.g. '207,360,387' or '0-7'")
    g.add_argument("--prompts", default=None, help="t2i: text file with one caption per line")
    g.add_argument("--t5", default=None, help="t2i: local FLAN-T5 directory")
    g.add_argument("--weak", default=None, help="CoRe^2 weak model directory (for fast/slow/schedules)")
    g.add_argument("--nrow", type=int, default=8)
    g.add_argument("--out", default="samples", help="output directory: grid.png + images/*.png")
    g.add_argument("--quiet", action="store_true", help="no progress bar; only the final JSON line")
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="official .pt -> safetensors + config.json (sharded past --max-shard-mb)")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--kind", default="auto", choices=("auto", "gpt", "vq"))
    c.add_argument("--preset", default=None)
    c.add_argument("--image-size", type=int, default=None)
    c.add_argument("--max-shard-mb", type=float, default=4096)
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
    try:
        return int(args.func(args) or 0)
    except (InvalidArgument, CheckpointError, FileNotFoundError) as e:
        print(f"llamagen-core2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
