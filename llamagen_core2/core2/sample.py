"""Evaluation sampling (CoRe^2 Refine at scale): N images per condition as PNG files + one `.npz` batch.

Contract:
  * Work = `len(conditions) x per_condition` images in condition-major order, cut into groups of `batch_size`;
    each group is one `LlamaGenPipeline` call with the `guidance` (a `GuidanceConfig`, default `SAMPLE_GUIDANCE`:
    cfg 4.0, full vocabulary) and any mode / schedule of `generate()` (cond, cfg, fast, slow, slow-first-then-fast
    and the reverse); its knobs are numbers (settings.json records them). Image n of the run uses the Philox key
    `seeding.image_key(seed, n)` (the pipeline's seed rule), so an image does not depend on batch_size, the number of ranks or resuming.
  * Files: `images/{index:06d}.png` (atomic writes) and, once every image exists, `samples.npz` with `arr_0`
    [M, H, W, 3] uint8 (the layout of the ADM / LlamaGen FID evaluator) and `labels` (class id per image, or
    caption index for t2i).
    `settings.json` records the run's settings; rerunning with other settings in the same directory is refused
    (naming each difference) once it holds an image (io/run_settings.py, the rule `generate` and `collect` share);
    every argument is validated before anything is written.
  * Resume: a group whose PNGs all exist is skipped, so a killed run loses at most the groups in flight. The
    decoding (sequential or Jacobi, which returns the same tokens) is not a setting: a run resumes with either.
  * torchrun: RANK / WORLD_SIZE give rank r the groups g with g % WORLD_SIZE == r; with a process group
    initialised (gloo/nccl), ranks meet at a barrier and rank 0 writes the npz.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..decode.jacobi import DEFAULT_WINDOW, check_decoding
from ..errors import InvalidArgument, check_int, rank_and_world
from ..guidance.config import GuidanceConfig, Schedule, check_mode, require_weak
from ..guidance.seeding import check_seed
from ..io.files import atomic_write
from ..io.images import save_png
from ..io.run_settings import check_run_settings
from ..pipeline import LlamaGenPipeline
from .collect import check_conditions

logger = logging.getLogger(__name__)
SEED_RULE = "image n uses seeding.image_key(seed, n)"
SAMPLE_GUIDANCE = GuidanceConfig(cfg_scale=4.0, top_k=0)  # FID-style sampling: CFG 4, the full vocabulary


def build_schedule(num_tokens: int, *, mode: str = "cfg", slow_first: Optional[float] = None,
                   fast_first: Optional[float] = None, slow_first_tokens: Optional[int] = None,
                   fast_first_tokens: Optional[int] = None) -> Optional[list[str]]:
    """None (one mode for all tokens) or a per-token schedule: slow then fast, or fast then slow.

    slow_first=0.25 means slow for the first 25% of the tokens (rounded) then fast; fast_first is the reverse.
    """
    given = [(k, v) for k, v in (("slow_first", slow_first), ("fast_first", fast_first),
                                 ("slow_first_tokens", slow_first_tokens), ("fast_first_tokens", fast_first_tokens))
             if v is not None]
    check_mode(mode)
    if not given:
        return None
    if len(given) > 1:
        raise InvalidArgument(f"give at most one of --slow-first/--fast-first(-tokens), got {[k for k, _ in given]}")
    name, value = given[0]
    first, then = ("slow", "fast") if name.startswith("slow") else ("fast", "slow")
    if name.endswith("tokens"):
        return Schedule(first, then, first_tokens=value).modes(num_tokens)
    return Schedule(first, then, first_fraction=value).modes(num_tokens)


def pending_batches(paths: Sequence[Path], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """The resume rule of `sample` and `generate`: image indices 0..len(paths)-1 in batches of `batch_size`, this
    rank's (batch g belongs to rank g % world_size), without the batches whose PNGs an earlier run wrote."""
    total = len(paths)
    batches = [list(range(start, min(start + batch_size, total))) for start in range(0, total, batch_size)]
    return [index for g, index in enumerate(batches)
            if g % world_size == rank and not all(paths[n].is_file() for n in index)]


def batch_condition(gpt, conds: torch.Tensor, caption_mask: Optional[torch.Tensor], index: Sequence[int],
                    per_condition: int) -> dict:
    """The pipeline's condition arguments for images `index`, condition-major (image n is of condition
    n // per_condition): class labels, or caption features with their mask."""
    rows = torch.as_tensor(index) // per_condition
    if gpt.config.model_type == "c2i":
        return dict(class_labels=conds[rows])
    return dict(prompt_embeds=conds[rows], prompt_attention_mask=None if caption_mask is None else caption_mask[rows])


def _atomic_savez(path: Path, **arrays) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
            np.savez(f, **arrays)

    atomic_write(path, write)


