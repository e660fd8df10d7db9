"""LlamaGen-compatible VQ image tokenizer: images <-> raster-ordered codebook indices.

Contract (facts: docs/design.md#vq-tokenizer; module layout and key names match
LlamaGen's `tokenizer/tokenizer_image/vq_model.py`, so official `vq_ds16_c2i.pt`,
`vq_ds16_t2i.pt` and `vq_ds8_c2i.pt` load unchanged):

  * `VQModel.encode(images [B, 3, H, W] in [-1, 1]) -> codes LongTensor [B, N]`, N = (H/ds)*(W/ds),
    raster order (row-major over the latent grid). Both the latent vectors and the codebook are
    l2-normalised before the nearest-neighbour search (official `codebook_l2_norm=True`).
  * `VQModel.decode_codes(codes [B, N], grid=None) -> images [B, 3, H, W]` (~[-1, 1]): lookup of
    the l2-normalised codebook, reshaped NCHW in raster order -> `post_quant_conv` -> decoder.
    `grid=(h, w)` is needed only when N is not a perfect square.
  * `VQModel.from_pretrained(path, preset=None (VQ-16), **overrides)` loads an official `.pt`, a
    `.safetensors` file or a `save_pretrained` directory with strict key/shape checks;
    `save_pretrained(directory)` writes safetensors + config.json {"kind": "vq", "config": ...}.

Architecture (per official code): encoder = conv_in, one level per ch_mult entry with
`num_res_blocks` ResBlocks (+ one attention block after each at the deepest level) and a
stride-2 downsample on all but the last level, mid = res/attn/res, GroupNorm, swish, conv_out
to z_channels. The decoder mirrors it from the deepest level up with `num_res_blocks + 1`
ResBlocks per level and a nearest-x2 upsample on all but the last. GroupNorm eps is 1e-6.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VQ_PRESETS, VQConfig
from ..errors import CheckpointError, InvalidArgument
from ..io.checkpoint import read_config, read_state_dict, save_pretrained as save_state_pretrained, validate_state_dict

# Official checkpoints carry a 65536-long codebook-usage ring buffer (training statistics only).
CODEBOOK_USAGE_WINDOW = 65536
# Bound on the [rows, codebook_size] distance matrix built per chunk in `nearest_codes`.
DISTANCE_CHUNK_ELEMENTS = 1 << 24


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a (1x1 if needed) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        # Official blocks use a 1x1 "nin" shortcut (never the 3x3 conv_shortcut) when widths differ.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C_in, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, 1x1-conv projections, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(t):  # [B, C, H, W] -> [B, 1, H*W, C]: one head of width C
            return t.reshape(b, c, height * width).transpose(1, 2).unsqueeze(1)

        # Default SDPA scale is C**-0.5, the official softmax(q k^T / sqrt(C)) v.
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right/bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        # Asymmetric padding (left 0, right 1, top 0, bottom 1) as in the official model.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour x2, then a 3x3 conv with padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `res.{j}`, `attn.{j}` (deepest level only), optional resampler."""

    def __init__(self, widths: list[tuple[int, int]], with_attn: bool, groups: int, dropout: float):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(i, o, groups, dropout) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o, groups) for _, o in widths) if with_attn else nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for j, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h


