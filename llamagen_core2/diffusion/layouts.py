"""How each diffusers pipeline calls its denoiser: rows, batch order, times.

Pinned to diffusers 0.42.1, whose classic pipelines mix CFG inline (no guider objects):

* SDXL (`StableDiffusionXLPipeline`, `unet`): ONE call per step on rows [uncond ; cond]
  (uncond FIRST), then `uncond + g * (cond - uncond)`.
* SD3 / SD3.5 (`StableDiffusion3Pipeline`, `transformer`): same [uncond ; cond] single call, per-row
  timestep [2B].
* FLUX (`FluxPipeline`, `transformer`): true CFG calls the transformer twice per step, cond first
  then uncond, and mixes `neg + s * (pos - neg)`. We run the pipeline WITHOUT its true CFG and let
  the wrapper issue both passes itself (same inputs, same order) from its single cond call, so
  every mode — including ones that skip the uncond pass — goes through one code path.
  Timestep is t/1000; predictions are packed [B, L, 4C]; img_ids give the (row, col) grid.

A layout turns one intercepted call (bound arguments) into cond / uncond predictions, builds
replayed calls for zigzag, and converts predictions to / from [B, C, H, W] for noise models.
(The noise model's prompt inputs do not come from these calls: see prompt_summary.py.)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidArgument


def take_rows(value, rows: slice, batch: int):
    """Slice every tensor (nested in dicts) whose leading dim is `batch` to `rows`."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() >= 1 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: take_rows(v, rows, batch) for k, v in value.items()}
    return value


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out.sample


class PairedRowsLayout:
    """SDXL and SD3: one call per step on [uncond ; cond] rows."""

    def __init__(self, kind: str, sample_key: str):
        self.kind, self.sample_key = kind, sample_key

    def images(self, args: dict) -> int:
        rows = args[self.sample_key].shape[0]
        if rows % 2:
            raise InvalidArgument(
                f"{self.kind}: the pipeline called the denoiser on {rows} rows; run it with guidance_scale > 1 so "
                "it batches [uncond ; cond]")
        return rows // 2

    def run(self, forward, args: dict, need_uncond: bool):
        """-> (cond [B,...], uncond or None, rows evaluated)."""
        B = self.images(args)
        if need_uncond:  # the pipeline's own batch, unchanged: bitwise the pipeline's numbers
            out = _first(forward(**{**args, "return_dict": False}))
            return out[B:], out[:B], 2 * B
        cond_args = take_rows(args, slice(B, 2 * B), 2 * B)
        return _first(forward(**{**cond_args, "return_dict": False})), None, B

    def pack(self, mixed: torch.Tensor, args: dict):
        out = torch.cat([mixed, mixed])  # pipeline computes m + g * (m - m) == m exactly
        return out

    def replay(self, args: dict, latents: torch.Tensor, time: torch.Tensor) -> dict:
        B = latents.shape[0]
        new = dict(args)
        new[self.sample_key] = torch.cat([latents, latents])
        old_t = args["timestep"]
        t = time.to(device=latents.device)
        new["timestep"] = t.to(old_t.dtype) if old_t.dim() == 0 else t.expand(2 * B).to(old_t.dtype)
        return new

    def to_image(self, pred: torch.Tensor, args: dict) -> torch.Tensor:
        return pred

    def from_image(self, pred: torch.Tensor, args: dict) -> torch.Tensor:
        return pred


class FluxLayout:
    """FLUX: the wrapper sees the cond call and issues the uncond pass itself (see module doc)."""

    kind = "flux"
    sample_key = "hidden_states"

    def __init__(self):
        self.negative_embeds: Optional[torch.Tensor] = None
        self.negative_pooled: Optional[torch.Tensor] = None

    def images(self, args: dict) -> int:
        return args["hidden_states"].shape[0]

    def _uncond_args(self, args: dict) -> dict:
        if self.negative_embeds is None:
            raise InvalidArgument("flux: this mode needs the negative prompt embeddings; run through diffuse()")
        neg, neg_pooled = self.negative_embeds, self.negative_pooled
        if neg.shape != args["encoder_hidden_states"].shape:
            raise InvalidArgument(
                f"flux: negative prompt embeddings {list(neg.shape)} must match the prompt embeddings "
                f"{list(args['encoder_hidden_states'].shape)} (same batch and max_sequence_length)")
        return {**args, "encoder_hidden_states": neg, "pooled_projections": neg_pooled}

    def run(self, forward, args: dict, need_uncond: bool):
        B = self.images(args)
        cond = _first(forward(**{**args, "return_dict": False}))
        if not need_uncond:
            return cond, None, B
        uncond = _first(forward(**{**self._uncond_args(args), "return_dict": False}))
        return cond, uncond, 2 * B

    def pack(self, mixed: torch.Tensor, args: dict):
        return mixed

    def replay(self, args: dict, latents: torch.Tensor, time: torch.Tensor) -> dict:
        t = time.to(latents.device).expand(latents.shape[0]).to(latents.dtype) / 1000
        return {**args, "hidden_states": latents, "timestep": t}

    @staticmethod
    def _grid(args: dict) -> tuple[int, int]:
        ids = args["img_ids"]
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def to_image(self, pred: torch.Tensor, args: dict) -> torch.Tensor:
        h, w = self._grid(args)
        B, L, C = pred.shape
        return pred.transpose(1, 2).reshape(B, C, h, w)

    def from_image(self, pred: torch.Tensor, args: dict) -> torch.Tensor:
        B, C, h, w = pred.shape
        return pred.reshape(B, C, h * w).transpose(1, 2)


def layout_for(kind: str):
    if kind == "sdxl":
        return PairedRowsLayout("sdxl", "sample")
    if kind == "sd3":
        return PairedRowsLayout("sd3", "hidden_states")
    if kind == "flux":
        return FluxLayout()
    raise InvalidArgument(f"pipeline must be one of ['sdxl', 'sd3', 'flux'], got {kind!r}")


def pipeline_kind(pipe) -> str:
    """Detect the layout from the pipeline class (subclasses included)."""
    names = [c.__name__ for c in type(pipe).__mro__]
    if "StableDiffusionXLPipeline" in names:
        return "sdxl"
    if "StableDiffusion3Pipeline" in names:
        return "sd3"
    if "FluxPipeline" in names:
        return "flux"
    raise InvalidArgument(
        f"unsupported pipeline {type(pipe).__name__}; supported: StableDiffusionXLPipeline, "
        "StableDiffusion3Pipeline, FluxPipeline")


def denoiser_of(pipe, kind: str) -> torch.nn.Module:
    return pipe.unet if kind == "sdxl" else pipe.transformer