def sample_images(
    gpt,
    vq,
    conditions,
    out_dir,
    *,
    caption_mask: Optional[torch.Tensor] = None,
    condition_names: Optional[Sequence[str]] = None,
    per_condition: int = 1,
    batch_size: int = 16,
    guidance: Optional[GuidanceConfig] = None,
    weak_model=None,
    weak_path: Optional[str] = None,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    progress: bool = True,
    decoding: str = "sequential",
    jacobi_window: int = DEFAULT_WINDOW,
) -> dict:
    """Generate and save images; returns {"images_written", "groups_run", "npz", "seconds", "base_rows", ...}.

    `decoding` / `jacobi_window` choose how the tokens are decoded, not which: Jacobi decoding returns the
    sequential tokens (docs/decoding.md), so they are not settings and a run resumes with either."""
    c = gpt.config
    for name, value in (("per_condition", per_condition), ("batch_size", batch_size)):
        check_int(name, value, minimum=1)
    guidance = SAMPLE_GUIDANCE if guidance is None else guidance
    if not isinstance(guidance, GuidanceConfig):
        raise InvalidArgument(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
    tensors = [f.name for f in dataclasses.fields(guidance) if isinstance(getattr(guidance, f.name), torch.Tensor)]
    if tensors:
        raise InvalidArgument(f"sample records its settings in settings.json: {tensors} must be numbers, not "
                              f"per-row tensors")
    require_weak(guidance.token_modes(c.num_image_tokens), weak_model)
    check_seed(seed)
    check_decoding(decoding, jacobi_window)
    rank, world_size = rank_and_world(rank, world_size)
    pipe = LlamaGenPipeline(gpt, vq, weak_model=weak_model, guidance=guidance)
    M, pick = check_conditions(gpt, conditions, caption_mask)
    conds, caption_mask = pick(torch.arange(M))
    if c.model_type == "c2i":
        cond_meta = conds.tolist()
    else:
        cond_meta = list(condition_names) if condition_names is not None else None
    total = M * per_condition
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    # Not the batch size: image n does not depend on it (the seed rule), so a rerun with another one resumes. Nor
    # the decoding: Jacobi decoding returns the sequential tokens.
    g = guidance
    schedule = g.schedule.modes(c.num_image_tokens) if isinstance(g.schedule, Schedule) else g.schedule
    settings = dict(conditions=cond_meta, num_conditions=M, per_condition=per_condition, mode=g.mode,
                    schedule=None if schedule is None else list(schedule), weak=weak_path,
                    cfg_scale=float(g.cfg_scale), w2s_scale=float(g.w2s_scale), temperature=float(g.temperature),
                    top_k=int(g.top_k), top_p=float(g.top_p), seed=int(seed), seed_rule=SEED_RULE, gpt=c.to_dict())
    if g.cfg_interval != -1:  # recorded only when set, so runs from before it was a setting still resume
        settings["cfg_interval"] = g.cfg_interval
    # Every rank checks before generating; rank 0 records the settings while no image exists yet.
    check_run_settings(out_dir / "settings.json", settings, has_results=any(image_dir.glob("*.png")),
                       write=rank == 0, results="samples")

    def png(i: int) -> Path:
        return image_dir / f"{i:06d}.png"

    mine = pending_batches([png(i) for i in range(total)], batch_size, rank, world_size)
    started, written, base_rows, forward_passes = time.perf_counter(), 0, 0, 0
    for index in tqdm(mine, desc=f"sample rank {rank}/{world_size}", disable=not progress, unit="batch"):
        out = pipe(**batch_condition(gpt, conds, caption_mask, index, per_condition), seed=seed,
                   first_image_index=index[0], output_type="np", progress=False, decoding=decoding,
                   jacobi_window=jacobi_window)
        base_rows += out.stats["base_rows"]
        forward_passes += out.stats["forward_passes"]
        for i, image in zip(index, out.images):
            save_png(image, png(i))
        written += len(index)
    seconds = time.perf_counter() - started

    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    npz = None
    if rank == 0:
        missing = [i for i in range(total) if not png(i).is_file()]
        if missing:
            logger.warning(f"{len(missing)} of {total} images are not written yet (other ranks still running?); "
                           f"rerun to write {out_dir / 'samples.npz'}")
        else:
            from PIL import Image

            arr = np.stack([np.asarray(Image.open(png(i)).convert("RGB")) for i in range(total)])
            npz = out_dir / "samples.npz"
            cond_index = torch.arange(total) // per_condition
            labels = conds[cond_index] if c.model_type == "c2i" else cond_index  # class ids, or caption index
            _atomic_savez(npz, arr_0=arr, labels=labels.numpy())
    return dict(images_written=written, groups_run=len(mine), total_images=total, npz=None if npz is None else str(npz),
                seconds=seconds, images_per_second=written / seconds if seconds > 0 and written else None,
                base_rows=base_rows, forward_passes=forward_passes)
