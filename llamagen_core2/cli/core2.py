"""CLI subcommands for CoRe^2: `collect`, `reflect`, `sample` (wired into `llamagen-core2` by commands.py).

Each `add_*_subcommand(subparsers)` registers one subcommand: `args.func(args)` runs it and returns exit status 0,
`args.run(args)` runs it and returns its result dict; `add_subcommand(subparsers)` (alias `add_subcommands`)
registers all three. `python -m llamagen_core2.cli.core2 ...` runs them standalone (`main` returns the result
dict). Under torchrun the RANK / WORLD_SIZE environment variables split the work.

    llamagen-core2 collect --gpt c2i_B_256.pt --classes 0-999 --per-class 10 --cfg-scale 4 --out shards/
    llamagen-core2 reflect --gpt c2i_B_256.pt --shards shards/ --out weak/ --weak-preset W-2 --steps 4000
    llamagen-core2 sample --gpt c2i_B_256.pt --vq vq_ds16_c2i.pt --weak weak/ --mode fast --per-class 50 --out s/
    llamagen-core2 sample ... --mode slow --w2s-scale 1.5 --slow-first 0.25     # slow 25% of tokens, then fast
"""
from __future__ import annotations

import torch

from ..errors import rank_and_world
from ..guidance.config import GuidanceConfig
from ..io.files import check_output_dir
from .args import (Parser, add_compile_arg, add_condition_args, add_decoding_args, add_model_args, add_refine_args,
                   add_sampling_args, add_vq_args, check_refine_args, float_in, non_negative_float, non_negative_int,
                   positive_int, seed_int)
from .loading import checkpoint_source, guidance_from_args, load_conditions, load_gpt, load_refine, load_vq
from .runner import apply_threads, print_json, run_subcommand


# ---------------------------------------------------------------------- collect
def run_collect(args) -> dict:
    from ..core2.collect import collect, describe_storage

    check_output_dir(args.out)
    gpt = load_gpt(args)
    conds, mask, names = load_conditions(args, gpt)
    total = len(conds) * args.per_class
    if rank_and_world()[0] == 0:
        print(describe_storage(gpt.config, args.store_dtype, total, args.num_tokens))
    summary = collect(gpt, conds, args.out, caption_mask=mask, condition_names=names, per_condition=args.per_class,
                      batch_size=args.batch_size, guidance=guidance_from_args(args), seed=args.seed,
                      num_tokens=args.num_tokens, store_dtype=args.store_dtype, groups_per_shard=args.groups_per_shard,
                      base_checkpoint=checkpoint_source(args.gpt, args.gpt_filename), progress=not args.quiet)
    print_json(summary)
    return summary


