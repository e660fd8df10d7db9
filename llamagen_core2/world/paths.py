"""Where the shipped mini-world models are: `shipped_paths()` from any working directory.

Contract:
  * `default_checkpoint_dir()`: `$LLAMAGEN_CORE2_CHECKPOINTS` if set, else `<repo>/checkpoints`, the directory
    next to the package in a source checkout, which an editable install (`pip install -e .`) points at.
  * `shipped_paths(checkpoint_dir=None) -> ShippedPaths(root, gpt, vq, weak, evaluator)`: absolute paths of
    `world_gpt`, `world_vq`, `world_weak` and `world_evaluator` (weak / evaluator None when absent), resolved
    from the installed package, not the working directory; pass them to `from_pretrained`. A wheel install
    does not ship `checkpoints/` (about 14 MB; the package holds code only): there, set
    LLAMAGEN_CORE2_CHECKPOINTS to a copy of the repository's `checkpoints/` directory. A missing GPT or VQ
    raises CheckpointError naming the path looked at and this way out.
Nothing here imports torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError

VQ_DIR, GPT_DIR, WEAK_DIR, EVALUATOR_DIR = "world_vq", "world_gpt", "world_weak", "world_evaluator"
ENV = "LLAMAGEN_CORE2_CHECKPOINTS"


def default_checkpoint_dir() -> Path:
    env = os.environ.get(ENV)
    return Path(env).expanduser().absolute() if env else Path(__file__).resolve().parents[2] / "checkpoints"


@dataclass(frozen=True)
class ShippedPaths:
    root: Path
    gpt: Path
    vq: Path
    weak: Optional[Path]
    evaluator: Optional[Path]


def shipped_paths(checkpoint_dir=None) -> ShippedPaths:
    """Absolute paths of the shipped mini-world models (see the module docstring)."""
    root = Path(checkpoint_dir).expanduser().absolute() if checkpoint_dir is not None else default_checkpoint_dir()
    for name in (GPT_DIR, VQ_DIR):
        if not (root / name / "config.json").is_file():
            raise CheckpointError(
                f"the shipped mini-world models are not at {root / name} (no config.json): they are part of a source "
                f"checkout (checkpoints/, with `pip install -e .`), not of a wheel install; set {ENV} to a copy "
                f"of the repository's checkpoints/ directory")

    def optional(name: str) -> Optional[Path]:
        return root / name if (root / name / "config.json").is_file() else None

    return ShippedPaths(root=root, gpt=root / GPT_DIR, vq=root / VQ_DIR, weak=optional(WEAK_DIR),
                        evaluator=optional(EVALUATOR_DIR))
