"""Command-line pieces shared by `generate` (cli.py) and `collect` / `reflect` / `sample` (core2_cli.py).

Argument groups (model, conditions, sampling, CoRe^2 refine) and the loaders behind them, so every subcommand
spells an option, its default and its error message the same way. LlamaGen's own flag names are accepted as
aliases (--gpt-ckpt, --gpt-model, --vq-ckpt, --vq-model, --precision none|fp16|bf16, --global-seed,
--per-proc-batch-size), and the sampling defaults follow the model type: c2i the subcommand's, t2i LlamaGen's
sample_t2i.py (cfg 7.5, top-k 1000). Checkpoints are local paths or Hub repo ids (hub.py).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from .errors import InvalidArgument
from .guidance_config import MODES, GuidanceConfig, needs_weak

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMAGEN_PRECISION = {"none": "float32", "fp16": "float16", "bf16": "bfloat16"}  # LlamaGen's --precision
T2I_SAMPLING = (7.5, 1000)  # LlamaGen sample_t2i.py: cfg scale, top-k


class _Precision(argparse.Action):
    """LlamaGen's `--precision none|fp16|bf16`, stored as our --dtype."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, "dtype", LLAMAGEN_PRECISION[values])


# ---------------------------------------------------------------------- shared arguments / loading
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpt", "--gpt-ckpt", dest="gpt", required=True,
                   help="base GPT checkpoint: .pt, .safetensors, a converted directory or a Hub repo id")
    p.add_argument("--gpt-filename", default=None,
                   help="file inside the Hub repo --gpt (e.g. c2i_B_256.pt in FoundationVision/LlamaGen)")
    p.add_argument("--gpt-preset", "--gpt-model", dest="gpt_preset", default=None,
                   help="GPT preset (e.g. GPT-B, GPT-XL-t2i); default: inferred")
    p.add_argument("--image-size", type=int, default=None, help="image size the GPT was trained for (256/384/512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="base-model weights dtype")
    p.add_argument("--precision", dest="dtype", choices=sorted(LLAMAGEN_PRECISION), action=_Precision,
                   default=argparse.SUPPRESS, help="LlamaGen's name for --dtype (none = float32)")


def add_vq_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vq", "--vq-ckpt", dest="vq", required=True,
                   help="VQ tokenizer checkpoint (.pt / .safetensors / directory) or a Hub repo id")
    p.add_argument("--vq-filename", default=None, help="file inside the Hub repo --vq (e.g. vq_ds16_c2i.pt)")
    p.add_argument("--vq-preset", "--vq-model", dest="vq_preset", default="VQ-16", choices=("VQ-16", "VQ-8"))


def load_vq(args):
    from .vq import VQModel

    return VQModel.from_pretrained(args.vq, preset=args.vq_preset, device=args.device, filename=args.vq_filename)


def add_condition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", default=None, help="class ids for c2i, e.g. '0-999' or '1,7,207'")
    p.add_argument("--captions", default=None, help="t2i: text file with one caption per line")
    p.add_argument("--t5", default=None, help="t2i: FLAN-T5-XL for caption features (local directory or Hub id "
                                              "google/flan-t5-xl)")
    p.add_argument("--per-class", type=int, default=1, help="images per class id / caption")
    p.add_argument("--batch-size", "--per-proc-batch-size", dest="batch_size", type=int, default=16,
                   help="images per batch (per process under torchrun)")
    p.add_argument("--seed", "--global-seed", dest="seed", type=int, default=0,
                   help="image n of the run uses seeding.image_key(seed, n), whatever the batch size")


def add_sampling_args(p: argparse.ArgumentParser, cfg_default: float, top_k_default: int = 0) -> None:
    """cfg scale / top-k default by model type (filled in by load_gpt): c2i the given ones, t2i sample_t2i.py's."""
    p.add_argument("--cfg-scale", type=float, default=None,
                   help=f"default {cfg_default:g} (c2i), {T2I_SAMPLING[0]:g} (t2i)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"0 = full vocabulary (FID setting); default {top_k_default} (c2i), {T2I_SAMPLING[1]} (t2i)")
    p.set_defaults(sampling_defaults={"c2i": (cfg_default, top_k_default), "t2i": T2I_SAMPLING})
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)