def _mid_block(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResBlock(channels, channels, groups, dropout), AttnBlock(channels, groups),
                          ResBlock(channels, channels, groups, dropout)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, p = cfg.norm_groups, cfg.dropout
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, stride=1, padding=1)
        self.conv_blocks = nn.ModuleList()
        width = cfg.ch
        last = len(cfg.ch_mult) - 1
        for i, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            level = Level([(width if j == 0 else out, out) for j in range(cfg.num_res_blocks)], i == last, g, p)
            width = out
            if i != last:
                level.downsample = Downsample(width)
            self.conv_blocks.append(level)
        self.mid = _mid_block(width, g, p)
        self.norm_out = _group_norm(width, g)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 3, H, W] -> [B, z_channels, H/ds, W/ds]
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        g, p = cfg.norm_groups, cfg.dropout
        width = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, stride=1, padding=1)
        self.mid = _mid_block(width, g, p)
        self.conv_blocks = nn.ModuleList()  # deepest level first
        last = len(cfg.ch_mult) - 1
        for i in reversed(range(len(cfg.ch_mult))):
            out = cfg.ch * cfg.ch_mult[i]
            level = Level([(width if j == 0 else out, out) for j in range(cfg.num_res_blocks + 1)], i == last, g, p)
            width = out
            if i != 0:
                level.upsample = Upsample(width)
            self.conv_blocks.append(level)
        self.norm_out = _group_norm(width, g)
        self.conv_out = nn.Conv2d(width, cfg.out_channels, 3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # z: [B, z_channels, h, w] -> [B, 3, h*ds, w*ds]
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Codebook `embedding.weight` [K, D] (l2-normalised whenever used) + the usage buffer."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.normal_(self.embedding.weight)
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USAGE_WINDOW))

    def normalized_codebook(self) -> torch.Tensor:  # [K, D], fp32
        return F.normalize(self.embedding.weight.float(), p=2, dim=-1)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> codes [B, h*w] (raster order) of the nearest l2-normalised entry."""
        b, d, height, width = z.shape
        flat = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, d), p=2, dim=-1)
        codebook = self.normalized_codebook()
        codebook_sq = codebook.pow(2).sum(dim=1)
        rows = max(1, DISTANCE_CHUNK_ELEMENTS // self.codebook_size)
        codes = []
        for chunk in flat.split(rows):
            # Same expansion as the official search: |z|^2 + |e|^2 - 2 z.e, so ties break alike.
            dist = chunk.pow(2).sum(dim=1, keepdim=True) + codebook_sq - 2.0 * chunk @ codebook.t()
            codes.append(dist.argmin(dim=1))
        return torch.cat(codes).reshape(b, height * width)

    def lookup(self, codes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """codes [B, h*w] (raster order, already validated) -> latents [B, D, h, w] in fp32."""
        height, width = grid
        vectors = F.embedding(codes, self.normalized_codebook())  # [B, h*w, D]
        return vectors.reshape(codes.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    # ----------------------------------------------------------------- encode / decode
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> codes LongTensor [B, (H/ds)*(W/ds)], raster order."""
        self._check_images(images)
        weight = self.quant_conv.weight
        latents = self.quant_conv(self.encoder(images.to(device=weight.device, dtype=weight.dtype)))
        return self.quantize.nearest_codes(latents)

    def lookup_codes(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Validated codebook lookup: codes [B, N] -> quantized latents [B, D, h, w] (fp32)."""
        grid = self._check_codes(codes, grid)
        return self.quantize.lookup(codes.to(self.quantize.embedding.weight.device, torch.long), grid)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """codes [B, N] in [0, codebook_size) -> images [B, 3, h*ds, w*ds] (~[-1, 1])."""
        latents = self.lookup_codes(codes, grid)
        weight = self.post_quant_conv.weight
        return self.decoder(self.post_quant_conv(latents.to(weight.dtype)))

    def check_matches(self, gpt_config) -> None:
        """This tokenizer can decode the GPT's tokens: codebook = vocabulary, same downsampling factor."""
        c = gpt_config
        if self.config.codebook_size != c.vocab_size or self.downsample != c.downsample:
            raise InvalidArgument(f"the VQ model (codebook {self.config.codebook_size}, downsample {self.downsample}) "
                                  f"does not match the GPT (vocab {c.vocab_size}, downsample {c.downsample})")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(images)), [B, 3, H, W] -> [B, 3, H, W]."""
        h, w = images.shape[-2] // self.downsample, images.shape[-1] // self.downsample
        return self.decode_codes(self.encode(images), grid=(h, w))

    def _check_images(self, images) -> None:
        ds, c = self.downsample, self.config.in_channels
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise InvalidArgument(f"images must be a float tensor [B, {c}, H, W] in [-1, 1], got "
                                  f"{type(images).__name__}{'' if not isinstance(images, torch.Tensor) else ' ' + str(images.dtype)}")
        if images.ndim != 4 or images.shape[1] != c or images.shape[0] == 0:
            raise InvalidArgument(f"images must have shape [B >= 1, {c}, H, W], got {list(images.shape)}")
        height, width = images.shape[-2:]
        if height == 0 or width == 0 or height % ds or width % ds:
            raise InvalidArgument(
                f"images height and width must be positive multiples of the downsampling factor {ds}, "
                f"got {height}x{width}")
        if not bool(torch.isfinite(images).all()):
            raise InvalidArgument("images contain NaN/inf values; they have no nearest code")

    def _check_codes(self, codes, grid) -> tuple[int, int]:
        k = self.config.codebook_size
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            raise InvalidArgument(f"codes must be an integer tensor [B, N] with values in [0, {k - 1}], got "
                                  f"{type(codes).__name__}{' ' + str(codes.dtype) if isinstance(codes, torch.Tensor) else ''}")
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise InvalidArgument(f"codes must have shape [B >= 1, N >= 1], got {list(codes.shape)}")
        n = codes.shape[1]
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise InvalidArgument(
                    f"codes has N={n} tokens, not a perfect square; pass grid=(h, w) with h * w == {n}")
            grid = (side, side)
        else:
            if (not isinstance(grid, (tuple, list)) or len(grid) != 2
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in grid)):
                raise InvalidArgument(f"grid must be a pair of positive ints (h, w), got {grid!r}")
            if grid[0] * grid[1] != n:
                raise InvalidArgument(f"grid {tuple(grid)} holds {grid[0] * grid[1]} tokens but codes has N={n}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= k:
            raise InvalidArgument(f"codes must lie in [0, {k - 1}] (codebook_size {k}), got min {lo}, max {hi}")
        return int(grid[0]), int(grid[1])

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, preset: str | None = None, *,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        filename: str | None = None, revision: str | None = None, cache_dir=None,
                        local_files_only: bool | None = None, **overrides) -> "VQModel":
        """Load weights strictly (see module docstring); the result is in eval mode.

        `path` is a local path or a Hub repo id (+ `filename=`, e.g. FoundationVision/LlamaGen's
        `vq_ds16_c2i.pt`), resolved by `hub.resolve`. A directory with config.json uses its config (plus
        `overrides`); a `preset` given for it must name a known preset with the same levels (ch_mult). Any other
        source builds `VQConfig.from_preset(preset or "VQ-16", **overrides)`.
        """
        from ..io.hub import resolve

        if preset is not None and preset not in VQ_PRESETS:
            raise InvalidArgument(f"unknown VQ preset {preset!r}; allowed: {sorted(VQ_PRESETS)}")
        path = resolve(path, filename=filename, allow_patterns=("*.json", "*.safetensors"), revision=revision,
                       cache_dir=cache_dir, local_files_only=local_files_only, what="VQ checkpoint")
        if path.is_dir() and (path / "config.json").is_file():
            saved = read_config(path)
            if saved.get("kind") != "vq" or not isinstance(saved.get("config"), dict):
                raise CheckpointError(
                    f"{path}/config.json is not a VQ tokenizer config (expected {{'kind': 'vq', 'config': {{...}}}}, "
                    f"got kind={saved.get('kind')!r})")
            config = VQConfig.from_saved({**saved["config"], **overrides}, path / "config.json")
            if preset is not None and tuple(VQ_PRESETS[preset]["ch_mult"]) != config.ch_mult:
                raise CheckpointError(f"preset {preset!r} does not match {path}/config.json: ch_mult "
                                      f"{list(config.ch_mult)} vs preset {list(VQ_PRESETS[preset]['ch_mult'])}")
        else:
            config = VQConfig.from_preset(preset or "VQ-16", **overrides)
        state = read_state_dict(path)
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()  # shapes and dtypes checked against these
        hint = _mismatch_hint(state, config) if set(state) != set(expected) or any(
            state[k].shape != s.shape for k, s in expected.items() if k in state) else ""
        state = validate_state_dict(state, expected, what=f"VQ model ({_describe(config)})", hint=hint)
        model.load_state_dict(state, strict=True, assign=True)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write model.safetensors + config.json ({"kind": "vq", "config": VQConfig.to_dict()})."""
        return save_state_pretrained(directory, self.state_dict(), {"kind": "vq", "config": self.config.to_dict()})


