"""CoRe^2 Collect: run the base model with CFG and store, per image token, what Reflect trains on.

Contract (design: docs/design.md#collect):
  * Work = `len(conditions) x per_condition` images in a fixed global order (condition-major), cut into groups of
    `batch_size` consecutive images. Group g is sampled as one batch with seed `group_seed(seed, g)`, so a group's
    samples do not depend on how many processes run or where a run was interrupted.
  * Each group is one sample "g{g:06d}" of a `shards.ShardWriter` directory (atomic safetensors shards + a
    manifest whose `meta` records the base model, its weights fingerprint, the conditions, the CFG scale, seeds and
    sampling settings; resuming with other settings is refused). Stored tensors per group (b images, N tokens):
        hidden_cond   [b, N, d]  base final normed hidden state of the cond rows (store dtype, default fp16)
        hidden_uncond [b, N, d]  same for the uncond rows; CFG hidden = h_u + s (h_c - h_u), logits = W_out h
        tokens        [b, N]     sampled tokens (int64)
        sample_index  [b]        global image index; condition_index [b]
        labels [b] (c2i) | captions [b, T, C] (store dtype) + caption_mask [b, T] (t2i)
  * Guidance: a `GuidanceConfig` (default `COLLECT_GUIDANCE`: cfg 4.0, full vocabulary), CFG on every token
    (mode "cfg", no schedule, no cfg_interval) at a number cfg_scale > 1, with number knobs (the manifest records
    them); it was validated when it was built and is passed to generate() as it is.
  * Every argument (counts, guidance, seed, conditions, num_tokens) is validated before the shard
    directory is touched; a group whose stored hidden states are not finite (NaN/inf from the base model, or
    values beyond the store dtype's range) is refused (NonFiniteError), so no shard ever holds NaN.
  * Resume: rerunning the same command skips finished groups; a killed run loses at most its unflushed groups.
  * torchrun: RANK / WORLD_SIZE give each rank the groups g with g % WORLD_SIZE == RANK (disjoint).
  * Storage per image = 2 * N * d * itemsize(store dtype) + 8 N (+ caption features for t2i); `storage_per_image`.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..decode.engine import Engine
from ..decode.generate import generate
from ..decode.step import StepRecord
from ..errors import CheckpointError, InvalidArgument, check_all_finite, check_int, check_token_ids
from ..guidance.config import GuidanceConfig, cfg_is_cond
from ..guidance.seeding import check_seed
from ..io.shards import ShardReader, ShardWriter
from .weak_model import base_facts, check_base_facts, weights_fingerprint

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
COLLECT_KIND = "llamagen_core2.core2.collect"
COLLECT_GUIDANCE = GuidanceConfig(cfg_scale=4.0, top_k=0)  # Collect's defaults: CFG 4, the full vocabulary


def group_seed(seed: int, group: int) -> int:
    """Seed of group `group`: distinct per group, independent of rank count and batch order."""
    return (int(seed) * 1_000_003 + int(group)) % (2 ** 63)


def parse_class_ids(text: str, num_classes: int) -> list[int]:
    """'0-9,15,20' -> [0, ..., 9, 15, 20]; every id must be in [0, num_classes - 1]."""
    ids: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part), int(part))
        except ValueError:
            raise InvalidArgument(f"class ids must look like '0-9,15,20', got {text!r}") from None
        if lo > hi:
            raise InvalidArgument(f"class id range {part!r} is empty (write it low-high)")
        bad = [i for i in (lo, hi) if not 0 <= i < num_classes]
        if bad:  # checked before expanding, so '0-99999999999' never builds a huge list
            raise InvalidArgument(f"class ids must be in [0, {num_classes - 1}], got {bad}")
        ids.extend(range(lo, hi + 1))
    if not ids:
        raise InvalidArgument(f"no class ids in {text!r}")
    return ids


def storage_per_image(gpt_config, store_dtype: torch.dtype = torch.float16, num_tokens: Optional[int] = None) -> int:
    """Bytes one collected image occupies in the shards (tensor payload; safetensors headers are extra)."""
    N = gpt_config.num_image_tokens if num_tokens is None else check_int("num_tokens", num_tokens, minimum=1)
    item = torch.tensor([], dtype=store_dtype).element_size()
    size = 2 * N * gpt_config.dim * item + 8 * N + 16
    if gpt_config.model_type == "c2i":
        return size + 8
    return size + gpt_config.cls_token_num * (gpt_config.caption_dim * item + 1)


def check_collect_guidance(guidance) -> GuidanceConfig:
    """What Collect records: CFG on every token at a number scale > 1, with number knobs (the manifest's)."""
    if not isinstance(guidance, GuidanceConfig):
        raise InvalidArgument(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
    if guidance.mode != "cfg" or guidance.schedule is not None or guidance.cfg_interval != -1:
        raise InvalidArgument("Collect records CFG trajectories: guidance must be mode 'cfg' on every token (no "
                              f"schedule, cfg_interval -1), got mode {guidance.mode!r}, schedule "
                              f"{guidance.schedule!r}, cfg_interval {guidance.cfg_interval}")
    tensors = [name for name in ("cfg_scale", "temperature", "top_k", "top_p")
               if isinstance(getattr(guidance, name), torch.Tensor)]
    if tensors:
        raise InvalidArgument(f"Collect records its sampling settings in the manifest: {tensors} must be numbers, "
                              f"not per-row tensors")
    if cfg_is_cond(guidance.cfg_scale):
        raise InvalidArgument(f"cfg_scale must be > 1 and finite for Collect (there is no guidance to learn "
                              f"otherwise), got {guidance.cfg_scale!r}")
    return guidance


def check_conditions(gpt, conditions, caption_mask):
    """-> (number of conditions, a function taking an index tensor and returning (cond, mask))."""
    c = gpt.config
    if c.model_type == "c2i":
        labels = torch.as_tensor(list(conditions) if not isinstance(conditions, torch.Tensor) else conditions)
        if labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
            raise InvalidArgument("conditions for a class-conditional base must be a list of class ids")
        gpt.check_condition(labels.long())
        return len(labels), lambda idx: (labels.long()[idx], None)
    feats = conditions
    if not isinstance(feats, torch.Tensor) or feats.ndim != 3:
        raise InvalidArgument("conditions for a text-conditional base must be caption features [M, T, C]")
    gpt.check_condition(feats)
    if caption_mask is None or tuple(caption_mask.shape) != tuple(feats.shape[:2]):
        raise InvalidArgument(f"caption_mask [M={feats.shape[0]}, T={feats.shape[1]}] is required for t2i conditions")
    return len(feats), lambda idx: (feats[idx], caption_mask[idx].bool())


def collect(
    gpt,
    conditions,
    out_dir,
    *,
    caption_mask: Optional[torch.Tensor] = None,
    condition_names: Optional[Sequence[str]] = None,
    per_condition: int = 1,
    batch_size: int = 16,
    guidance: Optional[GuidanceConfig] = None,
    seed: int = 0,
    num_tokens: Optional[int] = None,
    store_dtype: str = "float16",
    groups_per_shard: int = 1,
    base_checkpoint: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    progress: bool = True,
    on_group: Optional[Callable[[int], None]] = None,
) -> dict:
    """Collect CFG trajectories of `gpt` into `out_dir`; returns a summary dict (groups done, bytes per image...).

    conditions: class ids (c2i) or caption features [M, T, C] with `caption_mask` [M, T] (t2i).
    guidance: the CFG settings of the trajectories (default COLLECT_GUIDANCE; see the module doc).
    """
    if store_dtype not in STORE_DTYPES:
        raise InvalidArgument(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    for name, value in (("per_condition", per_condition), ("batch_size", batch_size),
                        ("groups_per_shard", groups_per_shard)):
        check_int(name, value, minimum=1)
    guidance = check_collect_guidance(COLLECT_GUIDANCE if guidance is None else guidance)
    check_seed(seed)
    M, pick = check_conditions(gpt, conditions, caption_mask)
    c = gpt.config
    N = c.num_image_tokens if num_tokens is None else check_int("num_tokens", num_tokens, minimum=1,
                                                                maximum=c.num_image_tokens)
    dtype = STORE_DTYPES[store_dtype]
    total = M * per_condition
    num_groups = math.ceil(total / batch_size)
    fingerprint = weights_fingerprint(gpt)
    if c.model_type == "c2i":
        cond_meta = [int(x) for x in pick(torch.arange(M))[0].tolist()]
    else:
        cond_meta = list(condition_names) if condition_names is not None else None
    meta = dict(kind=COLLECT_KIND, base=base_facts(c), base_fingerprint=fingerprint,
                base_checkpoint=None if base_checkpoint is None else str(base_checkpoint),
                conditions=cond_meta, num_conditions=M, per_condition=per_condition, batch_size=batch_size,
                num_groups=num_groups, num_images=total, num_tokens=N, cfg_scale=float(guidance.cfg_scale),
                temperature=float(guidance.temperature), top_k=int(guidance.top_k), top_p=float(guidance.top_p),
                seed=int(seed),
                seed_rule="batch g: seed group_seed(seed, g) = (seed * 1000003 + g) mod 2^63, then image j of the "
                          "batch uses seeding.image_key(group_seed, j)", store_dtype=store_dtype)
    writer = ShardWriter(out_dir, meta, rank=rank, world_size=world_size, samples_per_shard=groups_per_shard)
    group_ids = [f"g{g:06d}" for g in range(num_groups)]
    todo = writer.my_work(group_ids)
    per_image = storage_per_image(c, dtype, N)
    device = gpt.output.weight.device
    started = time.perf_counter()
    bar = tqdm(todo, desc=f"collect rank {writer.rank}/{writer.world_size}", disable=not progress, unit="batch")
    engine = Engine(gpt)  # decoding state kept across groups: on a GPU its CUDA graphs are captured once
    with writer:
        for gid in bar:
            g = int(gid[1:])
            index = torch.arange(g * batch_size, min((g + 1) * batch_size, total))
            cond_index = index // per_condition
            cond, mask = pick(cond_index)
            b = len(index)
            h_c = torch.empty(b, N, c.dim, dtype=dtype)
            h_u = torch.empty(b, N, c.dim, dtype=dtype)

            def record(r: StepRecord) -> None:
                h_c[:, r.index] = r.hidden_cond.to("cpu", dtype)
                h_u[:, r.index] = r.hidden_uncond.to("cpu", dtype)

            tokens = generate(gpt, cond.to(device), cond_mask=None if mask is None else mask.to(device),
                              num_tokens=N, guidance=guidance, seed=group_seed(seed, g), on_step=record,
                              engine=engine)
            check_all_finite(f"collect: group {gid} not written (the base model's hidden states are NaN/inf, or "
                             f"beyond the {store_dtype} store dtype's range: rerun with --store-dtype float32 into a "
                             f"new --out)",
                             {"hidden_cond": h_c, "hidden_uncond": h_u})
            sample = {"hidden_cond": h_c, "hidden_uncond": h_u, "tokens": tokens.to("cpu"),
                      "sample_index": index, "condition_index": cond_index}
            if c.model_type == "c2i":
                sample["labels"] = cond.long()
            else:
                sample["captions"] = cond.to(dtype)
                sample["caption_mask"] = mask.bool()
            writer.add(gid, sample)
            if on_group is not None:
                on_group(g)
    elapsed = time.perf_counter() - started
    done = len(writer.done_ids())
    return dict(out_dir=str(out_dir), rank=writer.rank, world_size=writer.world_size, groups_run=len(todo),
                groups_done=done, num_groups=num_groups, bytes_per_image=per_image,
                total_bytes_estimate=per_image * total, seconds=elapsed)


COLLECTED_TENSORS = ("hidden_cond", "hidden_uncond", "tokens", "sample_index", "condition_index")


def check_collect_meta(meta: dict, source) -> None:
    """The fields of a Collect manifest that Reflect relies on, type-checked (CheckpointError naming them)."""
    if meta.get("kind") != COLLECT_KIND:
        raise CheckpointError(f"{source} is not a Collect output (manifest kind {meta.get('kind')!r})")
    check_base_facts(meta.get("base"), source)
    scale = meta.get("cfg_scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 1:
        raise CheckpointError(f"{source}: manifest cfg_scale must be a finite number > 1, got {scale!r}")
    if meta.get("base_fingerprint") is not None and not isinstance(meta["base_fingerprint"], str):
        raise CheckpointError(f"{source}: manifest base_fingerprint must be a string, got {meta['base_fingerprint']!r}")


def _check_group(where: str, t: dict, meta: dict, names: list) -> None:
    """One collected group: the tensors Reflect reads, with the shapes, id ranges and finite values the
    manifest promises (a shard edited or damaged by hand is refused naming the file, never half-used)."""
    base, n = meta["base"], meta.get("num_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= base["grid_size"] ** 2:
        raise CheckpointError(f"{where}: manifest num_tokens must be an integer in [1, {base['grid_size'] ** 2}], "
                              f"got {n!r}")
    extra = sorted(set(names) ^ set(t))
    missing = sorted(set(COLLECTED_TENSORS) - set(t))
    if missing or extra:
        raise CheckpointError(f"{where}: tensors {missing or extra} missing or unexpected; delete the file and rerun "
                              f"collect to redo it")
    b = t["hidden_cond"].shape[0]
    want = {"hidden_cond": (b, n, base["dim"]), "hidden_uncond": (b, n, base["dim"]), "tokens": (b, n),
            "sample_index": (b,), "condition_index": (b,)}
    if base["model_type"] == "c2i":
        want["labels"] = (b,)
    else:
        want.update(captions=(b, base["cls_token_num"], base["caption_dim"]), caption_mask=(b, base["cls_token_num"]))
    wrong = [f"{k} {list(t[k].shape)} (expected {list(v)})" for k, v in want.items()
             if k not in t or tuple(t[k].shape) != v]
    if wrong:
        raise CheckpointError(f"{where}: wrong shapes: {'; '.join(wrong)}; delete the file and rerun collect")
    try:
        check_token_ids("tokens", t["tokens"], base["vocab_size"])
        if "labels" in t:
            check_token_ids("labels", t["labels"], base["num_classes"])
    except InvalidArgument as e:
        raise CheckpointError(f"{where}: {e}; delete the file and rerun collect") from None
    check_all_finite(f"{where} (delete the file and rerun collect to redo it)", t)


def load_collected(directory, *, device="cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """All collected images of a shard directory, in global image order: (meta, tensors with dim 0 = image).

    Refuses (naming the shard file) a group with missing tensors, mismatched shapes or NaN/inf values."""
    reader = ShardReader(directory)
    meta = reader.meta
    check_collect_meta(meta, reader.directory / "manifest.json")
    groups = sorted(reader, key=lambda item: item[0])
    if not groups:
        raise InvalidArgument(f"{directory} holds no collected samples yet; run `llamagen-core2 collect` first")
    names = sorted(groups[0][1])
    for gid, tensors in groups:
        _check_group(f"{reader.shard_of[gid]} (group {gid})", tensors, meta, names)
    try:
        data = {name: torch.cat([tensors[name] for _, tensors in groups]).to(device) for name in names}
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: collected groups disagree in shape ({str(e).splitlines()[0]})") from None
    return meta, data


def describe_storage(gpt_config, store_dtype: str, num_images: int, num_tokens: Optional[int] = None) -> str:
    per = storage_per_image(gpt_config, STORE_DTYPES[store_dtype], num_tokens)
    return (f"storage: {per / 1024:.1f} KiB per image ({store_dtype} h_c + h_u, {gpt_config.dim}-wide, "
            f"{num_tokens or gpt_config.num_image_tokens} tokens) -> {per * num_images / 2 ** 20:.1f} MiB for "
            f"{num_images} images")


__all__ = ["collect", "COLLECT_GUIDANCE", "load_collected", "parse_class_ids", "storage_per_image", "describe_storage",
           "group_seed", "STORE_DTYPES"]
