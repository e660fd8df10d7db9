"""Image conversions between the VQ model's float range and uint8 pixels, grids, PNG files.

Contract (facts: docs/design.md#images and LlamaGen's sampling / code-extraction scripts):
  * `to_uint8(images [B, 3, H, W] float ~[-1, 1]) -> np.uint8 [B, H, W, 3]`, exactly as LlamaGen:
    clamp(127.5 * x + 128, 0, 255) then a truncating cast to uint8 (so -1 -> 0, 0 -> 128, 1 -> 255).
  * `to_model_range(uint8 [B, H, W, 3] or [H, W, 3]) -> float32 [B, 3, H, W]` in [-1, 1], the
    inverse used when encoding datasets: (u / 255 - 0.5) / 0.5 like ToTensor + Normalize(0.5, 0.5).
  * `center_crop(pil, size)`: ADM-style resize (box halvings, then bicubic) + centre crop, as
    LlamaGen prepares images before tokenizing; `from_pil(images, size=None)` chains it all.
  * `to_pil_images`, `make_grid(images_uint8 [B, H, W, 3], nrow, padding=2)` (torchvision layout:
    `nrow` images per row), `save_png(array, path)` written atomically (files.atomic_write: temp file +
    os.replace, with the user's umask).
  * `labelled_grid(rows, row_labels, column_labels=(), scale=1, label_width=None)`: the labelled sheet of
    `llamagen-core2 demo` and `generate` -- one row of tiles per entry, its label on the left, optional
    header labels over groups of columns, every tile upscaled `scale` x (nearest neighbour), on white.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import InvalidArgument, check_int
from .files import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """images [B, 3, H, W] float (~[-1, 1]) -> uint8 array [B, H, W, 3]."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise InvalidArgument(f"images must be a float tensor [B, 3, H, W] in ~[-1, 1], got {type(images).__name__}"
                              f"{' ' + str(images.dtype) if isinstance(images, torch.Tensor) else ''}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidArgument(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
    # Computed in fp32 (LlamaGen's VQ decoder runs in fp32); NaN has no pixel value, so refuse it.
    x = images.detach().float()
    if bool(torch.isnan(x).any()):
        raise InvalidArgument("images contain NaN values; cannot convert to pixels")
    pixels = torch.clamp(127.5 * x + 128.0, 0, 255)
    return pixels.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def _as_uint8_batch(images) -> np.ndarray:
    """Float tensor [B, 3, H, W] or uint8 [B, H, W, 3] / [H, W, 3] -> uint8 [B, H, W, 3]."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        return to_uint8(images)
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype != np.uint8:
        raise InvalidArgument(
            f"images must be a float tensor [B, 3, H, W] or a uint8 array [B, H, W, 3], got dtype {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise InvalidArgument(f"uint8 images must have shape [B, H, W, 3] or [H, W, 3], got {list(arr.shape)}")
    return arr


def to_pil_images(images) -> list[Image.Image]:
    """Float tensor [B, 3, H, W] (~[-1, 1]) or uint8 [B, H, W, 3] -> list of RGB PIL images."""
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in _as_uint8_batch(images)]


def make_grid(images_uint8, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one uint8 image [rows*(H+p)+p, cols*(W+p)+p, 3], `nrow` images per row."""
    batch = _as_uint8_batch(images_uint8)
    nrow = check_int("nrow", nrow, minimum=1)
    padding = check_int("padding", padding, minimum=0)
    if not 0 <= int(pad_value) <= 255:
        raise InvalidArgument(f"pad_value must be in [0, 255], got {pad_value!r}")
    b, h, w, c = batch.shape
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i, image in enumerate(batch):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


GRID_PAD = 2  # pixels between tiles
HEADER_HEIGHT = 14  # the header row: PIL's default font is about 11 px tall


