"""Mini world: a procedural class-conditional dataset, its evaluator, training scripts, and the demo on the
shipped checkpoints (see checkpoints/README.md). `shipped_paths()` gives the shipped models' paths from any
working directory."""
from .paths import ShippedPaths, default_checkpoint_dir, shipped_paths

__all__ = ["ShippedPaths", "default_checkpoint_dir", "shipped_paths"]
