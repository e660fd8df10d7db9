"""The diffusion adapter's subcommands: `diffuse`, `diffuse-collect`, `diffuse-reflect` (registered by commands.py).

    llamagen-core2 diffuse --pipeline sdxl|sd3|flux --model DIR|ORG/REPO --mode cfg|fast|slow|zigzag|z-core2 \
        --prompt "..." [--noise-model PATH --noise-model-preset sdxl|sd35] --steps 50 --out DIR
writes one PNG per image to --out and prints a final JSON line (rows per image = the NFE).
`--model` is a local diffusers pipeline directory or a Hub repo id (diffusers fetches it into the HF cache;
HF_HUB_OFFLINE=1 reads the cache only, see io/hub.py); `--model tiny` builds a tiny random pipeline (smoke tests only;
images are noise). `--device` follows the package's one rule (llamagen_core2/device.py: cuda -> cuda:LOCAL_RANK
under torchrun), every numeric option is validated while parsing (args.py's types), and --out is checked before
any work.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from ..device import resolve_device
from ..diffusion.modes import DIFFUSION_MODES, MODES
from ..errors import InvalidArgument, NonFiniteError
from ..io.files import check_output_dir
from ..optional import require
from .args import (add_device_arg, add_threads_arg, float_in, non_negative_float, non_negative_int, positive_int,
                   seed_int)
from .runner import print_json

logger = logging.getLogger(__name__)
PIPELINES = ("sdxl", "sd3", "flux")
DTYPES = ("float32", "bfloat16", "float16")
# CoRe^2 official defaults (SDXL demo: cfg 5.5, w2s 2.5; SD3.5: cfg 3.5, w2s 1.5)
DEFAULT_CFG = {"sdxl": 5.5, "sd3": 3.5, "flux": 3.5}
DEFAULT_W2S = {"sdxl": 2.5, "sd3": 1.5, "flux": 1.5}


def _device_dtype(args):
    import torch

    return resolve_device(args.device), getattr(torch, args.dtype)


def load_pipeline(kind: str, model: str, device, dtype, *, ddim: bool = False):
    """diffusers pipeline of `kind` from a local directory, a Hub repo id (or `tiny`); DDIM on request (SDXL
    zigzag)."""
    if kind not in PIPELINES:
        raise InvalidArgument(f"--pipeline must be one of {PIPELINES}, got {kind!r}")
    if model == "tiny":
        from ..diffusion.tiny import TINY

        pipe = TINY[kind]().to(dtype=dtype)
    else:
        from ..io import hub

        local = Path(model).expanduser().is_dir()
        if not local and not hub.is_repo_id(model):
            raise InvalidArgument(f"--model must be a local diffusers pipeline directory or a Hub repo id "
                                  f"'org/repo', got {model!r}")
        diffusers = require("diffusers", "diffuse --model")
        cls = {"sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
               "flux": diffusers.FluxPipeline}[kind]
        options = {} if local else hub.pretrained_kwargs()
        try:
            pipe = cls.from_pretrained(model, torch_dtype=dtype, **options)
        except OSError as e:  # diffusers / huggingface_hub: not cached while offline, unknown repo, missing files
            if local:
                raise
            raise hub.hub_error(model, "--model", e, cache=Path(options["cache_dir"]),
                                local_files_only=options["local_files_only"]) from None
    if ddim and kind == "sdxl":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        logger.info("diffuse: SDXL zigzag modes use DDIMScheduler (as the official CoRe^2 code)")
    return pipe.to(device)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise InvalidArgument(f"--prompts-file not found: {path}")
        try:
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise InvalidArgument(f"--prompts-file {path} is not a UTF-8 text file") from None
    if not prompts:
        raise InvalidArgument("give at least one --prompt or a --prompts-file")
    return prompts


def _pipeline_extra(args) -> dict:
    extra = {}
    if args.height:
        extra["height"] = args.height
    if args.width:
        extra["width"] = args.width
    if args.max_sequence_length:
        extra["max_sequence_length"] = args.max_sequence_length
    return extra


def _log_progress(args) -> None:
    """Library progress lines (logging.INFO of llamagen_core2.*) reach stderr unless --quiet."""
    if not args.quiet:
        logging.getLogger("llamagen_core2").setLevel(logging.INFO)


def cmd_diffuse(args) -> int:
    import torch

    from ..diffusion.guided_denoiser import GuidanceSettings
    from ..diffusion.noise_model_io import load_noise_model
    from ..diffusion.runner import diffuse
    from ..io.images import save_png

    check_output_dir(args.out)
    _log_progress(args)
    prompts = _prompts(args)
    settings = GuidanceSettings(
        mode=args.mode, cfg_scale=DEFAULT_CFG[args.pipeline] if args.cfg_scale is None else args.cfg_scale,
        w2s_scale=DEFAULT_W2S[args.pipeline] if args.w2s_scale is None else args.w2s_scale,
        end_timesteps=args.end_timesteps, inv_cfg=args.inv_cfg, zigzag_steps=args.zigzag_steps)
    settings.validate(args.noise_model is not None)  # refused before the pipeline is loaded or --out is made
    device, dtype = _device_dtype(args)
    pipe = load_pipeline(args.pipeline, args.model, device, dtype, ddim=DIFFUSION_MODES[args.mode].zigzag)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    noise_model = None
    if args.noise_model:
        noise_model = load_noise_model(args.noise_model, preset=args.noise_model_preset, dtype=dtype, device=device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [prompts[k:k + args.batch_size] for k in range(0, len(prompts), args.batch_size)]
    if not args.quiet:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"diffuse {args.pipeline} {args.mode}", unit="batch")
    start, rows, count = time.perf_counter(), 0.0, 0
    for b, batch in enumerate(batches):
        gens = [torch.Generator(device="cpu").manual_seed(args.seed + count + k) for k in range(len(batch))]
        res = diffuse(pipe, batch, settings=settings, noise_model=noise_model, num_inference_steps=args.steps,
                      negative_prompt=args.negative_prompt, generator=gens, flux_guidance=args.flux_guidance,
                      output_type="np", **_pipeline_extra(args))
        images = np.asarray(res.images)  # [b, H, W, 3] in [0, 1]: checked before it becomes pixels
        if not np.isfinite(images).all():
            raise NonFiniteError(f"batch {b} produced NaN/inf images (check the noise model, the dtype "
                                 f"and the scales); nothing of it was written")
        for image in (images * 255).round().clip(0, 255).astype(np.uint8):  # diffusers' numpy_to_pil rounding
            save_png(image, out / f"{count:05d}.png")
            count += 1
        rows = res.rows_per_image
    seconds = time.perf_counter() - start
    print_json({"pipeline": args.pipeline, "mode": args.mode, "images": count, "steps": args.steps,
                "denoiser_rows_per_image": rows, "seconds": round(seconds, 3), "out": str(out)}, every_rank=True)
    return 0


def cmd_collect(args) -> int:
    from ..diffusion.collect import collect_diffusion

    check_output_dir(args.out)
    prompts = _prompts(args)
    try:
        seeds = [seed_int(s) for s in args.seeds.split(",") if s.strip()]
    except argparse.ArgumentTypeError:
        raise InvalidArgument(f"--seeds must be integers in [0, 2**63 - 1] like '0,1,2', got {args.seeds!r}") from None
    if not seeds:
        raise InvalidArgument(f"--seeds must list at least one seed like '0,1,2', got {args.seeds!r}")
    device, dtype = _device_dtype(args)
    pipe = load_pipeline(args.pipeline, args.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    n = collect_diffusion(pipe, prompts, args.out, seeds=seeds, cfg_scale=args.cfg_scale,
                          num_inference_steps=args.steps, batch_size=args.batch_size,
                          negative_prompt=args.negative_prompt or "", svd_rank=args.svd_rank,
                          flux_guidance=args.flux_guidance, progress=not args.quiet, **_pipeline_extra(args))
    print_json({"collected": n, "out": args.out}, every_rank=True)
    return 0


def cmd_reflect(args) -> int:
    from ..diffusion.noise_model import noise_model_preset
    from ..diffusion.noise_model_io import save_noise_model
    from ..diffusion.reflect import config_for_shards, load_trajectories, train_noise_model

    check_output_dir(args.out)
    _log_progress(args)
    meta, _, data = load_trajectories(args.shards)
    overrides = {k: v for k, v in (("num_layers", args.layers), ("num_experts", args.experts),
                                   ("lora_rank", args.lora_rank)) if v is not None}
    if args.preset:
        config = noise_model_preset(args.preset, add_cond_residual=True, **overrides)
    else:
        config = config_for_shards(meta, data, **overrides)
    model, report = train_noise_model(args.shards, config, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                                      holdout=args.holdout, seed=args.seed, log_every=0 if args.quiet else 50)
    save_noise_model(model, args.out)
    print_json({"out": args.out, **report.__dict__}, every_rank=True)
    return 0


def _common(p: argparse.ArgumentParser, *, collect: bool) -> None:
    p.add_argument("--pipeline", required=True, choices=PIPELINES, help="diffusers pipeline family")
    p.add_argument("--model", required=True,
                   help="local diffusers pipeline directory, a Hub repo id (HF cache), or `tiny` (smoke test)")
    p.add_argument("--prompt", action="append", help="repeatable")
    p.add_argument("--prompts-file", default=None, help="one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="one negative prompt for every image (default: empty)")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps")
    p.add_argument("--cfg-scale", type=float_in(above=1.0) if collect else non_negative_float,
                   default=5.5 if collect else None,
                   help="CFG scale" + ("" if collect else " (default: 5.5 sdxl, 3.5 sd3/flux)"))
    p.add_argument("--flux-guidance", type=non_negative_float, default=3.5,
                   help="FLUX-dev distilled guidance embedding")
    p.add_argument("--height", type=positive_int, default=None, help="default: the pipeline's")
    p.add_argument("--width", type=positive_int, default=None, help="default: the pipeline's")
    p.add_argument("--max-sequence-length", type=positive_int, default=None,
                   help="T5 tokens of the pipeline's encoding (SD3 default 256, FLUX 512); the noise model's "
                        "prompt summary uses its own fixed length (docs/diffusion.md)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="prompts per pipeline call")
    add_device_arg(p)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="pipeline dtype")
    add_threads_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_subcommand(subparsers) -> None:
    d = subparsers.add_parser("diffuse", help="SDXL / SD3 / FLUX with cfg, CoRe^2 fast/slow, zigzag, z-core2")
    _common(d, collect=False)
    d.add_argument("--mode", default="cfg", choices=MODES, help="guidance mode")
    d.add_argument("--w2s-scale", type=non_negative_float, default=None,
                   help="CoRe^2 weak-to-strong scale (slow steps; default: 2.5 sdxl, 1.5 sd3/flux)")
    d.add_argument("--end-timesteps", type=non_negative_int, default=None,
                   help="slow/z-core2: slow for steps < N, fast after")
    d.add_argument("--inv-cfg", type=non_negative_float, default=1.0,
                   help="zigzag inversion guidance (<= 1: cond only)")
    d.add_argument("--zigzag-steps", type=non_negative_int, default=None,
                   help="zigzag at the first N steps (default all but last)")
    d.add_argument("--noise-model", default=None, help="released .pth or a diffuse-reflect output directory")
    d.add_argument("--noise-model-preset", default=None, choices=("sd35", "sdxl"),
                   help="architecture of a released .pth noise model")
    d.add_argument("--seed", type=seed_int, default=0, help="image k uses seed + k")
    d.add_argument("--out", default="diffuse_out", help="output directory for the PNGs")
    d.set_defaults(func=cmd_diffuse)

    c = subparsers.add_parser("diffuse-collect", help="record cond/CFG predictions along CFG runs into shards")
    _common(c, collect=True)
    c.add_argument("--seeds", default="0", help="comma-separated seeds per prompt")
    c.add_argument("--svd-rank", type=positive_int, default=64, help="rank of the prompt-embedding summary")
    c.add_argument("--out", required=True, help="shard directory (resumable; RANK/WORLD_SIZE split the work)")
    c.set_defaults(func=cmd_collect)

    r = subparsers.add_parser("diffuse-reflect", help="train a MoE-LoRA noise model on diffuse-collect shards")
    r.add_argument("--shards", required=True, help="directory written by diffuse-collect")
    r.add_argument("--out", required=True, help="output directory for the noise model")
    r.add_argument("--preset", default=None, choices=("sd35", "sdxl"), help="full official architecture")
    r.add_argument("--layers", type=positive_int, default=None, help="default: a small model sized to the shards")
    r.add_argument("--experts", type=positive_int, default=None, help="MoE-LoRA experts (default: min(steps, 8))")
    r.add_argument("--lora-rank", type=positive_int, default=None, help="MoE-LoRA rank (default: 4)")
    r.add_argument("--iters", type=positive_int, default=500, help="training iterations")
    r.add_argument("--batch-size", type=positive_int, default=8, help="trajectories per iteration")
    r.add_argument("--lr", type=float_in(above=0.0, maximum=1.0), default=1e-3, help="AdamW learning rate")
    r.add_argument("--holdout", type=float_in(0.0, below=1.0), default=0.1, help="held-out fraction of trajectories")
    r.add_argument("--seed", type=seed_int, default=0, help="random seed (split and batches)")
    add_threads_arg(r)
    r.add_argument("--quiet", action="store_true", help="no per-iteration log")
    r.set_defaults(func=cmd_reflect)
