"""CoRe^2 Reflect: train the weak model on Collect shards to predict the base model's CFG distribution.

Contract (design: docs/design.md#reflect):
  * Data: `collect.load_collected(dir)` images (refused, naming the shard, if any value is NaN/inf); a
    deterministic held-out split by global image index: image i is held out when floor((i + 1) h) > floor(i h)
    for the exact fraction h = holdout, so exactly floor(M h) of images 0..M-1 are held out, evenly spread
    (h = 1/n: every n-th image). Target hidden h_cfg = h_u + s (h_c - h_u) with s = the Collect CFG scale
    (or `guidance.cfg_scale`, a number > 1, when a `GuidanceConfig` is given), computed in fp32; target logits =
    gpt.head(h_cfg).
  * Loss per token = KL(softmax(cfg logits) || softmax(gpt.head(weak(h_c)))) at temperature 1, averaged over
    tokens, + `mse_weight` * mean squared error in hidden space. Both terms are always reported.
  * Baseline = the same KL with the plain conditional output (prediction = h_c, i.e. an untrained weak model).
    `evaluate()` returns {"kl", "mse", "baseline_kl", "baseline_mse", "kl_ratio"}.
  * Output directory: the trained weak model (config.json + model.safetensors, recording base facts, base
    fingerprint and CFG scale), `eval.json` (held-out metrics, written at the end), `train_log.jsonl` (one line
    per evaluation, each step once: a resumed run first drops the lines past its checkpoint), and
    `checkpoints/step-XXXXXXX/` (weak model + `trainer_state.pt`: optimizer, step) with `checkpoints/latest.json`.
    Checkpoints are written to a temp directory and renamed, so a killed run resumes from the last complete one.
  * Every argument is validated before anything is read or written. A resumed run must use the settings of
    the run it resumes (weak-model architecture, CFG scale, optimiser, steps, batch, hold-out, seed, collected
    data): anything else is refused naming each difference (`resume=False` starts over instead).
  * Nothing non-finite is written: the loss is checked (accumulated on the device, read at every log /
    checkpoint / final write) and the weights before every checkpoint, so a diverging run stops with
    NonFiniteError and keeps only its earlier, finite checkpoints.
  * DDP under torchrun (WORLD_SIZE > 1): gloo on CPU / nccl on CUDA; each rank takes a disjoint slice of every
    global batch; rank 0 evaluates and writes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import (CheckpointError, InvalidArgument, NonFiniteError, check_all_finite, check_int, check_number,
                     describe_differences, rank_and_world)
from ..guidance.config import GuidanceConfig
from ..guidance.seeding import check_seed
from ..io.files import atomic_write, atomic_write_json, nonfinite_key
from .collect import load_collected
from .weak_model import BASE_FIELDS, WeakConfig, WeakModel, base_facts, weights_fingerprint


def holdout_mask(sample_index: torch.Tensor, holdout: float) -> torch.Tensor:
    """[M] bool: True for held-out images: i with floor((i + 1) h) > floor(i h), h = holdout as an exact
    fraction (so 0.05 holds out every 20th image and 0.9 holds out 9 of every 10, not a rounded period)."""
    h = Fraction(check_number("holdout", holdout, above=0.0, below=1.0)).limit_denominator(1_000_000)
    i = sample_index.long()
    return ((i + 1) * h.numerator) // h.denominator > (i * h.numerator) // h.denominator


def guidance_losses(gpt, pred_hidden: torch.Tensor, target_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target [M, N, d] -> (KL(target || pred) per token, MSE per token), each [M, N] fp32."""
    target_logp = F.log_softmax(gpt.head(target_hidden.to(gpt.output.weight.dtype)), dim=-1)
    pred_logp = F.log_softmax(gpt.head(pred_hidden.to(gpt.output.weight.dtype)), dim=-1)
    kl = (target_logp.exp() * (target_logp - pred_logp)).sum(-1)
    mse = (pred_hidden.float() - target_hidden.float()).pow(2).mean(-1)
    return kl, mse