# --------------------------------------------------------------------- checkpoint diagnosis
def _describe(config: VQConfig) -> str:
    name = f"preset {config.preset!r}, " if config.preset else ""
    return (f"{name}ch_mult={list(config.ch_mult)}, ch={config.ch}, z_channels={config.z_channels}, "
            f"num_res_blocks={config.num_res_blocks}, codebook {config.codebook_size}x{config.codebook_embed_dim}")


def infer_vq_config(state: dict[str, torch.Tensor]) -> dict:
    """Best-effort guess of VQConfig fields from an official-layout state dict's keys and shapes."""
    guess: dict = {}
    levels = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k))}
    if "encoder.conv_in.weight" in state:
        guess["ch"] = int(state["encoder.conv_in.weight"].shape[0])
        guess["in_channels"] = int(state["encoder.conv_in.weight"].shape[1])
    if levels and "ch" in guess:
        widths = [state.get(f"encoder.conv_blocks.{i}.res.0.conv1.weight") for i in sorted(levels)]
        if all(w is not None for w in widths):
            guess["ch_mult"] = [int(w.shape[0]) // guess["ch"] for w in widths]
    elif levels:
        guess["num_levels"] = len(levels)
    res = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k))}
    if res:
        guess["num_res_blocks"] = len(res)
    if "encoder.conv_out.weight" in state:
        guess["z_channels"] = int(state["encoder.conv_out.weight"].shape[0])
    if "quantize.embedding.weight" in state:
        guess["codebook_size"], guess["codebook_embed_dim"] = (int(s) for s in state["quantize.embedding.weight"].shape)
    return guess


