"""`llamagen-core2 convert`: an official .pt checkpoint -> safetensors + config.json (sharded past --max-shard-mb)."""
from __future__ import annotations

from pathlib import Path

from ..io.files import check_output_dir
from .args import add_threads_arg, positive_float, positive_int


def cmd_convert(args) -> int:
    from ..decode.model import GPT
    from ..encoders.vq import VQModel
    from ..io.checkpoint import read_state_dict

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


def add_subcommand(subparsers) -> None:
    c = subparsers.add_parser("convert", help="official .pt -> safetensors + config.json (sharded past --max-shard-mb)")
    c.add_argument("src", help="checkpoint file (.pt / .safetensors) or directory")
    c.add_argument("out", help="output directory")
    c.add_argument("--kind", default="auto", choices=("auto", "gpt", "vq"), help="auto: vq if it has encoder.* keys")
    c.add_argument("--preset", default=None, help="GPT-* or VQ-* preset; default: inferred (VQ-16 for a VQ)")
    c.add_argument("--image-size", type=positive_int, default=None, help="GPT image size; default: from the file name")
    c.add_argument("--max-shard-mb", type=positive_float, default=4096, help="safetensors shard size")
    add_threads_arg(c)
    c.set_defaults(func=cmd_convert)
