"""Load the shipped mini-world models and sample images from them (used by the demo and the quality benchmark).

Contract:
  * `default_checkpoint_dir()`: `$LLAMAGEN_CORE2_CHECKPOINTS` if set, else `<repo>/checkpoints` (the
    directory shipped next to the package in a source checkout / editable install).
  * `load_world(checkpoint_dir=None, with_evaluator=False) -> World` loads `world_vq`, `world_gpt` and, when
    present, `world_weak` (a CoRe^2 weak model from `reflect`) and `world_evaluator`. A missing VQ or GPT
    raises CheckpointError naming the path and how to rebuild it; a missing weak model leaves `weak=None`.
  * `sample_images(world, labels [B], mode=..., schedule=None, seed=..., **sampling) -> (images [B, 3, S, S]
    in ~[-1, 1], stats dict)`: `generate()` then VQ decode. `stats` is `generate`'s (base rows etc.).
  * `WORLD_SAMPLING`: the sampling defaults of the mini world (full vocabulary, temperature 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import CheckpointError, InvalidArgument
from ..generate import generate
from ..model import GPT
from ..vq import VQModel

VQ_DIR, GPT_DIR, WEAK_DIR, EVALUATOR_DIR = "world_vq", "world_gpt", "world_weak", "world_evaluator"
# The VQ vocabulary is only 256 codes, so top-k is off (full vocabulary), as in LlamaGen's FID runs.
WORLD_SAMPLING = dict(cfg_scale=3.0, w2s_scale=1.5, temperature=1.0, top_k=0, top_p=1.0)


def default_checkpoint_dir() -> Path:
    env = os.environ.get("LLAMAGEN_CORE2_CHECKPOINTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "checkpoints"


@dataclass
class World:
    vq: VQModel
    gpt: GPT
    weak: Optional[torch.nn.Module]
    evaluator: Optional[torch.nn.Module]
    checkpoint_dir: Path


def _require(path: Path, what: str, rebuild: str) -> Path:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"mini-world {what} not found at {path} (expected config.json + model.safetensors); "
                              f"rebuild it with `{rebuild}` or set LLAMAGEN_CORE2_CHECKPOINTS")
    return path


def load_world(checkpoint_dir=None, *, with_evaluator: bool = False, with_weak: bool = True) -> World:
    root = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir()
    vq = VQModel.from_pretrained(_require(root / VQ_DIR, "VQ tokenizer", "python -m llamagen_core2.world.train_vq"))
    gpt = GPT.from_pretrained(_require(root / GPT_DIR, "GPT", "python -m llamagen_core2.world.train_gpt"))
    weak = None
    if with_weak and (root / WEAK_DIR / "config.json").is_file():
        from ..weak_model import WeakModel  # CoRe^2 module; only needed when a weak model is shipped

        weak = WeakModel.from_pretrained(root / WEAK_DIR, gpt=gpt).eval()
    evaluator = None
    if with_evaluator:
        from .evaluator import Evaluator

        evaluator = Evaluator.from_pretrained(
            _require(root / EVALUATOR_DIR, "evaluator", "python -m llamagen_core2.world.train_evaluator"))
    return World(vq=vq, gpt=gpt, weak=weak, evaluator=evaluator, checkpoint_dir=root)


@torch.inference_mode()
def sample_images(world: World, labels: torch.Tensor, *, mode: str = "cfg", schedule: Optional[Sequence[str]] = None,
                  seed: int = 0, **sampling) -> tuple[torch.Tensor, dict]:
    """labels [B] class ids -> (decoded images [B, 3, S, S], generation stats)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    knobs = {**WORLD_SAMPLING, **sampling}
    modes = set(schedule) if schedule is not None else {mode}
    if modes & {"fast", "slow"} and world.weak is None:
        raise InvalidArgument(f"mode(s) {sorted(modes & {'fast', 'slow'})} need the CoRe^2 weak model "
                              f"{world.checkpoint_dir / WEAK_DIR}, which is not shipped / not found")
    tokens, stats = generate(world.gpt, labels, mode=mode, schedule=schedule, seed=seed,
                             weak_model=world.weak if modes & {"fast", "slow"} else None, return_stats=True, **knobs)
    return world.vq.decode_codes(tokens), stats
