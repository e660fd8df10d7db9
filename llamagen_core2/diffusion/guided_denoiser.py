"""The denoiser wrapper: every guidance mix of a diffusers pipeline goes through `mix_guidance`.

Integration point (diffusers 0.42.1): the classic SDXL / SD3 / FLUX pipelines mix CFG inline and
do not consume `diffusers.guiders` (only the modular pipelines do; for those see guider.py), and
`callback_on_step_end` runs after `scheduler.step`. So we replace the denoiser's `forward` on the instance (keeping any
accelerate offload hook, which lives in the previous `forward`) with a GuidedDenoiser:

* it evaluates only the rows the current step's mode needs (fast: cond rows only),
* mixes with `llamagen_core2.guidance.mix_guidance` (cfg / fast / slow),
* returns a batch for which the pipeline's own formula yields exactly our output: SDXL / SD3
  get [m ; m] so `m + g * (m - m) == m`; FLUX (run without its true CFG) gets m.

Modes (per step i of N; c, u = cond / uncond predictions, w = noise model(c); the table is modes.py):
    cfg      u + s (c - u)                          2 rows / image / step
    fast     w                                      1 row
    slow     w + a (cfg - w) for i < end_timesteps, fast after (CoRe^2; end_timesteps None = all slow)
    zigzag   cfg, plus after steps i < zigzag_steps (default N-1) an inversion with inv_cfg and a
             re-denoise with cfg (zigzag.py)
    z-core2  slow/fast schedule as `slow`, plus the zigzag of `zigzag` (re-denoise uses the W2S mix)
Rows per image per zigzag step: R_i + R_inv + R_i with R_i = rows of step i's mix (2 or 1) and
R_inv = 1 if inv_cfg <= 1 (cond-only inversion) else 2.

`on_step_end` must be passed as the pipeline's `callback_on_step_end` (diffuse() does this): it
advances the step index (used for the schedule and the noise model's expert) and runs the zigzag.
The noise model's prompt inputs come in precomputed (`prompt_summary`, one row per image): they
follow the official recipe of prompt_summary.py, not the embeddings this pipeline call uses.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import InvalidArgument, check_finite_scale, check_int
from ..guidance.config import MODE_TABLE, GuidanceConfig, Schedule
from ..guidance.mixing import mix_guidance
from .modes import (MODES, diffusion_mode, needs_noise_model, rows_for, scheduled_mode, step_mode,
                    with_zigzag)
from .prompt_summary import PromptSummary


@dataclass
class GuidanceSettings:
    mode: str = "cfg"
    cfg_scale: float = 5.0
    w2s_scale: float = 1.0
    end_timesteps: Optional[int] = None   # slow / z-core2: W2S slow for steps < end_timesteps, fast after
    inv_cfg: float = 1.0                  # zigzag inversion guidance (<= 1: cond only)
    zigzag_steps: Optional[int] = None    # zigzag at steps 0 .. zigzag_steps-1 (default: all but the last)

    @classmethod
    def from_guidance(cls, guidance: GuidanceConfig, *, zigzag: bool = False, inv_cfg: float = 1.0,
                      zigzag_steps: Optional[int] = None) -> "GuidanceSettings":
        """The diffusion settings of a GuidanceConfig: its mode (cfg / fast / slow) or a slow-then-fast Schedule
        with `first_tokens` K (= end_timesteps, in denoising steps), cfg_scale and w2s_scale; the token-sampling
        knobs (temperature, top-k, top-p, cfg_interval) have no diffusion meaning and must be left at defaults."""
        if not isinstance(guidance, GuidanceConfig):
            raise InvalidArgument(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
        default = GuidanceConfig()
        for knob in ("temperature", "top_k", "top_p", "cfg_interval"):
            if getattr(guidance, knob) != getattr(default, knob):
                raise InvalidArgument(f"guidance.{knob} is a token-sampling knob with no diffusion meaning; "
                                      f"leave it at {getattr(default, knob)!r}")
        end_timesteps, mode = None, guidance.mode
        if guidance.schedule is not None:
            sched = guidance.schedule
            if not (isinstance(sched, Schedule) and sched.first_tokens is not None):
                raise InvalidArgument("a diffusion schedule is a Schedule(first, then, first_tokens=K) over the "
                                      f"denoising steps, e.g. Schedule('slow', 'fast', first_tokens=K); got {sched!r}")
            mode, end_timesteps = scheduled_mode(sched.first, sched.then), sched.first_tokens
        if mode not in MODES:
            raise InvalidArgument(f"guidance.mode must be one of {MODES} for diffusion, got {mode!r}")
        if zigzag:
            mode = with_zigzag(mode)
        return cls(mode=mode, cfg_scale=float(guidance.cfg_scale), w2s_scale=float(guidance.w2s_scale),
                   end_timesteps=end_timesteps, inv_cfg=inv_cfg, zigzag_steps=zigzag_steps)

    def validate(self, has_noise_model: bool) -> None:
        diffusion_mode(self.mode)
        check_finite_scale("cfg_scale", self.cfg_scale)
        check_finite_scale("w2s_scale", self.w2s_scale)
        check_finite_scale("inv_cfg", self.inv_cfg)
        for name in ("end_timesteps", "zigzag_steps"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, minimum=0)
        if needs_noise_model(self.mode) and not has_noise_model:
            raise InvalidArgument(f"mode {self.mode!r} needs a noise model (--noise-model)")

    @property
    def zigzag(self) -> bool:
        return diffusion_mode(self.mode).zigzag

    def step_mode(self, i: int) -> str:
        """The mix_guidance mode of step i."""
        return step_mode(self.mode, i, self.end_timesteps)


def expected_rows_per_image(settings: GuidanceSettings, num_steps: int) -> int:
    """The documented NFE (denoiser rows per image) of a whole run."""
    total = 0
    zz = num_steps - 1 if settings.zigzag_steps is None else min(settings.zigzag_steps, num_steps - 1)
    for i in range(num_steps):
        r = rows_for(settings.step_mode(i), settings.cfg_scale)
        total += r
        if settings.zigzag and i < zz:
            total += rows_for("cfg", settings.inv_cfg) + r
    return total


class GuidedDenoiser:
    def __init__(self, denoiser: torch.nn.Module, layout, settings: GuidanceSettings, *,
                 noise_model: Optional[torch.nn.Module] = None, prompt_summary: Optional[PromptSummary] = None,
                 recorder: Optional[Callable] = None, pipe=None):
        settings.validate(noise_model is not None)
        if needs_noise_model(settings.mode) and prompt_summary is None:
            raise InvalidArgument(f"mode {settings.mode!r} needs prompt_summary, the noise model's prompt inputs "
                                  "(prompt_summary.prompt_summary(pipe, prompts, rank); diffuse() computes it)")
        self.denoiser, self.layout, self.settings, self.pipe = denoiser, layout, settings, pipe
        self.noise_model, self.prompt_summary, self.recorder = noise_model, prompt_summary, recorder
        self._signature = inspect.signature(type(denoiser).forward)
        self._forward = None
        self.reset()

    # --- lifecycle -------------------------------------------------------------------------
    def reset(self) -> None:
        self.step = 0
        self.num_steps: Optional[int] = None
        self.rows = 0          # denoiser rows evaluated (sum over calls of the batch size)
        self.calls = 0         # real denoiser calls
        self.images = 0
        self._last_args: Optional[dict] = None
        self._stepper = None

    def install(self) -> None:
        had = "forward" in self.denoiser.__dict__
        self._previous = self.denoiser.__dict__.get("forward") if had else None
        self._had_instance_forward = had
        self._forward = self.denoiser.forward  # bound method, or an accelerate hook's forward
        self.denoiser.forward = self

    def uninstall(self) -> None:
        if self._had_instance_forward:
            self.denoiser.forward = self._previous
        else:
            del self.denoiser.forward

    def start(self, pipe) -> None:
        """Called at the first denoiser call of a run, after the pipeline set its timesteps."""
        self.num_steps = len(pipe.scheduler.timesteps)
        if self.settings.zigzag:
            from .zigzag import stepper_for

            self._stepper = stepper_for(pipe.scheduler)

    # --- the intercepted call ----------------------------------------------------------------
    def _run(self, args: dict, need_uncond: bool):
        def counted(**kw):
            self.calls += 1
            self.rows += kw[self.layout.sample_key].shape[0]
            return self._forward(**kw)

        return self.layout.run(counted, args, need_uncond)

    def _weak(self, cond: torch.Tensor, args: dict, i: int) -> torch.Tensor:
        image = self.layout.to_image(cond, args)
        with torch.no_grad():
            weak = self.noise_model(image, *self.prompt_summary, step=i, num_steps=self.num_steps)
        return self.layout.from_image(weak.to(cond.dtype), args)

    def guided_prediction(self, args: dict, i: int, mode: str, cfg_scale: float, *, record: bool = False):
        cond, uncond, _ = self._run(args, rows_for(mode, cfg_scale) == 2)
        weak = self._weak(cond, args, i) if MODE_TABLE[mode].weak else None
        mixed = mix_guidance(cond, uncond, weak, cfg_scale=cfg_scale, w2s_scale=self.settings.w2s_scale, mode=mode)
        if record and self.recorder is not None:
            self.recorder(i, cond, mixed, args, self)
        return mixed

    def __call__(self, *args, **kwargs):
        bound = self._signature.bind(None, *args, **kwargs)
        call = dict(bound.arguments)
        call.pop(next(iter(self._signature.parameters)))  # `self`
        call.update(call.pop("kwargs", {}) or {})
        if self.num_steps is None:
            if self.pipe is None:
                raise InvalidArgument("GuidedDenoiser needs `pipe` (or start(pipe)) before the first call; use diffuse()")
            self.start(self.pipe)  # the pipeline has set its timesteps by its first denoiser call
        if self.step >= self.num_steps:
            raise InvalidArgument(f"denoiser called more than num_steps={self.num_steps} times in a run; "
                                  "pass GuidedDenoiser.on_step_end as callback_on_step_end")
        self._last_args = call
        self.images = self.layout.images(call)
        i = self.step
        mixed = self.guided_prediction(call, i, self.settings.step_mode(i), self.settings.cfg_scale, record=True)
        out = self.layout.pack(mixed, call)
        return (out,) if call.get("return_dict", True) is False else _Output(out)

    # --- after each scheduler step -------------------------------------------------------------
    def on_step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        latents = callback_kwargs["latents"]
        s = self.settings
        zz = self.num_steps - 1 if s.zigzag_steps is None else min(s.zigzag_steps, self.num_steps - 1)
        if s.zigzag and i < zz:
            latents = self._zigzag(latents, i)
        self.step = i + 1
        return {"latents": latents}

    def _zigzag(self, x_next: torch.Tensor, i: int) -> torch.Tensor:
        st, s = self._stepper, self.settings
        inv_args = self.layout.replay(self._last_args, x_next, st.time_at(i + 1))
        pred_inv = self.guided_prediction(inv_args, i, "cfg", s.inv_cfg)
        x_i = st.invert(x_next, pred_inv, i)
        args = self.layout.replay(self._last_args, x_i, st.time_at(i))
        pred = self.guided_prediction(args, i, s.step_mode(i), s.cfg_scale)
        return st.step(x_i, pred, i)


class _Output:
    """Stands in for diffusers' model outputs when a caller asks for return_dict=True."""

    def __init__(self, sample: torch.Tensor):
        self.sample = sample

    def __getitem__(self, idx):
        return (self.sample,)[idx]