def resolve_device(args) -> str:
    """Under torchrun each process uses its own GPU: a bare 'cuda' becomes cuda:LOCAL_RANK."""
    device = str(args.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgument(f"--device {device} requested but CUDA is not available")
        torch.cuda.set_device(torch.device(device))
    args.device = device
    return device


def load_gpt(args):
    from .model import GPT

    resolve_device(args)
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    gpt = GPT.from_pretrained(args.gpt, args.gpt_preset, device=args.device, dtype=DTYPES[args.dtype],
                              filename=getattr(args, "gpt_filename", None), **overrides)
    defaults = getattr(args, "sampling_defaults", None)
    if defaults is not None:
        cfg_scale, top_k = defaults[gpt.config.model_type]
        args.cfg_scale = cfg_scale if args.cfg_scale is None else args.cfg_scale
        args.top_k = top_k if args.top_k is None else args.top_k
    return gpt


def guidance_from_args(args, schedule=None) -> GuidanceConfig:
    """The GuidanceConfig of add_sampling_args + add_refine_args (+ --cfg-interval where a command has it)."""
    return GuidanceConfig(mode=args.mode, schedule=schedule, cfg_scale=args.cfg_scale,
                          cfg_interval=getattr(args, "cfg_interval", -1), w2s_scale=args.w2s_scale,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def load_conditions(args, gpt):
    """-> (conditions, caption_mask or None, names or None) from --classes or --captions/--t5."""
    from .collect import parse_class_ids

    c = gpt.config
    if c.model_type == "c2i":
        if args.captions is not None or args.classes is None:
            raise InvalidArgument("a class-conditional GPT needs --classes (e.g. '0-999'), not --captions")
        return torch.tensor(parse_class_ids(args.classes, c.num_classes)), None, None
    if args.captions is None or args.t5 is None:
        raise InvalidArgument("a text-conditional GPT needs --captions FILE and --t5 DIR|google/flan-t5-xl")
    from .text import CaptionEncoder

    with open(args.captions) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise InvalidArgument(f"--captions {args.captions} holds no captions")
    encoder = CaptionEncoder.from_pretrained(args.t5, device=args.device, dtype=torch.bfloat16
                                             if str(args.device).startswith("cuda") else None)
    feats, masks = [], []
    for start in range(0, len(names), 32):
        f_, m_ = encoder.encode(names[start:start + 32])
        feats.append(f_.cpu())
        masks.append(m_.cpu())
    del encoder
    return torch.cat(feats), torch.cat(masks), names


def print_json(obj) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(obj, indent=2, default=str))


def add_refine_args(p: argparse.ArgumentParser) -> None:
    """Guidance mode, slow/fast schedules and the CoRe^2 weak model."""
    p.add_argument("--mode", default="cfg", choices=MODES,
                   help="guidance for every token (fast/slow need --weak)")
    sched = p.add_mutually_exclusive_group()
    sched.add_argument("--slow-first", type=float, default=None, help="slow for this fraction of tokens, then fast")
    sched.add_argument("--fast-first", type=float, default=None, help="fast for this fraction of tokens, then slow")
    sched.add_argument("--slow-first-tokens", type=int, default=None, help="slow for the first K tokens, then fast")
    sched.add_argument("--fast-first-tokens", type=int, default=None, help="fast for the first K tokens, then slow")
    p.add_argument("--weak", default=None, help="weak-model directory written by `reflect`")
    p.add_argument("--w2s-scale", type=float, default=1.5, help="slow mode: out = weak + a * (cfg - weak)")
    p.add_argument("--allow-other-base-weights", action="store_true",
                   help="use a weak model trained for a same-shape base with different weights")


def load_refine(args, gpt):
    """-> (weak model or None, per-token schedule or None) from add_refine_args' options."""
    from .sample import build_schedule
    from .weak_model import WeakModel

    weak = None
    if args.weak is not None:
        from .hub import resolve

        weak_dir = resolve(args.weak, allow_patterns=("*.json", "*.safetensors"), what="--weak")
        weak = WeakModel.from_pretrained(weak_dir, gpt, device=args.device, dtype=DTYPES[args.dtype])
        if args.allow_other_base_weights:
            weak.require_same_weights = False
    schedule = build_schedule(gpt.config.num_image_tokens, mode=args.mode, slow_first=args.slow_first,
                              fast_first=args.fast_first, slow_first_tokens=args.slow_first_tokens,
                              fast_first_tokens=args.fast_first_tokens)
    if needs_weak(schedule or [args.mode]) and weak is None:
        raise InvalidArgument("--mode fast/slow and --slow-first/--fast-first need --weak DIR (from `reflect`)")
    return weak, schedule
