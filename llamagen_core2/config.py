"""Model configurations and named presets (LlamaGen GPT-B ... GPT-3B, VQ-8 / VQ-16).

Every preset is a plain dict of field values; `GPTConfig.from_preset(name, **overrides)` and
`VQConfig.from_preset(name, **overrides)` build a config and let tests override any field
(dim, n_layer, ...) to make tiny models. Facts: docs/design.md#llamagen-compatibility.

`DictConfig` is the one dict/JSON round trip of every model config (GPT, VQ, weak model, noise model):
`from_dict` refuses unknown fields and checks every value against the field's annotated type (an int field
takes only integers, a float field only finite numbers, ...), naming the field; `from_saved(d, source)` does
the same for a config read from a file and names the file (CheckpointError).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from dataclasses import dataclass

from .errors import CheckpointError, InvalidArgument


def round_up(n: int, multiple: int) -> int:
    return n if n % multiple == 0 else n + multiple - n % multiple


# name -> (n_layer, n_head, dim); parameter counts as in docs/design.md#llamagen-compatibility.
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


def _type_error(annotation, value):
    """None if `value` fits the (resolved) field annotation, else a phrase saying what was expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        if value is None and type(None) in args:
            return None
        expected = [_type_error(a, value) for a in args if a is not type(None)]
        return None if any(e is None for e in expected) else " or ".join(expected) + \
            (" or null" if type(None) in args else "")
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
        return None if ok else "a finite number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if annotation is tuple or origin is tuple:
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        return None if ok else "a list of integers"
    return None


class DictConfig:
    """Dict round trip for the config dataclasses (config.json files); unknown fields and values of the wrong
    type are refused by name."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise InvalidArgument(f"a {cls.__name__} must be a mapping of field names to values, got "
                                  f"{type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidArgument(f"unknown {cls.__name__} fields {unknown}; allowed: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        for name, value in d.items():
            expected = _type_error(hints[name], value)
            if expected is not None:
                raise InvalidArgument(f"{cls.__name__} field {name!r} must be {expected}, got {value!r}")
        return cls(**d)

    @classmethod
    def from_saved(cls, d, source) -> "DictConfig":
        """`from_dict` for a config read from a file: any problem is a CheckpointError naming `source`."""
        try:
            return cls.from_dict(d)
        except InvalidArgument as e:
            raise CheckpointError(f"{source}: {e}") from None


def check_gpt_preset(name: str) -> str:
    """A known GPT preset name (optionally suffixed '-t2i'); InvalidArgument listing the allowed ones."""
    base = name[: -len("-t2i")] if isinstance(name, str) and name.endswith("-t2i") else name
    if base not in GPT_PRESETS:
        raise InvalidArgument(f"unknown GPT preset {name!r}; allowed: {sorted(GPT_PRESETS)} (optionally with "
                              f"'-t2i')")
    return name


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
        for name in ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "caption_dim", "cls_token_num",
                     "image_size", "downsample", "multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_base") + (() if self.ffn_dim_multiplier is None else ("ffn_dim_multiplier",)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                    or value <= 0:
                raise InvalidArgument(f"{name} must be a finite number > 0, got {value!r}")
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

    def preset_differences(self, name: str) -> list[str]:
        """Fields on which this config disagrees with preset `name` ("dim: 768 vs preset 1280", ...)."""
        check_gpt_preset(name)
        base = name[: -len("-t2i")] if name.endswith("-t2i") else name
        want = {**GPT_PRESETS[base], "model_type": "t2i" if name.endswith("-t2i") else "c2i"}
        return [f"{k}: {getattr(self, k)!r} vs preset {v!r}" for k, v in want.items() if getattr(self, k) != v]

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
        check_gpt_preset(name)
        suffixed = name.endswith("-t2i")
        base = name[: -len("-t2i")] if suffixed else name
        task = overrides.get("model_type", "t2i" if suffixed else "c2i")
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
        if not isinstance(self.ch_mult, (list, tuple)) or not all(
                isinstance(m, numbers.Integral) and not isinstance(m, bool) and m > 0 for m in self.ch_mult):
            raise InvalidArgument(f"ch_mult must be a list of positive integers, got {self.ch_mult!r}")
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        for name in ("codebook_size", "codebook_embed_dim", "ch", "z_channels", "num_res_blocks", "in_channels",
                     "out_channels", "norm_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) \
                or not 0.0 <= self.dropout < 1.0:
            raise InvalidArgument(f"dropout must be a number in [0, 1), got {self.dropout!r}")
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