def add_collect_subcommand(subparsers):
    p = subparsers.add_parser("collect", help="CoRe^2 Collect: store CFG trajectories of the base model as shards",
                              description="Run CFG sampling with the base model and store, per token, its cond and "
                                          "uncond final hidden states (+ tokens, conditions) as resumable "
                                          "safetensors shards. Rerun the same command to resume.")
    add_model_args(p)
    add_condition_args(p, seed_help="batch g of the run samples with seed (seed * 1000003 + g) mod 2^63 (its images "
                                    "by the pipeline's per-image rule), so the shards depend on --batch-size, which "
                                    "the manifest records; not on the number of processes")
    add_sampling_args(p, cfg_default=4.0, cfg_above=1.0)  # no guidance to learn at a scale <= 1
    p.add_argument("--out", required=True, help="shard directory (created; resumed if it exists)")
    p.add_argument("--num-tokens", type=positive_int, default=None, help="tokens per image (default: all)")
    p.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the stored hidden states")
    p.add_argument("--groups-per-shard", type=positive_int, default=1, help="batches per shard file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_arg(p)
    p.set_defaults(func=_exit_status(run_collect), run=run_collect)
    return p


# ---------------------------------------------------------------------- reflect
def run_reflect(args) -> dict:
    from ..core2.reflect import reflect

    check_output_dir(args.out)
    gpt = load_gpt(args)
    overrides = {k: v for k, v in (("dim", args.weak_dim), ("n_layer", args.weak_layers), ("n_head", args.weak_heads))
                 if v is not None}
    guidance = None if args.cfg_scale is None else GuidanceConfig(cfg_scale=args.cfg_scale)  # None: the collected
    result = reflect(gpt, args.shards, args.out, preset=args.weak_preset, weak_overrides=overrides,
                     guidance=guidance, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     warmup=args.warmup, weight_decay=args.weight_decay, mse_weight=args.mse_weight,
                     holdout=args.holdout, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                     seed=args.seed, resume=not args.no_resume, progress=not args.quiet)
    if result:
        h = result["heldout"]
        ratio = "n/a" if h["kl_ratio"] is None else f"{h['kl_ratio']:.3f}"
        print(f"held-out KL(cfg || weak) = {h['kl']:.4f}   baseline KL(cfg || cond) = {h['baseline_kl']:.4f}   "
              f"ratio = {ratio}   (MSE {h['mse']:.4f} vs {h['baseline_mse']:.4f})")
        print_json(result)
    return result


def add_reflect_subcommand(subparsers):
    from ..core2.weak_model import WEAK_PRESETS

    p = subparsers.add_parser("reflect", help="CoRe^2 Reflect: train the weak model on collected shards",
                              description="Train a weak model to predict the base model's CFG distribution from "
                                          "its conditional output. Writes the weak model (safetensors + "
                                          "config.json), eval.json, train_log.jsonl and resumable checkpoints.")
    add_model_args(p)
    p.add_argument("--shards", required=True, help="directory written by `collect`")
    p.add_argument("--out", required=True, help="output directory for the weak model")
    p.add_argument("--weak-preset", default="W-2", choices=sorted(WEAK_PRESETS), help="weak-model trunk shape")
    p.add_argument("--weak-dim", type=positive_int, default=None, help="override the preset's width")
    p.add_argument("--weak-layers", type=positive_int, default=None, help="override the preset's layer count")
    p.add_argument("--weak-heads", type=positive_int, default=None, help="override the preset's head count")
    p.add_argument("--cfg-scale", type=float_in(above=1.0), default=None,
                   help="CFG scale to learn (default: the collected one)")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per step per process")
    p.add_argument("--lr", type=float_in(above=0.0, maximum=1.0), default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--mse-weight", type=non_negative_float, default=0.0, help="weight of the hidden-space MSE term")
    p.add_argument("--holdout", type=float_in(above=0.0, below=1.0), default=0.05,
                   help="held-out fraction of the collected images (exact: floor(M * holdout) images)")
    p.add_argument("--eval-every", type=positive_int, default=500, help="steps between held-out evaluations")
    p.add_argument("--checkpoint-every", type=positive_int, default=500, help="steps between checkpoints")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if checkpoints exist (also allows other settings in the same --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_exit_status(run_reflect), run=run_reflect)
    return p


# ---------------------------------------------------------------------- sample
def run_sample(args) -> dict:
    from ..core2.sample import sample_images

    check_output_dir(args.out)
    check_refine_args(args)
    gpt = load_gpt(args)
    conds, mask, names = load_conditions(args, gpt)
    vq = load_vq(args)
    weak, schedule = load_refine(args, gpt)
    distributed = rank_and_world()[1] > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if str(args.device).startswith("cuda") else "gloo")
    result = sample_images(gpt, vq, conds, args.out, caption_mask=mask, condition_names=names,
                           per_condition=args.per_class, batch_size=args.batch_size,
                           guidance=guidance_from_args(args, schedule), weak_model=weak,
                           weak_path=None if args.weak is None else checkpoint_source(args.weak), seed=args.seed,
                           progress=not args.quiet, decoding=args.decoding, jacobi_window=args.jacobi_window)
    print_json(result)
    return result


def add_sample_subcommand(subparsers):
    p = subparsers.add_parser("sample", help="many images for evaluation (PNG + .npz), any guidance mode/schedule",
                              description="Generate N images per class/caption with mode cond/cfg/fast/slow or a "
                                          "slow/fast schedule, as PNG files plus samples.npz (arr_0 uint8). "
                                          "Resumable; split across torchrun ranks.")
    add_model_args(p)
    add_condition_args(p)
    add_sampling_args(p, cfg_default=4.0)
    add_vq_args(p)
    p.add_argument("--out", required=True, help="output directory: images/*.png, samples.npz, settings.json")
    add_refine_args(p)
    add_decoding_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_arg(p)
    p.set_defaults(func=_exit_status(run_sample), run=run_sample)
    return p


def _exit_status(run):
    """commands.main expects an int exit status from `func`; `run` (returning the result dict) stays for Python
    callers."""
    def func(args) -> int:
        run(args)
        return 0
    return func


def add_subcommands(subparsers) -> None:
    add_collect_subcommand(subparsers)
    add_reflect_subcommand(subparsers)
    add_sample_subcommand(subparsers)


add_subcommand = add_subcommands  # the name commands.py looks for in every subcommand module


def main(argv=None):
    """Standalone entry (torchrun -m llamagen_core2.cli.core2 ...): returns the result dict; a user error is
    one line and SystemExit(2), with the same error families as `llamagen-core2` (errors.user_error_message)."""
    parser = Parser(prog="python -m llamagen_core2.cli.core2")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    apply_threads(args)
    status, result = run_subcommand(f"{parser.prog} {args.command}", args, args.run)
    if status:
        raise SystemExit(status)
    return result


if __name__ == "__main__":
    main()