def labelled_grid(rows: Sequence, row_labels: Sequence[str], *, column_labels: Sequence[tuple[str, int]] = (),
                  scale: int = 1, label_width: Optional[int] = None) -> np.ndarray:
    """rows[r]: uint8 tiles [k_r, h, w, 3] (rows may be shorter than the widest) -> one uint8 image [H, W, 3].

    row_labels[r] is written left of row r, in a column `label_width` px wide (default: the widest label + 6);
    column_labels are (text, span) pairs written in a header row over `span` tile columns each (no header row
    when empty)."""
    if len(rows) != len(row_labels) or not rows:
        raise InvalidArgument(f"labelled_grid needs one label per row and at least one row, got {len(rows)} rows "
                              f"and {len(row_labels)} labels")
    scale = check_int("scale", scale, minimum=1)
    tiles = [_as_uint8_batch(r) for r in rows]
    h, w = tiles[0].shape[1:3]
    if any(t.shape[1:3] != (h, w) for t in tiles):
        raise InvalidArgument(f"labelled_grid tiles must all be {h}x{w}, got {sorted({t.shape[1:3] for t in tiles})}")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if label_width is None:
        label_width = int(max(measure.textlength(str(t)) for t in row_labels)) + 6
    header = HEADER_HEIGHT if column_labels else 0
    cell_w, cell_h = w * scale + GRID_PAD, h * scale + GRID_PAD
    columns = max(len(t) for t in tiles)
    canvas = Image.new("RGB", (label_width + columns * cell_w + GRID_PAD, header + len(tiles) * cell_h + GRID_PAD),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    first = 0
    for text, span in column_labels:
        draw.text((label_width + first * cell_w + GRID_PAD, 1), str(text), fill=(0, 0, 0))
        first += span
    for r, (row, label) in enumerate(zip(tiles, row_labels)):
        if label:
            draw.text((2, header + r * cell_h + cell_h // 2 - 6), str(label), fill=(0, 0, 0))
        for k, tile in enumerate(row):
            image = Image.fromarray(np.ascontiguousarray(tile)).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(image, (label_width + k * cell_w + GRID_PAD, header + r * cell_h + GRID_PAD))
    return np.asarray(canvas)


def save_png(array, path: str | os.PathLike) -> Path:
    """Write a uint8 [H, W, 3] (or [H, W]) array as PNG atomically; returns the path."""
    arr = array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise InvalidArgument(
            f"save_png needs a uint8 array [H, W], [H, W, 3] or [H, W, 4], got {arr.dtype} {list(arr.shape)}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    image = Image.fromarray(np.ascontiguousarray(arr))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))  # readers never see a half-written file


def to_model_range(images) -> torch.Tensor:
    """uint8 [B, H, W, 3] or [H, W, 3] (array or tensor) -> float32 [B, 3, H, W] in [-1, 1]."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        raise InvalidArgument("to_model_range expects uint8 pixels [B, H, W, 3]; got a float tensor")
    batch = _as_uint8_batch(images)
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()
    # Same operation order as torchvision ToTensor + Normalize(mean=0.5, std=0.5).
    return x.div(255).sub(0.5).div(0.5)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM / LlamaGen centre crop: halve with BOX while the short side >= 2*size, bicubic-resize
    the short side to `size`, then cut the central size x size square."""
    size = check_int("size", size, minimum=1)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def from_pil(images: Image.Image | Sequence[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL image(s) -> float32 [B, 3, H, W] in [-1, 1]; with `size`, centre-cropped to size x size."""
    items = [images] if isinstance(images, Image.Image) else list(images)
    if not items or not all(isinstance(im, Image.Image) for im in items):
        raise InvalidArgument("images must be a PIL image or a non-empty sequence of PIL images")
    items = [im.convert("RGB") for im in items]
    if size is not None:
        items = [center_crop(im, size) for im in items]
    shapes = {im.size for im in items}
    if len(shapes) != 1:
        raise InvalidArgument(f"images must all have the same size (pass size= to centre-crop), got {sorted(shapes)}")
    return to_model_range(np.stack([np.asarray(im, dtype=np.uint8) for im in items]))
