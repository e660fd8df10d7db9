"""diffuse(): run an SDXL / SD3 / FLUX diffusers pipeline under one of our guidance modes.

The pipeline runs unmodified; we install a GuidedDenoiser on its denoiser for the duration of
the call and pass its `on_step_end` as `callback_on_step_end` (layouts.py, guided_denoiser.py). A caller's own
`callback_on_step_end` (a function or a diffusers PipelineCallback) is chained after ours: it sees the step's
final latents (after any zigzag) plus the tensors it asked for in `callback_on_step_end_tensor_inputs`, and what
it returns is handed back to the pipeline, as diffusers does. Callbacks that change the guidance scale mid-run
(diffusers' CFG cut-off callbacks) do not apply: the mode decides the guidance here.
SDXL / SD3 are asked for `guidance_scale = cfg_scale` (or 2.0 when cfg_scale <= 1, only so they
keep batching [uncond ; cond]; our output does not depend on it). FLUX is run with its distilled
`guidance_scale` (`flux_guidance`) and WITHOUT its true CFG; the negative prompt is encoded here
and the wrapper issues the uncond pass itself. Modes with a noise model get its prompt inputs
from prompt_summary.py (the official recipe), computed here once per prompt, before the pipeline runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import InvalidArgument, check_int, check_number
from ..guidance.config import GuidanceConfig
from .guided_denoiser import GuidanceSettings, GuidedDenoiser
from .layouts import denoiser_of, layout_for, pipeline_kind
from .modes import needs_noise_model
from .prompt_summary import prompt_summary


@dataclass
class DiffuseResult:
    images: object                 # whatever the pipeline returned (PIL list, np array, latents)
    rows_per_image: float          # denoiser rows evaluated per image (the NFE we report)
    calls: int                     # real denoiser calls
    num_steps: int
    settings: GuidanceSettings = field(default_factory=GuidanceSettings)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgument("prompts must be a non-empty string or list of strings")
    return prompts


def _chain(ours: Callable, theirs: Optional[Callable]) -> Callable:
    """callback_on_step_end running ours (step counter, zigzag) and then the caller's on its result."""
    if theirs is None:
        return ours

    def chained(pipe, i, t, callback_kwargs: dict) -> dict:
        out = dict(ours(pipe, i, t, callback_kwargs))
        returned = theirs(pipe, i, t, {**callback_kwargs, **out})
        return {**out, **(returned or {})}
    return chained


def diffuse(pipe, prompts: Union[str, Sequence[str]], *,
            settings: Union[GuidanceSettings, GuidanceConfig, None] = None,
            noise_model: Optional[torch.nn.Module] = None, num_inference_steps: int = 50,
            negative_prompt: Optional[Union[str, Sequence[str]]] = None,
            generator: Optional[torch.Generator] = None, flux_guidance: float = 3.5,
            recorder: Optional[Callable] = None, **pipeline_kwargs) -> DiffuseResult:
    """Generate with `pipe` (StableDiffusionXLPipeline, StableDiffusion3Pipeline or FluxPipeline).

    settings: GuidanceSettings, or a GuidanceConfig (GuidanceSettings.from_guidance). pipeline_kwargs go to the
    pipeline, including a `callback_on_step_end` (+ `callback_on_step_end_tensor_inputs`), chained after ours.
    """
    settings = settings or GuidanceSettings()
    prompts = _check_prompts(prompts)
    num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1)
    if isinstance(settings, GuidanceConfig):
        settings = GuidanceSettings.from_guidance(settings)
    for reserved in ("guidance_scale", "true_cfg_scale"):
        if reserved in pipeline_kwargs:
            raise InvalidArgument(f"{reserved} is set by diffuse(); use settings / flux_guidance instead")
    user_callback = pipeline_kwargs.pop("callback_on_step_end", None)
    user_inputs = list(pipeline_kwargs.pop("callback_on_step_end_tensor_inputs", None) or
                       getattr(user_callback, "tensor_inputs", None) or ["latents"])
    if user_callback is not None and not callable(user_callback):
        raise InvalidArgument(f"callback_on_step_end must be callable, got {type(user_callback).__name__}")
    check_number("flux_guidance", flux_guidance, minimum=0.0)
    kind = pipeline_kind(pipe)
    layout = layout_for(kind)
    settings.validate(noise_model is not None)   # bad settings fail before any encoding work
    summary = None
    if needs_noise_model(settings.mode):
        summary = prompt_summary(pipe, prompts, noise_model.config.svd_rank,
                                 num_images_per_prompt=pipeline_kwargs.get("num_images_per_prompt") or 1)
    gd = GuidedDenoiser(denoiser_of(pipe, kind), layout, settings, noise_model=noise_model, prompt_summary=summary,
                        recorder=recorder, pipe=pipe)
    negatives = None
    if negative_prompt is not None:
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise InvalidArgument(f"negative_prompt must be a string or a list of {len(prompts)} strings")

    call = dict(pipeline_kwargs, prompt=prompts, num_inference_steps=num_inference_steps, generator=generator,
                callback_on_step_end=_chain(gd.on_step_end, user_callback),
                callback_on_step_end_tensor_inputs=sorted(set(user_inputs) | {"latents"}))
    if kind == "flux":
        neg = negatives if negatives is not None else [""] * len(prompts)
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=neg, prompt_2=None, device=pipe._execution_device,
            num_images_per_prompt=pipeline_kwargs.get("num_images_per_prompt", 1),
            max_sequence_length=pipeline_kwargs.get("max_sequence_length", 512))
        layout.negative_embeds, layout.negative_pooled = embeds, pooled
        call["guidance_scale"] = flux_guidance
    else:
        call["negative_prompt"] = negatives
        call["guidance_scale"] = settings.cfg_scale if settings.cfg_scale > 1 else 2.0

    gd.install()
    try:
        output = pipe(**call)
    finally:
        gd.uninstall()
    if gd.step != gd.num_steps:
        raise InvalidArgument(f"the pipeline ran {gd.step} of {gd.num_steps} steps (interrupted?)")
    n_images = gd.images
    return DiffuseResult(images=output.images, rows_per_image=gd.rows / n_images, calls=gd.calls,
                         num_steps=gd.num_steps, settings=settings)

