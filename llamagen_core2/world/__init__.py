"""Mini world: a procedural class-conditional dataset, its evaluator, training scripts, and the demo on the
shipped checkpoints (see checkpoints/README.md)."""
