"""Guidance settings and the one mode table.

Contract:
  * `MODE_TABLE[mode]` says which predictions a per-token mode needs (cf. diffusers guiders'
    `_input_predictions`): the base model's uncond rows, the weak model, and the base head on the cond rows
    (fast mode samples the weak prediction alone, so the cond logits are never needed). Every place that asks
    "does this mode need X" asks this table (or the helpers below), nowhere else is it spelled. `MODE_IDS`
    numbers the modes for the fused kernel, in the table's order.
  * The effective-mode rule, next to the table and nowhere else: a CFG scale <= 1 means cond only (`cfg_is_cond`,
    `cfg_mixes` per row on the device, `effective_mode`: cfg -> cond; `reads_uncond`: whether mixing needs the
    unconditional prediction), and fast mode (out = w) samples the weak prediction as a plain cond row
    (`sampler_inputs`).
  * `GuidanceConfig` holds the knobs of one generation: mode or schedule, cfg_scale, cfg_interval, w2s_scale,
    temperature, top_k, top_p. It validates on construction (one clear InvalidArgument naming the field) and
    resolves to one mode per image token with `token_modes(num_tokens)` (cfg_interval and cfg_scale <= 1 turn
    CFG tokens into cond tokens, as in LlamaGen).
  * `Schedule` is a two-phase schedule (`first` mode for the first K tokens, `then` afterwards; K given as a count
    or a fraction of the image tokens, rounded), the CoRe^2 slow-then-fast / fast-then-slow refine schedules.
Scales may be Python numbers or per-row tensors [B] (generate() checks the batch size).
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ..errors import InvalidArgument, check_finite_scale, check_int, check_sampling_args


@dataclass(frozen=True)
class ModeSpec:
    uncond: bool  # the base model's unconditional rows
    weak: bool  # the CoRe^2 weak model's prediction
    cond_logits: bool  # the base head on the conditional rows (the cond hidden state is always computed)


MODE_TABLE: dict[str, ModeSpec] = {
    "cond": ModeSpec(uncond=False, weak=False, cond_logits=True),  # c
    "cfg": ModeSpec(uncond=True, weak=False, cond_logits=True),  # u + s (c - u)
    "fast": ModeSpec(uncond=False, weak=True, cond_logits=False),  # w
    "slow": ModeSpec(uncond=True, weak=True, cond_logits=True),  # w + a (u + s (c - u) - w)
}
MODES = tuple(MODE_TABLE)
MODE_IDS = {mode: i for i, mode in enumerate(MODE_TABLE)}  # the fused kernel's MODE constexpr
Scale = Union[float, int, torch.Tensor]


def check_mode(mode, what: str = "mode") -> str:
    if mode not in MODE_TABLE:
        raise InvalidArgument(f"{what} must be one of {MODES}, got {mode!r}")
    return mode


def needs_uncond(modes: Sequence[str]) -> bool:
    return any(MODE_TABLE[m].uncond for m in modes)


def needs_weak(modes: Sequence[str]) -> bool:
    return any(MODE_TABLE[m].weak for m in modes)


# ---------------------------------------------------------------------- the effective-mode rule
def cfg_is_cond(cfg_scale: Scale) -> bool:
    """LlamaGen: a CFG scale <= 1 means cond only. True for a number <= 1; a per-row tensor [B] is decided per row
    on the device (`cfg_mixes`), so False here."""
    return not isinstance(cfg_scale, torch.Tensor) and float(cfg_scale) <= 1.0


def cfg_mixes(cfg_scale: torch.Tensor) -> torch.Tensor:
    """The same rule per row on the device: True where the scale mixes (> 1). The fused kernel spells it in its
    mix tile (kernels/fused_guided_sample.py, `_mixed_tile`)."""
    return cfg_scale > 1.0


def effective_mode(mode: str, cfg_scale: Scale) -> str:
    """The mode a token is decoded with: cfg at a (number) scale <= 1 is cond, so no uncond rows are computed."""
    return "cond" if mode == "cfg" and cfg_is_cond(cfg_scale) else mode


def reads_uncond(mode: str, cfg_scale: Scale) -> bool:
    """Whether mixing `mode` at `cfg_scale` reads the unconditional prediction (a per-row tensor scale: some row
    may): the mode needs it (MODE_TABLE) and the scale mixes."""
    return MODE_TABLE[mode].uncond and not cfg_is_cond(cfg_scale)


def sampler_inputs(mode: str, cond, uncond, weak) -> tuple:
    """(mode, cond, uncond, weak) as the sampler takes them: fast mode (out = w) samples the weak prediction as a
    plain conditional row, ("cond", weak, None, None); any other mode as given."""
    if mode == "fast":
        return "cond", weak, None, None
    return mode, cond, uncond, weak


def require_weak(modes: Sequence[str], weak_model) -> None:
    """The one refusal of a fast/slow request without a CoRe^2 weak model."""
    if weak_model is None and needs_weak(modes):
        raise InvalidArgument("modes 'fast' and 'slow' need a weak_model, the CoRe^2 weak model (train one with "
                              "`llamagen-core2 reflect`; on the command line: --weak DIR)")


@dataclass(frozen=True)
class Schedule:
    """`first` for the first K image tokens, then `then`; K = first_tokens, or round(first_fraction * num_tokens)."""
    first: str = "slow"
    then: str = "fast"
    first_tokens: Optional[int] = None
    first_fraction: Optional[float] = None

    def __post_init__(self):
        check_mode(self.first, "schedule first mode")
        check_mode(self.then, "schedule then mode")
        if (self.first_tokens is None) == (self.first_fraction is None):
            raise InvalidArgument("a schedule needs exactly one of first_tokens (K) or first_fraction")
        if self.first_tokens is not None:
            object.__setattr__(self, "first_tokens", check_int("schedule first_tokens", self.first_tokens, minimum=0))
        elif isinstance(self.first_fraction, bool) or not isinstance(self.first_fraction, numbers.Real) \
                or not (0.0 <= float(self.first_fraction) <= 1.0):
            raise InvalidArgument(f"schedule first_fraction must be in [0, 1], got {self.first_fraction!r}")

    def first_count(self, num_tokens: int) -> int:
        if self.first_tokens is None:
            return int(round(float(self.first_fraction) * num_tokens))
        if self.first_tokens > num_tokens:
            raise InvalidArgument(f"schedule first_tokens must be in [0, {num_tokens}] (the image tokens), "
                                  f"got {self.first_tokens}")
        return self.first_tokens

    def modes(self, num_tokens: int) -> list[str]:
        k = self.first_count(num_tokens)
        return [self.first] * k + [self.then] * (num_tokens - k)


def make_schedule(num_tokens: int, *, first: str = "slow", then: str = "fast", first_tokens: Optional[int] = None,
                  first_fraction: Optional[float] = None) -> list[str]:
    """The per-token mode list of `Schedule(first, then, first_tokens, first_fraction)` over num_tokens tokens."""
    return Schedule(first, then, first_tokens, first_fraction).modes(check_int("num_tokens", num_tokens, minimum=1))


ScheduleLike = Union[Schedule, Sequence[str], None]


@dataclass(frozen=True)
class GuidanceConfig:
    """How to guide and sample every image token. Defaults: LlamaGen's c2i demo (cfg 4.0, top-k 2000)."""
    mode: str = "cfg"
    schedule: ScheduleLike = None  # overrides `mode`: a Schedule or an explicit list of one mode per token
    cfg_scale: Scale = 4.0
    cfg_interval: int = -1  # LlamaGen: CFG for tokens 0..cfg_interval+1, cond afterwards; -1 = every token
    w2s_scale: Scale = 1.0  # slow mode: out = weak + a (cfg - weak)
    temperature: Scale = 1.0  # 0 = greedy
    top_k: Union[int, torch.Tensor] = 2000  # 0 = full vocabulary; larger than the vocabulary = full vocabulary
    top_p: Scale = 1.0  # 1 = off

    def __post_init__(self):
        check_mode(self.mode)
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            if isinstance(self.schedule, str) or not isinstance(self.schedule, Sequence):
                raise InvalidArgument(f"schedule must be a Schedule or a list of modes, got {self.schedule!r}")
            bad = sorted({m for m in self.schedule if m not in MODE_TABLE})
            if bad:
                raise InvalidArgument(f"schedule contains unknown modes {bad}; allowed: {MODES}")
            object.__setattr__(self, "schedule", tuple(self.schedule))
        check_finite_scale("cfg_scale", self.cfg_scale)
        check_finite_scale("w2s_scale", self.w2s_scale)
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        object.__setattr__(self, "cfg_interval", check_int("cfg_interval", self.cfg_interval, minimum=-1))

    def replace(self, **changes) -> "GuidanceConfig":
        return dataclasses.replace(self, **changes)

    def token_modes(self, num_tokens: int) -> list[str]:
        """One mode per image token, after cfg_interval and a cfg_scale <= 1 (cond-only) are applied."""
        if isinstance(self.schedule, Schedule):
            modes = self.schedule.modes(num_tokens)
        elif self.schedule is not None:
            modes = list(self.schedule)
            if len(modes) != num_tokens:
                raise InvalidArgument(f"schedule must give one mode per token ({num_tokens}), got {len(modes)}")
        else:
            modes = [self.mode] * num_tokens
        for i, m in enumerate(modes):
            past_interval = self.cfg_interval > -1 and i > self.cfg_interval + 1
            modes[i] = "cond" if m == "cfg" and past_interval else effective_mode(m, self.cfg_scale)
        return modes

    def sampling_knobs(self) -> dict:
        """The keyword arguments of guidance.guided_sample (besides mode and the RNG)."""
        return dict(cfg_scale=self.cfg_scale, w2s_scale=self.w2s_scale, temperature=self.temperature,
                    top_k=self.top_k, top_p=self.top_p)

    def describe(self) -> dict:
        """JSON-friendly summary (per-row tensors become lists) for manifests and result lines."""
        def plain(v):
            if isinstance(v, torch.Tensor):
                return v.tolist()
            if isinstance(v, Schedule):
                return dataclasses.asdict(v)
            if isinstance(v, tuple):
                return list(v)
            return v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


# The default guidance by model type: LlamaGen's sample_c2i.py / demo (cfg 4.0, top-k 2000) and sample_t2i.py
# (cfg 7.5, top-k 1000). The pipeline and the CLI's defaults both read this.
DEFAULT_GUIDANCE = {"c2i": GuidanceConfig(), "t2i": GuidanceConfig(cfg_scale=7.5, top_k=1000)}


def default_guidance(model_type: str) -> GuidanceConfig:
    """The default GuidanceConfig of a c2i or t2i model."""
    return DEFAULT_GUIDANCE["t2i" if model_type == "t2i" else "c2i"]
