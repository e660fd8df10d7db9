"""Diffusion Collect: record (cond prediction, CFG prediction, step, prompt features) along CFG runs.

One sample = one (prompt, seed) trajectory of N steps, written to resumable shards
(llamagen_core2.io.shards) with tensors:
    cond [N, C, H, W], cfg [N, C, H, W]   predictions in image layout (FLUX unpacked), fp32
    step [N]                             step indices 0..N-1
    s [r, T], v [r], d [r, E], pooled [P] the prompt summary the noise model consumes (prompt_summary.py:
                                         the official recipe, the same inputs diffuse() gives a noise model)
The manifest records the pipeline kind, CFG scale, steps, size, negative prompt, SVD rank and the
summary recipe, so a resumed run with different settings is refused. torchrun: RANK / WORLD_SIZE split the
(prompt, seed) list; each rank writes its own shard files. Every argument is validated before the shard
directory is touched, and a trajectory holding NaN/inf is refused (ShardWriter.add), never written.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import InvalidArgument, check_int, check_number
from ..guidance.seeding import check_seed
from ..io.shards import ShardWriter
from .guided_denoiser import GuidanceSettings
from .layouts import pipeline_kind
from .prompt_summary import RECIPES, prompt_summary
from .runner import diffuse


def sample_id(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:07d}-s{seed}"


class _TrajectoryRecorder:
    def __init__(self):
        self.cond, self.cfg = [], []

    def __call__(self, i, cond, mixed, args, gd):
        layout = gd.layout
        self.cond.append(layout.to_image(cond, args).float().cpu())
        self.cfg.append(layout.to_image(mixed, args).float().cpu())


def collect_diffusion(pipe, prompts: Sequence[str], out_dir, *, seeds: Sequence[int] = (0,),
                      cfg_scale: float = 5.0, num_inference_steps: int = 50, batch_size: int = 1,
                      negative_prompt: str = "", svd_rank: int = 64, samples_per_shard: int = 16,
                      rank: Optional[int] = None, world_size: Optional[int] = None, flux_guidance: float = 3.5,
                      progress: bool = True, **pipeline_kwargs) -> int:
    """Run CFG over this rank's pending (prompt, seed) pairs; returns how many trajectories it wrote."""
    try:
        check_number("cfg_scale", cfg_scale, above=1.0)
    except InvalidArgument:
        raise InvalidArgument(f"cfg_scale must be > 1 (and finite) to collect CFG targets, got {cfg_scale!r}") from None
    for name, value in (("batch_size", batch_size), ("num_inference_steps", num_inference_steps),
                        ("svd_rank", svd_rank), ("samples_per_shard", samples_per_shard)):
        check_int(name, value, minimum=1)
    check_number("flux_guidance", flux_guidance, minimum=0.0)
    seeds = list(seeds)
    if not seeds:
        raise InvalidArgument("seeds must list at least one seed")
    seeds = [check_seed(seed) for seed in seeds]
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgument("prompts must be a non-empty list of strings")
    kind = pipeline_kind(pipe)
    meta = {"kind": kind, "cfg_scale": float(cfg_scale), "num_inference_steps": num_inference_steps,
            "negative_prompt": negative_prompt, "svd_rank": svd_rank, "flux_guidance": float(flux_guidance),
            "height": pipeline_kwargs.get("height"), "width": pipeline_kwargs.get("width"),
            "max_sequence_length": pipeline_kwargs.get("max_sequence_length"),
            "prompt_summary": RECIPES[kind].describe()}
    work = {sample_id(p, s): (p, s) for p in range(len(prompts)) for s in seeds}
    written = 0
    with ShardWriter(out_dir, meta, rank=rank, world_size=world_size, samples_per_shard=samples_per_shard) as writer:
        todo = writer.my_work(list(work))
        batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"collect rank {writer.rank}", unit="batch")
        for batch in batches:
            rec = _TrajectoryRecorder()
            batch_prompts = [prompts[work[sid][0]] for sid in batch]
            s, v, d, pooled = (t.cpu() for t in prompt_summary(pipe, batch_prompts, svd_rank))
            diffuse(pipe, batch_prompts, negative_prompt=negative_prompt,
                    settings=GuidanceSettings(mode="cfg", cfg_scale=cfg_scale),
                    num_inference_steps=num_inference_steps, recorder=rec, flux_guidance=flux_guidance,
                    generator=[torch.Generator(device="cpu").manual_seed(work[sid][1]) for sid in batch],
                    output_type="latent", **pipeline_kwargs)
            cond, cfg = torch.stack(rec.cond, 1), torch.stack(rec.cfg, 1)   # [B, N, C, H, W]
            for b, sid in enumerate(batch):
                writer.add(sid, {"cond": cond[b], "cfg": cfg[b], "step": torch.arange(cond.shape[1]),
                                 "s": s[b], "v": v[b], "d": d[b], "pooled": pooled[b]})
                written += 1
    return written