class CollectedData:
    """Collected images on `device`; `batch(idx)` -> (cond, cond_mask, h_c fp32, h_cfg fp32)."""

    def __init__(self, meta: dict, data: dict, cfg_scale: float, device):
        self.meta, self.cfg_scale, self.device = meta, float(cfg_scale), device
        self.data = data
        self.num_images = data["hidden_cond"].shape[0]
        self.sample_index = data["sample_index"]

    def batch(self, idx: torch.Tensor):
        d = self.data
        h_c = d["hidden_cond"][idx].to(self.device, torch.float32)
        h_u = d["hidden_uncond"][idx].to(self.device, torch.float32)
        h_cfg = h_u + self.cfg_scale * (h_c - h_u)
        if "labels" in d:
            return d["labels"][idx].to(self.device), None, h_c, h_cfg
        return (d["captions"][idx].to(self.device, torch.float32), d["caption_mask"][idx].to(self.device), h_c,
                h_cfg)


@torch.no_grad()
def evaluate(weak: Optional[WeakModel], gpt, data: CollectedData, indices: torch.Tensor,
             batch_size: int = 16) -> dict:
    """Held-out metrics of the weak model and of the conditional-output baseline over images `indices`."""
    sums = dict(kl=0.0, mse=0.0, baseline_kl=0.0, baseline_mse=0.0)
    count = 0
    was_training = weak.training if weak is not None else False
    if weak is not None:
        weak.eval()
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        cond, mask, h_c, h_cfg = data.batch(idx)
        base_kl, base_mse = guidance_losses(gpt, h_c, h_cfg)
        sums["baseline_kl"] += float(base_kl.sum())
        sums["baseline_mse"] += float(base_mse.sum())
        if weak is not None:
            kl, mse = guidance_losses(gpt, weak(cond, h_c, cond_mask=mask), h_cfg)
            sums["kl"] += float(kl.sum())
            sums["mse"] += float(mse.sum())
        count += h_c.shape[0] * h_c.shape[1]
    if weak is not None and was_training:
        weak.train()
    out = {k: v / max(count, 1) for k, v in sums.items()}
    if weak is None:
        out.pop("kl"), out.pop("mse")
    else:  # None (not NaN) when CFG equals cond on these images: there is no guidance to compare against
        out["kl_ratio"] = out["kl"] / out["baseline_kl"] if out["baseline_kl"] > 0 else None
    out["tokens"] = count
    return out


def _check_base(meta: dict, gpt) -> None:
    """The shards must come from this base model (shape facts and weights fingerprint)."""
    have = base_facts(gpt.config)
    diffs = [f"{k}: shards from {meta['base'].get(k)!r}, base has {have[k]!r}" for k in BASE_FIELDS
             if meta["base"].get(k) != have[k]]
    if diffs:
        raise CheckpointError("the collected shards were produced by a different base model: " + "; ".join(diffs))
    got = weights_fingerprint(gpt)
    if meta.get("base_fingerprint") not in (None, got):
        raise CheckpointError(f"the collected shards were produced by base weights {meta['base_fingerprint']}, "
                              f"but the given base model has fingerprint {got}; use the same checkpoint")


def _latest_checkpoint(out_dir: Path) -> Optional[Path]:
    from ..io.checkpoint import read_json

    latest = out_dir / "checkpoints" / "latest.json"
    if not latest.is_file():
        return None
    name = read_json(latest, "checkpoint pointer").get("name")
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        raise CheckpointError(f"{latest}: name must be a checkpoint directory name, got {name!r}")
    path = out_dir / "checkpoints" / name
    return path if path.is_dir() else None


def _require_finite(loss_ok: torch.Tensor, weak: WeakModel, step: int, lr: float) -> None:
    """Before anything from step `step` is written: the loss stayed finite and the weights are finite."""
    if not bool(loss_ok):
        raise NonFiniteError(f"reflect: the training loss became NaN/inf by step {step}; nothing from it was "
                             f"written (earlier checkpoints are kept). Rerun with a lower --lr (now {lr}) or "
                             f"--mse-weight and --no-resume, or into a new --out")
    check_all_finite(f"reflect: the weak model's weights after step {step} (nothing written; rerun with a lower "
                     f"--lr than {lr} and --no-resume)", weak.state_dict())


def _require_finite_metrics(metrics: dict, step: int) -> dict:
    bad = nonfinite_key(metrics)
    if bad is not None:
        raise NonFiniteError(f"reflect: held-out metric {bad} is NaN/inf after step {step}; nothing from it was "
                             f"written. Check the shards and the base model's dtype")
    return metrics