def _mismatch_hint(state: dict[str, torch.Tensor], config: VQConfig) -> str:
    guess = infer_vq_config(state)
    if not guess:
        return ("the checkpoint has no encoder/quantize keys of the LlamaGen VQ layout; is it a VQ tokenizer "
                "checkpoint (vq_ds16_c2i.pt, vq_ds16_t2i.pt, vq_ds8_c2i.pt)?")
    preset = next((name for name, p in VQ_PRESETS.items() if list(p["ch_mult"]) == guess.get("ch_mult")), None)
    differing = {k: v for k, v in guess.items()
                 if k not in ("ch_mult", "num_levels") and getattr(config, k, v) != v}
    parts = [f"{k}={v}" for k, v in guess.items()]
    advice = []
    if "ch_mult" in guess and guess["ch_mult"] != list(config.ch_mult):
        advice.append(f"preset={preset!r}" if preset else f"ch_mult={guess['ch_mult']}")
    advice += [f"{k}={v}" for k, v in differing.items()]
    text = f"The checkpoint looks like: {', '.join(parts)}"
    if "ch_mult" in guess:
        text += f" ({len(guess['ch_mult'])} levels, downsample {2 ** (len(guess['ch_mult']) - 1)}"
        text += f", preset {preset!r})" if preset else ")"
    if advice:
        text += f"; try from_pretrained(..., {', '.join(advice)})"
    return text
