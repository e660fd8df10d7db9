"""Triton kernels, installed as `llamagen_core2.kernels` (never a top-level `kernels` package)."""
