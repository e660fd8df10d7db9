"""Diffusion Reflect: train a MoE-LoRA noise model on Collect shards (per-step experts).

Each iteration draws one step index i and a batch of training trajectories, routes to expert
k(i, N) and minimises MSE(noise_model(cond_i), cfg_i). Trajectories (prompt, seed pairs) are split
into train / held-out before training; the report gives the held-out MSE of the model and of the
"cond" baseline (predicting CFG by the conditional prediction itself) so the gain is measured, not
assumed. Our default config sets add_cond_residual=True (the model learns the correction to cond).
Inputs are checked for NaN/inf (naming the shard) and the loss and weights after training, so a diverged
model is refused (NonFiniteError) instead of being saved.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import InvalidArgument, NonFiniteError, check_all_finite, check_int, check_number
from ..io.shards import ShardReader
from .noise_model import NoiseModel, NoiseModelConfig

logger = logging.getLogger(__name__)


@dataclass
class ReflectReport:
    train_trajectories: int
    heldout_trajectories: int
    num_steps: int
    final_train_mse: float
    heldout_mse: Optional[float]       # noise model vs CFG target (None without held-out trajectories)
    heldout_cond_mse: Optional[float]  # cond prediction vs CFG target (the baseline to beat)


def load_trajectories(shard_dir):
    reader = ShardReader(shard_dir)
    for sid, tensors in reader:
        check_all_finite(f"{reader.shard_of[sid]} (trajectory {sid}; delete the file and rerun diffuse-collect)",
                         tensors)
    ids, data = reader.load_all(["cond", "cfg", "s", "v", "d", "pooled"])
    if not ids:
        raise InvalidArgument(f"{shard_dir}: no trajectories collected")
    return reader.meta, ids, data


def config_for_shards(meta: dict, data: dict, **overrides) -> NoiseModelConfig:
    """A small noise-model config whose input dims match the collected features."""
    _, N, C, H, W = data["cond"].shape
    base = dict(in_channels=C, num_layers=2, num_heads=2, head_dim=16, patch_size=2,
                sample_size=max(H, W), pos_embed_max_size=max(H, W) // 2,
                text_dim=data["d"].shape[-1], text_tokens=data["s"].shape[-1], pooled_dim=data["pooled"].shape[-1],
                svd_rank=data["s"].shape[1], cond_hidden=32, lora_rank=4, num_experts=min(N, 8),
                add_cond_residual=True, base=meta.get("kind", ""), cfg_scale=float(meta.get("cfg_scale", 0.0)))
    base.update(overrides)
    return NoiseModelConfig(**base)


def _mse(model, data, rows, N) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(N):
            pred = model(data["cond"][rows, i], data["s"][rows], data["v"][rows], data["d"][rows],
                         data["pooled"][rows], step=i, num_steps=N)
            total += float(((pred - data["cfg"][rows, i]) ** 2).sum())
            count += pred.numel()
    return total / count


def train_noise_model(shard_dir, config: NoiseModelConfig = None, *, iters: int = 500, batch_size: int = 8,
                      lr: float = 1e-3, holdout: float = 0.2, seed: int = 0, log_every: int = 0):
    """-> (NoiseModel, ReflectReport)."""
    check_int("iters", iters, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed, minimum=0)
    check_number("lr", lr, above=0.0, maximum=1.0)
    check_number("holdout", holdout, minimum=0.0, below=1.0)
    meta, ids, data = load_trajectories(shard_dir)
    S, N = data["cond"].shape[:2]
    n_hold = math.ceil(holdout * S) if holdout > 0 else 0
    if S - n_hold < 1:
        raise InvalidArgument(f"need at least one training trajectory; have {S} with holdout {holdout}")
    config = config or config_for_shards(meta, data)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(S, generator=g)
    held, train = order[:n_hold], order[n_hold:]
    torch.manual_seed(seed)
    model = NoiseModel(config)
    model.check_inputs(data["cond"][:1, 0], data["s"][:1], data["v"][:1], data["d"][:1], data["pooled"][:1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss_ok = torch.ones((), dtype=torch.bool)
    for it in range(iters):
        i = int(torch.randint(N, (1,), generator=g))
        rows = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=g)]
        pred = model(data["cond"][rows, i], data["s"][rows], data["v"][rows], data["d"][rows],
                     data["pooled"][rows], step=i, num_steps=N)
        loss = torch.nn.functional.mse_loss(pred, data["cfg"][rows, i])
        loss_ok &= torch.isfinite(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and (it + 1) % log_every == 0:
            logger.info("reflect iter %d/%d train mse %.6f", it + 1, iters, loss.item())
    model.eval()
    if not bool(loss_ok):
        raise NonFiniteError(f"diffuse-reflect: the training loss became NaN/inf (lr {lr}); nothing was saved")
    check_all_finite("diffuse-reflect: the trained noise model's weights (nothing saved)", model.state_dict())
    if n_hold:
        heldout = _mse(model, data, held, N)
        baseline = float(((data["cond"][held] - data["cfg"][held]) ** 2).mean())
    else:
        heldout = baseline = None
    return model, ReflectReport(len(train), n_hold, N, loss.item(), heldout, baseline)
