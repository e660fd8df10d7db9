"""Procedural class-conditional image world ("mini world"): no download, deterministic from a seed.

Contract:
  * `CLASS_NAMES` lists the classes; a class is a (shape, colour) pair, e.g. "red circle".
    Shapes and colours are each shared by several classes, so a model that under-uses the class
    condition produces the right shape in the wrong colour (or vice versa) — exactly the failure
    classifier-free guidance fixes. `NUM_CLASSES == len(CLASS_NAMES)`.
  * `render(labels [B] LongTensor, generator) -> images [B, 3, S, S]` float32 in [-1, 1]
    (S = IMAGE_SIZE = 24). Intra-class variation: position, size, rotation, colour jitter,
    a smooth background (random grey level, tint and brightness gradient).
  * `make_dataset(num_per_class, seed) -> (images, labels)`; the same arguments give bit-identical
    tensors (CPU). Labels are class-balanced and shuffled.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument, check_int

IMAGE_SIZE = 24  # 24x24 RGB: a ds-4 VQ gives a 6x6 = 36-token grid, cheap enough to train on a shared 2-core CPU
SUPERSAMPLE = 2  # shapes are rendered at 2x and box-filtered down, for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "plus")
COLOURS = {  # name -> nominal RGB in [0, 1]
    "red": (0.90, 0.15, 0.12),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
# 4 shapes x 3 colours; yellow appears only with two shapes so colours are unevenly shared.
CLASSES: tuple[tuple[str, str], ...] = (
    ("circle", "red"), ("circle", "green"), ("circle", "blue"),
    ("square", "red"), ("square", "green"), ("square", "blue"),
    ("triangle", "red"), ("triangle", "green"), ("triangle", "blue"),
    ("plus", "red"), ("plus", "green"), ("plus", "blue"),
    ("circle", "yellow"), ("plus", "yellow"),
)
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for s, c in CLASSES)
NUM_CLASSES = len(CLASSES)


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _shape_masks(shape_ids: torch.Tensor, cx, cy, radius, angle, size: int) -> torch.Tensor:
    """Soft coverage [B, 1, size, size] in [0, 1] for each image's shape; params are [B] tensors
    in units of the final image (coordinates 0..IMAGE_SIZE)."""
    scale = size / IMAGE_SIZE
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / scale  # pixel centres
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # [size, size]
    dx = x[None] - cx[:, None, None]
    dy = y[None] - cy[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = cos * dx + sin * dy  # rotated frame
    v = -sin * dx + cos * dy
    r = radius[:, None, None]

    circle = (dx * dx + dy * dy) <= r * r
    square = torch.maximum(u.abs(), v.abs()) <= 0.82 * r
    # Equilateral triangle with circumradius r: inside all three edge half-planes.
    tri = torch.ones_like(circle)
    for k in range(3):
        theta = 2 * math.pi * k / 3 + math.pi / 2
        tri &= (u * math.cos(theta) + v * math.sin(theta)) >= -0.6 * r  # a bit larger than inscribed
    arm = 0.33 * r
    plus = ((u.abs() <= arm) & (v.abs() <= r)) | ((v.abs() <= arm) & (u.abs() <= r))

    stacked = torch.stack([circle, square, tri, plus], dim=1).float()  # [B, 4, size, size]
    mask = stacked.gather(1, shape_ids[:, None, None, None].expand(-1, 1, size, size))
    return F.avg_pool2d(mask, SUPERSAMPLE) if SUPERSAMPLE > 1 else mask


def _backgrounds(n: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth, desaturated backgrounds [n, 3, S, S] in [0, 1] that never look like a class colour:
    a random grey level with a slight tint and a linear brightness gradient of random direction."""
    s = IMAGE_SIZE
    grey = _uniform(generator, n, 0.25, 0.65)
    tint = (torch.rand(n, 3, generator=generator) - 0.5) * 0.12
    base = (grey[:, None] + tint).clamp(0, 1)  # [n, 3]
    angle = _uniform(generator, n, 0, 2 * math.pi)
    amp = _uniform(generator, n, 0.0, 0.15)
    coords = torch.linspace(-1, 1, s)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    ramp = amp[:, None, None] * (torch.cos(angle)[:, None, None] * x + torch.sin(angle)[:, None, None] * y)
    return (base[:, :, None, None] + ramp[:, None]).clamp(0, 1)


def render(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """labels [B] in [0, NUM_CLASSES) -> images [B, 3, 24, 24] float32 in [-1, 1]."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.dim() != 1:
        raise InvalidArgument(f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise InvalidArgument(f"labels must be in [0, {NUM_CLASSES}), got range "
                              f"[{labels.min().item()}, {labels.max().item()}]")
    n = labels.numel()
    shape_of_class = torch.tensor([SHAPES.index(s) for s, _ in CLASSES])
    colour_table = torch.tensor([COLOURS[c] for _, c in CLASSES])  # [C, 3]

    background = _backgrounds(n, generator)
    radius = _uniform(generator, n, 5.5, 8.5)
    margin = radius * 0.9
    cx = margin + torch.rand(n, generator=generator) * (IMAGE_SIZE - 2 * margin)
    cy = margin + torch.rand(n, generator=generator) * (IMAGE_SIZE - 2 * margin)
    angle = _uniform(generator, n, 0, 2 * math.pi)
    colour = colour_table[labels] + (torch.rand(n, 3, generator=generator) - 0.5) * 0.16
    colour = (colour * _uniform(generator, n, 0.8, 1.1)[:, None]).clamp(0, 1)  # brightness jitter
    mask = _shape_masks(shape_of_class[labels], cx, cy, radius, angle, IMAGE_SIZE * SUPERSAMPLE)
    # A faint shading gradient over the shape, so fills are not perfectly flat.
    shade = 1.0 + 0.08 * torch.randn(n, 1, 1, 1, generator=generator) * torch.linspace(-1, 1, IMAGE_SIZE)[None, None, :, None]
    shape_rgb = (colour[:, :, None, None] * shade).clamp(0, 1)
    image = mask * shape_rgb + (1 - mask) * background
    return image * 2 - 1


def make_dataset(num_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced, shuffled dataset: images [N, 3, 24, 24] in [-1, 1], labels [N], N = num_per_class * NUM_CLASSES."""
    check_int("num_per_class", num_per_class, minimum=1)
    generator = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(int(num_per_class))
    labels = labels[torch.randperm(labels.numel(), generator=generator)]
    images = torch.cat([render(chunk, generator) for chunk in labels.split(4096)])
    return images, labels
