"""Load the shipped mini-world models and sample images from them (used by the demo and the quality benchmark).

Contract:
  * `default_checkpoint_dir()` / `shipped_paths()` (paths.py): where the shipped models are
    (`$LLAMAGEN_CORE2_CHECKPOINTS` if set, else `<repo>/checkpoints`).
  * `load_world(checkpoint_dir=None, with_evaluator=False) -> World` loads `world_vq`, `world_gpt` and, when
    present, `world_weak` (a CoRe^2 weak model from `reflect`) and `world_evaluator`. A missing VQ or GPT
    raises CheckpointError naming the path and how to rebuild it; a missing weak model leaves `weak=None`.
  * `world.pipeline(guidance=None) -> LlamaGenPipeline` over the loaded models (the one generate -> VQ -> images
    driver, `llamagen_core2/pipeline.py`), with `WORLD_GUIDANCE` as its default guidance.
  * `WORLD_GUIDANCE`: the sampling defaults of the mini world (CFG 3, W2S 1.5, full vocabulary, temperature 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..decode.model import GPT
from ..encoders.vq import VQModel
from ..errors import CheckpointError
from ..guidance.config import GuidanceConfig
from ..pipeline import LlamaGenPipeline
from .paths import EVALUATOR_DIR, GPT_DIR, VQ_DIR, WEAK_DIR, default_checkpoint_dir  # noqa: F401 (re-exported)

# The VQ vocabulary is only 256 codes, so top-k is off (full vocabulary), as in LlamaGen's FID runs.
WORLD_GUIDANCE = GuidanceConfig(cfg_scale=3.0, w2s_scale=1.5, temperature=1.0, top_k=0, top_p=1.0)


@dataclass
class World:
    vq: VQModel
    gpt: GPT
    weak: Optional[torch.nn.Module]
    evaluator: Optional[torch.nn.Module]
    checkpoint_dir: Path

    def pipeline(self, guidance: Optional[GuidanceConfig] = None) -> LlamaGenPipeline:
        return LlamaGenPipeline(self.gpt, self.vq, weak_model=self.weak, guidance=guidance or WORLD_GUIDANCE)


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
        from ..core2.weak_model import WeakModel  # CoRe^2 module; only needed when a weak model is shipped

        weak = WeakModel.from_pretrained(root / WEAK_DIR, gpt=gpt).eval()
    evaluator = None
    if with_evaluator:
        from .evaluator import Evaluator

        evaluator = Evaluator.from_pretrained(
            _require(root / EVALUATOR_DIR, "evaluator", "python -m llamagen_core2.world.train_evaluator"))
    return World(vq=vq, gpt=gpt, weak=weak, evaluator=evaluator, checkpoint_dir=root)
