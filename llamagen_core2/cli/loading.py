"""Turning parsed arguments (args.py) into what a subcommand runs on: the device, the models, the conditions,
the guidance settings.

  * `resolve_device(args)`: the one `--device` rule (llamagen_core2/device.py); `load_gpt` also fills the model
    type's sampling defaults (args.add_sampling_args) and says once that `--compile` has no effect.
  * `load_vq`, `load_conditions` (class ids, or captions encoded with T5), `load_refine` (the weak model and the
    per-token schedule), `guidance_from_args` (the one GuidanceConfig of a command line).
  * Checkpoints are local paths or Hub repo ids (io/hub.py); `checkpoint_source` is how settings records name them.
"""
from __future__ import annotations

import sys

import torch

from ..device import resolve_device as resolve_device_spec
from ..errors import InvalidArgument, rank_and_world
from ..guidance.config import GuidanceConfig
from .args import DTYPES


def note_compile(args) -> None:
    """One stderr line for --compile (rank 0), once the device is known."""
    if not getattr(args, "compile", False) or rank_and_world()[0] != 0:
        return
    if str(args.device).startswith("cuda"):
        effect = "on CUDA the engine captures its decode steps in CUDA graphs by itself (with the fused Triton kernels)"
    else:
        effect = (f"on {args.device} the engine runs its decode steps eagerly (on CUDA it captures CUDA graphs by "
                  f"itself)")
    print(f"{args.command_prog}: --compile has no effect: {effect}", file=sys.stderr)


def checkpoint_source(path_or_repo: str, filename=None) -> str:
    """A checkpoint source for settings records and manifests: the absolute local path, or the Hub repo id
    (+ file) as given."""
    import os

    from ..io.hub import is_repo_id

    source = path_or_repo if is_repo_id(path_or_repo) else os.path.abspath(path_or_repo)
    return source if filename is None else f"{source}/{filename}"


def load_vq(args):
    from ..encoders.vq import VQModel

    return VQModel.from_pretrained(args.vq, preset=args.vq_preset, device=args.device, filename=args.vq_filename)


def resolve_device(args) -> str:
    """--device -> a concrete device string (cuda -> cuda:LOCAL_RANK under torchrun); sets args.device."""
    args.device = str(resolve_device_spec(args.device))
    return args.device


def load_gpt(args):
    from ..decode.model import GPT

    resolve_device(args)
    note_compile(args)
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
    """The one GuidanceConfig of a command line: add_sampling_args' knobs (after load_gpt filled the model type's
    defaults), add_refine_args' mode and W2S scale and --cfg-interval where a command has them (collect has
    neither: CFG, as GuidanceConfig's defaults say), and the per-token `schedule` of load_refine."""
    return GuidanceConfig(mode=getattr(args, "mode", "cfg"), schedule=schedule, cfg_scale=args.cfg_scale,
                          cfg_interval=getattr(args, "cfg_interval", -1), w2s_scale=getattr(args, "w2s_scale", 1.0),
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def load_conditions(args, gpt):
    """-> (conditions, caption_mask or None, names or None) from --classes or --captions/--t5."""
    from ..core2.collect import parse_class_ids

    c = gpt.config
    if c.model_type == "c2i":
        if args.captions is not None or args.classes is None:
            raise InvalidArgument("a class-conditional GPT needs --classes (e.g. '0-999'), not --captions")
        return torch.tensor(parse_class_ids(args.classes, c.num_classes)), None, None
    if args.captions is None or args.t5 is None:
        raise InvalidArgument("a text-conditional GPT needs --captions FILE and --t5 DIR|google/flan-t5-xl")
    from ..encoders.text import CaptionEncoder, encode_in_batches

    try:
        with open(args.captions, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise InvalidArgument(f"--captions {args.captions} is not a UTF-8 text file") from None
    if not names:
        raise InvalidArgument(f"--captions {args.captions} holds no captions")
    encoder = CaptionEncoder.from_pretrained(args.t5, device=args.device, dtype=torch.bfloat16
                                             if str(args.device).startswith("cuda") else None)
    features, masks = encode_in_batches(encoder, names)
    del encoder
    return features, masks, names


def load_refine(args, gpt):
    """-> (weak model or None, per-token schedule or None) from add_refine_args' options."""
    from ..core2.sample import build_schedule
    from ..core2.weak_model import WeakModel

    weak = None
    if args.weak is not None:
        from ..io.hub import resolve

        weak_dir = resolve(args.weak, allow_patterns=("*.json", "*.safetensors"), what="--weak")
        weak = WeakModel.from_pretrained(weak_dir, gpt, device=args.device, dtype=DTYPES[args.dtype],
                                         require_same_weights=not args.allow_other_base_weights)
    schedule = build_schedule(gpt.config.num_image_tokens, mode=args.mode, slow_first=args.slow_first,
                              fast_first=args.fast_first, slow_first_tokens=args.slow_first_tokens,
                              fast_first_tokens=args.fast_first_tokens)
    return weak, schedule  # check_refine_args refused fast/slow without --weak before anything was loaded