def _check_resume(ckpt: Path, state: dict, weak: WeakModel, settings: dict) -> None:
    """A resumed run must use the settings of the run it resumes; else name every difference."""
    old = state.get("settings")
    if not isinstance(old, dict):  # a checkpoint from before settings were recorded: compare the architecture
        old = {**settings, "weak": weak.config.to_dict()}
    old = json.loads(json.dumps(old))
    if old != settings:
        raise InvalidArgument(f"{ckpt.parent.parent} holds a reflect run with other settings "
                              f"({describe_differences(_flat(old), _flat(settings))}); rerun with the same settings "
                              f"to resume it, or use --no-resume (resume=False) or a new --out to start over")


def _flat(settings: dict) -> dict:
    """{"weak": {"dim": 64}} -> {"weak.dim": 64}, so a difference names the field."""
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _save_checkpoint(out_dir: Path, weak: WeakModel, optimizer, step: int, settings: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-XXXXXXX atomically (temp dir + rename), point latest.json at it, prune old ones."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    weak.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "settings": settings}, tmp / "trainer_state.pt")
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_json(root / "latest.json", {"name": name, "step": step})
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= `step`, the checkpoint a run resumes from: a killed run may have logged
    steps past it (an eval line, then the kill before the next checkpoint), which the resumed run logs again.
    Rewritten atomically; a line torn by the kill is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def reflect(
    gpt,
    shards_dir,
    out_dir,
    *,
    preset: str = "W-2",
    weak_overrides: Optional[dict] = None,
    guidance: Optional[GuidanceConfig] = None,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int = 50,
    mse_weight: float = 0.0,
    holdout: float = 0.1,
    eval_every: int = 200,
    checkpoint_every: int = 200,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    device=None,
) -> dict:
    """Train a weak model for `gpt` on `shards_dir`; returns the final held-out metrics (also in eval.json).

    guidance: the CFG scale to learn is `guidance.cfg_scale` (a number > 1); None: the scale the shards were
    collected with (the weak model learns CFG at one scale; the other settings do not apply to training)."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every),
                        ("checkpoint_every", checkpoint_every)):
        check_int(name, value, minimum=1)
    lr = check_number("lr", lr, above=0.0, maximum=1.0)
    weight_decay = check_number("weight_decay", weight_decay, minimum=0.0)
    mse_weight = check_number("mse_weight", mse_weight, minimum=0.0)
    warmup = check_int("warmup", warmup, minimum=0)
    holdout = check_number("holdout", holdout, above=0.0, below=1.0)
    cfg_scale = None
    if guidance is not None:
        if not isinstance(guidance, GuidanceConfig):
            raise InvalidArgument(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
        cfg_scale = check_number("cfg_scale", guidance.cfg_scale, above=1.0)
    check_seed(seed)
    if not isinstance(weak_overrides or {}, dict):
        raise InvalidArgument(f"weak_overrides must be a dict of WeakConfig fields, got {weak_overrides!r}")
    weak_config = WeakConfig.from_preset(preset, **(weak_overrides or {}))  # validates preset and overrides
    rank, world = rank_and_world()
    device = torch.device(device) if device is not None else gpt.output.weight.device
    distributed = world > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    gpt.requires_grad_(False)
    out_dir = Path(out_dir)

    meta, raw = load_collected(shards_dir)
    _check_base(meta, gpt)
    scale = float(meta["cfg_scale"] if cfg_scale is None else cfg_scale)
    data = CollectedData(meta, raw, scale, device)
    held = holdout_mask(data.sample_index, holdout)
    train_idx, held_idx = torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()
    if len(train_idx) == 0 or len(held_idx) == 0:
        raise InvalidArgument(f"{data.num_images} collected images are too few for a held-out split of {holdout}")

    # What makes two runs the same run: a resumed run must match these exactly.
    settings = json.loads(json.dumps(dict(
        weak=weak_config.to_dict(), cfg_scale=scale, steps=steps, batch_size=batch_size, world_size=world, lr=lr,
        warmup=warmup, weight_decay=weight_decay, mse_weight=mse_weight, holdout=holdout, seed=seed,
        collected=dict(base_fingerprint=meta.get("base_fingerprint"), num_images=data.num_images,
                       seed=meta.get("seed"), cfg_scale=meta.get("cfg_scale")))))
    start_step = 0
    ckpt = _latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        weak = WeakModel.from_pretrained(ckpt, gpt)
        try:
            state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- any unreadable trainer state is the same user-facing problem
            raise CheckpointError(f"{ckpt / 'trainer_state.pt'}: unreadable ({type(e).__name__}); delete {ckpt} "
                                  f"to resume from an earlier checkpoint, or use --no-resume") from None
        _check_resume(ckpt, state, weak, settings)
        start_step = int(state["step"])
    else:
        torch.manual_seed(seed)
        weak = WeakModel.for_base(gpt, preset, cfg_scale=scale, **(weak_overrides or {}))
    weak.cfg_scale = scale
    weak.extra.update(shards=str(shards_dir), shards_fingerprint=meta.get("base_fingerprint"),
                      num_images=data.num_images, holdout=holdout, mse_weight=mse_weight)
    weak.to(device).train()
    model = torch.nn.parallel.DistributedDataParallel(weak) if distributed else weak
    optimizer = torch.optim.AdamW(weak.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    if ckpt is not None:
        optimizer.load_state_dict(state["optimizer"])

    global_batch = min(batch_size * world, len(train_idx))
    steps_per_epoch = max(1, len(train_idx) // global_batch)
    log_path = out_dir / "train_log.jsonl"
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and log_path.exists():
            log_path.unlink()  # a run that starts over logs afresh instead of appending to another run's log
        if start_step > 0:
            _truncate_log(log_path, start_step)
        if start_step == 0:  # an earlier run's checkpoints would outrank (and prune) the new run's ones
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    bar = tqdm(range(start_step, steps), desc="reflect", disable=not (progress and is_main), initial=start_step,
               total=steps)
    started = time.perf_counter()
    loss_ok = torch.ones((), dtype=torch.bool, device=device)  # read only at write points: no per-step sync
    for step in bar:
        # The batch is a function of (seed, step) only, so a resumed run sees the same data as an unbroken one.
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        chunk = train_idx[perm[pos * global_batch:(pos + 1) * global_batch]]
        idx = chunk[rank::world]
        cond, mask, h_c, h_cfg = data.batch(idx)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        kl, mse = guidance_losses(gpt, model(cond, h_c, cond_mask=mask), h_cfg)
        loss = kl.mean() + mse_weight * mse.mean()
        loss_ok &= torch.isfinite(loss.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weak.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if is_main:
            bar.set_postfix(kl=f"{kl.detach().mean().item():.4f}", mse=f"{mse.detach().mean().item():.4f}")
            if done % eval_every == 0 or done == steps:
                _require_finite(loss_ok, weak, done, lr)
                metrics = evaluate(weak, gpt, data, held_idx, batch_size)
                record = _require_finite_metrics({"step": done, "train_kl": kl.detach().mean().item(),
                                                  "train_mse": mse.detach().mean().item(),
                                                  **{f"heldout_{k}": v for k, v in metrics.items()}}, done)
                line = json.dumps(record, allow_nan=False)
                with open(log_path, "a") as f:
                    f.write(line + "\n")
            if done % checkpoint_every == 0 or done == steps:
                _require_finite(loss_ok, weak, done, lr)
                _save_checkpoint(out_dir, weak, optimizer, done, settings)
    bar.close()

    result = {}
    if is_main:
        _require_finite(loss_ok, weak, steps, lr)
        metrics = _require_finite_metrics(evaluate(weak, gpt, data, held_idx, batch_size), steps)
        result = dict(heldout=metrics, steps=steps, cfg_scale=scale, train_images=len(train_idx),
                      heldout_images=len(held_idx), preset=weak.config.preset, seconds=time.perf_counter() - started)
        weak.extra.update(heldout_kl=metrics["kl"], heldout_baseline_kl=metrics["baseline_kl"])
        weak.save_pretrained(out_dir)
        atomic_write_json(out_dir / "eval.json", result)
    if distributed:
        torch.distributed.barrier()
    weak.eval()
    return result
