"""LlamaGenPipeline: conditions in, images out -- the one generate() -> VQ decode -> images driver.

Modelled on diffusers' DiTPipeline (built from its models or `from_pretrained`, called with class labels or
prompts, `generator`, `output_type`, `return_dict`, a progress bar), for LlamaGen's AR models with CoRe^2.

Contract:
  * `LlamaGenPipeline(gpt, vq, caption_encoder=None, weak_model=None, guidance=None)`; `guidance=None` picks the
    model type's default: c2i GuidanceConfig() (cfg 4.0, top-k 2000, LlamaGen's demo), t2i cfg 7.5, top-k 1000
    (LlamaGen's sample_t2i.py). `from_pretrained(gpt, vq, ...)` loads the parts from local paths or Hub ids.
  * `pipe(class_labels=... | prompt=... | prompt_embeds=..., num_images_per_prompt=1, guidance=None,
    generator=None, seed=None, batch_size=None, output_type="pil", return_dict=True, progress=True,
    guidance_scale=None, decoding="sequential", jacobi_window=16)`.
    Images are condition-major: the `num_images_per_prompt` images of condition 0 first.
  * Seed rule (guidance/seeding.py): image i of a call uses the Philox key `image_key(s, first_image_index + i)`, with
    s = `seed`, or one draw from `generator`; with a list of generators (one per image) image i uses the first key of
    generator i. Image i therefore does not depend on `batch_size` or on the other images of the call; the CLI
    `generate` and `sample` pass the index of the image in the whole run, so a run's image n uses
    image_key(--seed, n) whatever --batch-size and however the run was resumed or split.
  * output_type: "pil" -> list of PIL images; "np" -> uint8 [B, H, W, 3], LlamaGen's pixel rule
    clamp(127.5 x + 128, 0, 255) (the values the PIL images and PNG files hold; diffusers' "np" is float in
    [0, 1]: divide by 255); "pt" -> float32 [B, 3, H, W], the VQ decoder's output in ~[-1, 1] (`images.to_uint8`
    turns it into those pixels); "tokens" -> no VQ decode, `images` is None. `tokens` [B, N] is always returned.
  * progress=True draws one "tokens" bar (stderr) over every batch of the call, left at its total; a bar object
    (anything with `update(n)`) is advanced instead, so a caller can show one bar over several calls.
    `set_progress_bar_config(**tqdm_kwargs)` configures the bar as in diffusers (disable=True hides it).
  * `guidance_scale=` (diffusers' name) sets the CFG scale of this call: `guidance.cfg_scale` of the pipeline's
    guidance, or of `guidance=` when both are given and agree (InvalidArgument when they disagree).
  * return_dict=True -> `LlamaGenPipelineOutput(images, tokens, stats)`; False -> `(images,)`, or `(tokens,)`
    for output_type "tokens". `stats`: base-model rows and weak steps (generate()'s counts), forward passes (per
    batch summed, and the mean per image) and seconds.
  * `decoding="jacobi"` (`jacobi_window` tokens per forward pass, docs/decoding.md) returns the tokens of the
    default `decoding="sequential"` for the same seed in fewer forward passes; it is not an image setting.
"""
from __future__ import annotations

import inspect
import logging
import numbers
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .decode.engine import Engine
from .decode.generate import generate
from .decode.jacobi import DEFAULT_WINDOW, check_decoding
from .encoders.text import encode_in_batches
from .errors import InvalidArgument, check_has_values, check_int, check_number
from .guidance.config import GuidanceConfig, default_guidance, require_weak
from .guidance.seeding import row_keys
from .io.images import to_pil_images, to_uint8

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "tokens")
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


@dataclass
class LlamaGenPipelineOutput:
    images: object  # list[PIL.Image] | np.ndarray uint8 [B, H, W, 3] | torch.Tensor [B, 3, H, W] | None
    tokens: torch.Tensor  # [B, N] image token ids (CPU)
    stats: dict = field(default_factory=dict)


