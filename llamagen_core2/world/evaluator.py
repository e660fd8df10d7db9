"""Mini-world evaluator: a small CNN classifier plus a Fréchet distance on its penultimate features.

Contract:
  * `Evaluator(num_classes, feature_dim=64)`: `features(images [B, 3, H, W] in [-1, 1]) -> [B, F]`
    (the penultimate layer, post-ReLU) and `forward(images) -> logits [B, num_classes]`.
    It is trained on real dataset images only (`train_evaluator.py`).
  * `Evaluator.from_pretrained(dir)` / `save_pretrained(dir)`: safetensors + config.json
    {"kind": "world_evaluator", "config": {...}}, strict key/shape checks.
  * `frechet_distance(feats_a [N, F], feats_b [M, F]) -> float`: the FID formula
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) in float64. The matrix square root
    term is computed from the eigenvalues of S_a^{1/2} S_b S_a^{1/2} (symmetric PSD, so the
    eigen-decomposition is stable), which equals tr((S_a S_b)^{1/2}) without scipy's sqrtm.
  * `class_accuracy(evaluator, images, labels) -> float` and `extract_features(...)` run in
    batches under no_grad.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import CheckpointError, InvalidArgument
from ..io.checkpoint import read_config, read_state_dict, save_pretrained as save_state_pretrained, validate_state_dict


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2))


class Evaluator(nn.Module):
    def __init__(self, num_classes: int, feature_dim: int = 64, width: int = 32):
        super().__init__()
        if int(num_classes) < 2 or int(feature_dim) < 1 or int(width) < 8 or int(width) % 8:
            raise InvalidArgument(
                f"Evaluator needs num_classes >= 2, feature_dim >= 1, width a multiple of 8 >= 8; "
                f"got {num_classes}, {feature_dim}, {width}")
        self.config = dict(num_classes=int(num_classes), feature_dim=int(feature_dim), width=int(width))
        self.trunk = nn.Sequential(
            _conv_block(3, width), _conv_block(width, 2 * width), _conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 24x24 -> 3x3 -> [B, 4w]
        self.embed = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, F]
        return self.embed(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, C]
        return self.head(self.features(images))

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        return save_state_pretrained(directory, self.state_dict(), {"kind": "world_evaluator", "config": self.config})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Evaluator":
        saved = read_config(directory)
        if saved.get("kind") != "world_evaluator" or not isinstance(saved.get("config"), dict):
            raise CheckpointError(f"{directory}/config.json is not a world evaluator config "
                                  f"(expected kind 'world_evaluator', got {saved.get('kind')!r})")
        model = cls(**saved["config"])
        expected = model.state_dict()  # shapes and dtypes checked against these
        state = validate_state_dict(read_state_dict(directory), expected, what="world evaluator")
        model.load_state_dict(state, strict=True)
        return model.eval()


@torch.no_grad()
def extract_features(evaluator: Evaluator, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """images [N, 3, H, W] in [-1, 1] -> (features [N, F], logits [N, C]) in eval mode."""
    was_training = evaluator.training
    evaluator.eval()
    feats, logits = [], []
    for chunk in images.split(batch_size):
        f = evaluator.features(chunk.float())
        feats.append(f)
        logits.append(evaluator.head(f))
    evaluator.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def class_accuracy(evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the evaluator assigns to their intended class."""
    _, logits = extract_features(evaluator, images)
    return float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean())


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """features [N, F] -> (mean [F], covariance [F, F]) in float64."""
    x = np.asarray(features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise InvalidArgument(f"features must be [N, F] with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh; tiny negative eigenvalues from round-off are clipped."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})."""
    sqrt_a = _sqrt_psd(cov_a)
    # S_a S_b is similar to S_a^{1/2} S_b S_a^{1/2} (symmetric PSD), so their square roots share a trace.
    middle = sqrt_a @ cov_b @ sqrt_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] and [M, F]."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))
