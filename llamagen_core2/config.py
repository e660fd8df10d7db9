"""Model configurations and named presets (LlamaGen GPT-B ... GPT-3B, VQ-8 / VQ-16).

Every preset is a plain dict of field values; `GPTConfig.from_preset(name, **overrides)` and
`VQConfig.from_preset(name, **overrides)` build a config and let tests override any field
(dim, n_layer, ...) to make tiny models. Facts: shared/DESIGN.md §3.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import InvalidArgument


def round_up(n: int, multiple: int) -> int:
    return n if n % multiple == 0 else n + multiple - n % multiple


# name -> (n_layer, n_head, dim); params column of DESIGN §3 for reference.
GPT_PRESETS: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 111M
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 343M
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 775M
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1.4B
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3.1B, head_dim 100
}

# Task defaults: c2i has one class token, t2i 120 caption tokens of FLAN-T5-XL width.
TASK_DEFAULTS: dict[str, dict] = {
    "c2i": dict(model_type="c2i", cls_token_num=1),
    "t2i": dict(model_type="t2i", cls_token_num=120, caption_dim=2048),
}


class DictConfig:
    """Dict round trip for the config dataclasses (config.json files); unknown fields are refused by name."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgument(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)


@dataclass
class GPTConfig(DictConfig):
    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 16384
    model_type: str = "c2i"  # "c2i" (class ids) or "t2i" (T5 caption features)
    num_classes: int = 1000  # c2i: the table has num_classes + 1 rows, the last is the null class
    caption_dim: int = 2048  # t2i: width of the caption features
    cls_token_num: int = 1  # length of the condition prefix
    image_size: int = 256
    downsample: int = 16  # VQ downsampling factor: grid = image_size // downsample
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    preset: str | None = None  # the preset this config came from, for messages only

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise InvalidArgument(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        for name in ("dim", "n_layer", "n_head", "vocab_size", "cls_token_num", "image_size", "downsample"):
            if int(getattr(self, name)) <= 0:
                raise InvalidArgument(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.dim % self.n_head:
            raise InvalidArgument(f"dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise InvalidArgument(f"head_dim = dim / n_head must be even for RoPE, got {self.head_dim}")
        if self.image_size % self.downsample:
            raise InvalidArgument(
                f"image_size ({self.image_size}) must be divisible by downsample ({self.downsample})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return round_up(hidden, self.multiple_of)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size ** 2

    @property
    def max_seq_len(self) -> int:
        # The last image token is never fed back, but keeping its slot costs nothing.
        return self.cls_token_num + self.num_image_tokens

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """`name` is a preset ("GPT-B", ...) optionally suffixed "-t2i"; any field can be overridden."""
        suffixed = name.endswith("-t2i")
        base = name[: -len("-t2i")] if suffixed else name
        task = overrides.get("model_type", "t2i" if suffixed else "c2i")
        if base not in GPT_PRESETS:
            raise InvalidArgument(
                f"unknown GPT preset {name!r}; allowed: {sorted(GPT_PRESETS)} (optionally with '-t2i')")
        if task not in TASK_DEFAULTS:
            raise InvalidArgument(f"model_type must be 'c2i' or 't2i', got {task!r}")
        values = {**GPT_PRESETS[base], **TASK_DEFAULTS[task], "preset": name, **overrides}
        return cls.from_dict(values)


VQ_PRESETS: dict[str, dict] = {
    "VQ-16": dict(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": dict(ch_mult=(1, 2, 2, 4)),
}


@dataclass
class VQConfig(DictConfig):
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    ch: int = 128
    z_channels: int = 256
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    dropout: float = 0.0
    preset: str | None = None

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        for name in ("codebook_size", "codebook_embed_dim", "ch", "z_channels", "num_res_blocks"):
            if int(getattr(self, name)) <= 0:
                raise InvalidArgument(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.ch_mult:
            raise InvalidArgument("ch_mult must list at least one level")
        for width in [self.ch * m for m in self.ch_mult] + [self.z_channels]:
            if width % self.norm_groups:
                raise InvalidArgument(
                    f"every channel width must be divisible by norm_groups ({self.norm_groups}); got {width}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "VQConfig":
        if name not in VQ_PRESETS:
            raise InvalidArgument(f"unknown VQ preset {name!r}; allowed: {sorted(VQ_PRESETS)}")
        return cls.from_dict({**VQ_PRESETS[name], "preset": name, **overrides})