class LlamaGenPipeline:
    """GPT + VQ tokenizer (+ T5 caption encoder for t2i prompts, + CoRe^2 weak model for fast/slow modes)."""

    def __init__(self, gpt, vq, caption_encoder=None, weak_model=None, guidance: Optional[GuidanceConfig] = None):
        c = gpt.config
        vq.check_matches(c)
        if guidance is not None and not isinstance(guidance, GuidanceConfig):
            raise InvalidArgument(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
        if weak_model is not None and hasattr(weak_model, "check_compatible"):
            weak_model.check_compatible(gpt)
        self.gpt, self.vq, self.caption_encoder, self.weak_model = gpt, vq, caption_encoder, weak_model
        self.guidance = guidance if guidance is not None else default_guidance(c.model_type)
        self.engine = Engine(gpt)  # decoding state kept across calls: on a GPU its CUDA graphs are captured once
        self._progress_bar_config: dict = {}

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm keyword arguments for the calls' progress bar (e.g. disable=True, desc=, file=, leave=), as in
        diffusers: each call replaces the whole configuration. A call's progress=False still hides the bar."""
        from tqdm.std import tqdm as plain_tqdm  # tqdm.auto's class forwards *args, **kwargs to this one

        allowed = set(inspect.signature(plain_tqdm.__init__).parameters) - {"self", "iterable", "total", "gui",
                                                                            "kwargs"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise InvalidArgument(f"set_progress_bar_config: unknown tqdm argument(s) {unknown}; allowed: "
                                  f"{sorted(allowed)}")
        self._progress_bar_config = dict(kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, gpt, vq=None, *, gpt_filename: Optional[str] = None, vq_filename: Optional[str] = None,
                        weak_model=None, caption_encoder=None, gpt_preset: Optional[str] = None,
                        vq_preset: Optional[str] = None, gpt_kwargs: Optional[dict] = None, vq_kwargs: Optional[dict] = None,
                        device=None, dtype=None, guidance: Optional[GuidanceConfig] = None,
                        revision: Optional[str] = None, cache_dir=None,
                        local_files_only: Optional[bool] = None) -> "LlamaGenPipeline":
        """Load the parts from local paths or Hub ids (io/hub.py: HF cache, HF_HUB_OFFLINE).

        `vq` defaults to the GPT's source when `vq_filename` is given, so LlamaGen's single-file release loads with
        `from_pretrained("FoundationVision/LlamaGen", gpt_filename="c2i_B_256.pt", vq_filename="vq_ds16_c2i.pt")`.
        `weak_model` / `caption_encoder`: a path or Hub id (loaded here) or an already built model. `dtype` applies
        to the GPT and the weak model; the VQ decoder stays fp32 as in LlamaGen; T5 runs in bf16 on CUDA.
        `vq_preset`: default a directory's config.json, else VQ-16. `gpt_kwargs` / `vq_kwargs`: config overrides for GPT.from_pretrained / VQModel.from_pretrained (e.g.
        {"image_size": 384} for a file whose name does not say it).
        """
        from .decode.model import GPT
        from .encoders.vq import VQModel
        from .io.hub import resolve

        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        if vq is None:
            if vq_filename is None:
                raise InvalidArgument("vq is required (a path or Hub id), unless vq_filename names a file in the "
                                      "GPT's repo")
            vq = gpt
        gpt_model = GPT.from_pretrained(gpt, gpt_preset, device=device, dtype=dtype, filename=gpt_filename, **hub,
                                        **(gpt_kwargs or {}))
        vq_model = VQModel.from_pretrained(vq, vq_preset, device=device, filename=vq_filename, **hub,
                                           **(vq_kwargs or {}))
        if weak_model is not None and not isinstance(weak_model, torch.nn.Module):
            from .core2.weak_model import WeakModel

            weak_dir = resolve(weak_model, allow_patterns=("*.json", "*.safetensors"), what="weak model", **hub)
            weak_model = WeakModel.from_pretrained(weak_dir, gpt_model, device=device, dtype=dtype)
        if caption_encoder is not None and not hasattr(caption_encoder, "encode"):
            from .encoders.text import CaptionEncoder

            t5_dtype = torch.bfloat16 if str(device).startswith("cuda") else None
            caption_encoder = CaptionEncoder.from_pretrained(caption_encoder, device=device, dtype=t5_dtype, **hub)
        return cls(gpt_model, vq_model, caption_encoder=caption_encoder, weak_model=weak_model, guidance=guidance)

    def to(self, device=None, dtype=None) -> "LlamaGenPipeline":
        """Move the models (dtype: GPT and weak model only; the VQ decoder stays fp32)."""
        self.gpt.to(device=device, dtype=dtype)
        self.vq.to(device=device)
        if self.weak_model is not None:
            self.weak_model.to(device=device, dtype=dtype)
        if self.caption_encoder is not None and device is not None:
            self.caption_encoder.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.gpt.output.weight.device

    # ------------------------------------------------------------------ conditions
    def _conditions(self, class_labels, prompt, prompt_embeds, prompt_attention_mask):
        """-> (cond [M] or [M, T, C] on CPU, mask [M, T] or None)."""
        c = self.gpt.config
        given = [name for name, v in (("class_labels", class_labels), ("prompt", prompt),
                                      ("prompt_embeds", prompt_embeds)) if v is not None]
        if len(given) != 1:
            raise InvalidArgument(f"give exactly one of class_labels (c2i), prompt or prompt_embeds (t2i), got {given}")
        if c.model_type == "c2i":
            if class_labels is None:
                raise InvalidArgument("this GPT is class-conditional (c2i): pass class_labels, not prompts")
            labels = torch.as_tensor(class_labels).reshape(-1)
            check_has_values("class_labels", labels)
            if labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
                raise InvalidArgument(f"class_labels must be a non-empty list of integer class ids, got {class_labels!r}")
            labels = labels.to(torch.long).cpu()
            self.gpt.check_condition(labels)
            return labels, None
        if class_labels is not None:
            raise InvalidArgument("this GPT is text-conditional (t2i): pass prompt (with a caption_encoder) or "
                                  "prompt_embeds, not class_labels")
        if prompt is not None:
            if self.caption_encoder is None:
                raise InvalidArgument("prompt needs a caption_encoder (T5); pass one to the pipeline or use "
                                      "prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise InvalidArgument("prompt must be a string or a non-empty list of strings")
            return encode_in_batches(self.caption_encoder, prompts)
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3:
            raise InvalidArgument(f"prompt_embeds must be caption features [M, {c.cls_token_num}, {c.caption_dim}]")
        check_has_values("prompt_embeds", prompt_embeds)
        check_has_values("prompt_attention_mask", prompt_attention_mask)
        if prompt_attention_mask is not None and (not isinstance(prompt_attention_mask, torch.Tensor)
                                                  or tuple(prompt_attention_mask.shape) != tuple(prompt_embeds.shape[:2])):
            raise InvalidArgument(f"prompt_attention_mask must be [M, T] = {list(prompt_embeds.shape[:2])}")
        self.gpt.check_condition(prompt_embeds)
        return prompt_embeds.cpu(), None if prompt_attention_mask is None else prompt_attention_mask.cpu()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()  # not inference_mode: a caller may feed the "pt" images to autograd code
    def __call__(self, class_labels=None, prompt: Union[str, Sequence[str], None] = None, *,
                 prompt_embeds: Optional[torch.Tensor] = None, prompt_attention_mask: Optional[torch.Tensor] = None,
                 num_images_per_prompt: int = 1, guidance: Optional[GuidanceConfig] = None,
                 generator: Generators = None, seed: Optional[int] = None, first_image_index: int = 0,
                 batch_size: Optional[int] = None, output_type: str = "pil", return_dict: bool = True,
                 progress=True, guidance_scale: Optional[float] = None, decoding: str = "sequential",
                 jacobi_window: int = DEFAULT_WINDOW):
        num_images_per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, minimum=1)
        check_decoding(decoding, jacobi_window)
        batch_size = None if batch_size is None else check_int("batch_size", batch_size, minimum=1)
        if output_type not in OUTPUT_TYPES:
            raise InvalidArgument(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        first_image_index = check_int("first_image_index", first_image_index, minimum=0)
        if first_image_index and generator is not None and not isinstance(generator, torch.Generator):
            raise InvalidArgument("first_image_index needs seed or one generator; a list of generators already "
                                  "gives every image its own key")
        if guidance is not None and not isinstance(guidance, GuidanceConfig):
            raise InvalidArgument(f"guidance must be a GuidanceConfig, got {type(guidance).__name__}")
        if guidance_scale is not None:  # diffusers' name for the CFG scale
            guidance_scale = check_number("guidance_scale", guidance_scale, minimum=0.0)
            if guidance is not None and not (isinstance(guidance.cfg_scale, numbers.Real)
                                             and float(guidance.cfg_scale) == guidance_scale):
                raise InvalidArgument(f"guidance_scale={guidance_scale} and guidance.cfg_scale={guidance.cfg_scale} "
                                      f"disagree; give the CFG scale once")
            guidance = (guidance or self.guidance).replace(cfg_scale=guidance_scale)
        if guidance is None:
            guidance = self.guidance
        require_weak(guidance.token_modes(self.gpt.config.num_image_tokens), self.weak_model)

        cond, mask = self._conditions(class_labels, prompt, prompt_embeds, prompt_attention_mask)
        order = torch.arange(len(cond)).repeat_interleave(num_images_per_prompt)  # condition-major
        total = len(order)
        keys = row_keys(total, seed=seed, generator=generator, first_index=first_image_index)
        step = total if batch_size is None else batch_size
        device, vq_device = self.device, self.vq.post_quant_conv.weight.device

        tokens_out, images_out = [], []
        stats = dict(images=total, base_rows=0, catchup_rows=0, weak_steps_per_image=0.0, forward_passes=0,
                     forward_passes_per_image=0.0, generate_seconds=0.0, decode_seconds=0.0)
        batches = range(0, total, step)
        # One "tokens" bar over every batch of the call (or the caller's bar), drawn to its end.
        own_bar = not hasattr(progress, "update")
        if own_bar:
            options = {"desc": "tokens", "unit": "token", **self._progress_bar_config}
            options["disable"] = not progress or bool(options.get("disable", False))
            bar = tqdm(total=len(batches) * self.gpt.config.num_image_tokens, **options)
        else:
            bar = progress
        for start in batches:
            rows = order[start:start + step]
            t0 = time.perf_counter()
            tokens, gen_stats = generate(self.gpt, cond[rows].to(device),
                                         cond_mask=None if mask is None else mask[rows].to(device),
                                         guidance=guidance, seeds=keys[start:start + step],
                                         weak_model=self.weak_model, progress=bar, return_stats=True,
                                         engine=self.engine, decoding=decoding, jacobi_window=jacobi_window)
            t1 = time.perf_counter()
            stats["base_rows"] += gen_stats["base_rows"]
            stats["forward_passes"] += gen_stats["forward_passes"]
            stats["forward_passes_per_image"] += gen_stats["forward_passes_mean"] * len(rows) / total
            stats["catchup_rows"] += gen_stats["catchup_rows"]
            stats["weak_steps_per_image"] += gen_stats["weak_steps"] * len(rows) / total
            stats["generate_seconds"] += t1 - t0
            tokens_out.append(tokens.cpu())
            if output_type != "tokens":
                # One image at a time: a batched convolution rounds differently at other batch sizes (seen: 1/255
                # at one pixel), and image i must not depend on the batch it was generated in. Each image of a
                # 256 px decode already fills a GPU, so this costs little.
                decoded = torch.cat([self.vq.decode_codes(t[None]) for t in tokens.to(vq_device)])
                images_out.append(decoded.float().cpu() if output_type == "pt" else to_uint8(decoded))
            stats["decode_seconds"] += time.perf_counter() - t1
        if own_bar:
            bar.close()
        tokens = torch.cat(tokens_out)
        if output_type == "tokens":
            images = None
        elif output_type == "pt":
            images = torch.cat(images_out)
        else:
            images = np.concatenate(images_out)
            if output_type == "pil":
                images = to_pil_images(images)
        if not return_dict:
            return (tokens,) if output_type == "tokens" else (images,)
        return LlamaGenPipelineOutput(images=images, tokens=tokens, stats=stats)
