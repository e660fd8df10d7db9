"""CoRe2Guidance: the CoRe^2 modes as a diffusers guider, for the modular SDXL / SD3 pipelines (diffusers 0.42.1).

diffusers' modular denoise loops call, per step: `guider.set_state(step, num_inference_steps, timestep)`;
`guider.prepare_inputs({name: (cond, uncond)})` -> one batch per prediction the step needs (`num_conditions`);
the denoiser on each batch; `guider(batches)` -> `forward(pred_cond=..., pred_uncond=...)` -> GuiderOutput.
CoRe2Guidance answers from the diffusion mode table (modes.py): the step's AR mode says whether the uncond batch
is prepared at all (MODE_TABLE[m].uncond; a fast step runs the cond batch only) and whether the noise model runs
(.weak), and the mix is `guidance.mix_guidance` -- so mode "cfg" computes ClassifierFreeGuidance's
`u + s (c - u)` with the same operations. Zigzag modes need the scheduler (an inversion), which a guider never
sees: use `diffuse()` for those.

The noise model reads an SVD summary of the prompt embeddings (prompt_summary.py, the official recipe). Pass
`prompt_summary=prompt_summary(pipe, prompts, noise_model.config.svd_rank)` for exactly the official features.
Without it, `prepare_inputs` captures the pipeline's own embeddings (`prompt_embeds` for SDXL,
`encoder_hidden_states` for SD3, pooled `text_embeds`) and stacks the halves in the recipe's order for that
pipeline; that equals the official summary only when the pipeline encoded with the recipe's settings (SD3:
negative_prompt "" and 256 T5 tokens; SDXL: no negative prompt). So that the encoder steps prepare the
unconditional prompt even in fast mode, the guider reports 2 conditions outside the denoising loop (before the
first `set_state` and after the last step). SD3's modular pipeline encodes an unconditional prompt only when
given `negative_prompt` (pass "" for none).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import InvalidArgument, check_finite_scale, check_int
from ..guidance.config import MODE_TABLE
from ..guidance.mixing import mix_guidance
from ..optional import require
from .modes import diffusion_mode, needs_noise_model, rows_for, step_mode
from .prompt_summary import RECIPES, PromptSummary, prompt_features, stack_halves

require("diffusers", "CoRe2Guidance (a diffusers guider)")
from diffusers.configuration_utils import register_to_config  # noqa: E402 -- after the named check
from diffusers.guiders import BaseGuidance  # noqa: E402
from diffusers.guiders.guider_utils import GuiderOutput  # noqa: E402

PROMPT_TOKEN_KEYS = {"prompt_embeds": "sdxl", "encoder_hidden_states": "sd3"}  # input name -> pipeline kind
PROMPT_POOLED_KEY = "text_embeds"


class CoRe2Guidance(BaseGuidance):
    """cfg / fast / slow (W2S for the first `end_timesteps` steps, fast after) as a diffusers guider."""

    _input_predictions = ["pred_cond", "pred_uncond"]
    ignore_for_config = ["noise_model"]  # a module, not JSON; pass it again after from_pretrained / new()

    @register_to_config
    def __init__(self, mode: str = "cfg", guidance_scale: float = 5.0, w2s_scale: float = 1.0,
                 end_timesteps: Optional[int] = None, start: float = 0.0, stop: float = 1.0, enabled: bool = True,
                 noise_model: Optional[torch.nn.Module] = None, prompt_summary: Optional[PromptSummary] = None):
        super().__init__(start, stop, enabled)
        if diffusion_mode(mode).zigzag:
            raise InvalidArgument(f"mode {mode!r} inverts with the scheduler, which a guider cannot do; use "
                                  "llamagen_core2.diffusion.diffuse() for zigzag modes")
        check_finite_scale("guidance_scale", guidance_scale)
        check_finite_scale("w2s_scale", w2s_scale)
        if end_timesteps is not None:
            end_timesteps = check_int("end_timesteps", end_timesteps, minimum=0)
        if needs_noise_model(mode) and noise_model is None:
            raise InvalidArgument(f"mode {mode!r} needs noise_model= (a CoRe^2 noise model)")
        self.mode, self.guidance_scale, self.w2s_scale = mode, guidance_scale, w2s_scale
        self.end_timesteps, self.noise_model = end_timesteps, noise_model
        self.prompt_summary = prompt_summary
        self._prompt = None  # (kind, uncond tokens, cond tokens, uncond pooled, cond pooled) of the current run
        self._features = None

    # ------------------------------------------------------------------ per-step state
    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        if step == 0:
            self._prompt, self._features = None, None  # a new run
        super().set_state(step, num_inference_steps, timestep)

    def step_mode(self) -> str:
        """The AR mode of the current step ("cond" when disabled or outside [start, stop))."""
        if not self._enabled:
            return "cond"
        if self._step is None:
            return step_mode(self.mode, 0, self.end_timesteps)
        n = self._num_inference_steps
        if n is not None and not (int(self._start * n) <= self._step < int(self._stop * n)):
            return "cond"
        return step_mode(self.mode, self._step, self.end_timesteps)

    @property
    def num_conditions(self) -> int:
        if self._step is None:  # outside the loop: let the encoders prepare the unconditional prompt
            return 2
        return rows_for(self.step_mode(), self.guidance_scale)

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1

    # ------------------------------------------------------------------ inputs
    def _capture_prompt(self, pairs: dict) -> None:
        if not needs_noise_model(self.mode) or self._prompt is not None or self.prompt_summary is not None:
            return
        key = next((k for k in PROMPT_TOKEN_KEYS if k in pairs), None)
        tokens, pooled = pairs.get(key), pairs.get(PROMPT_POOLED_KEY)
        if not (isinstance(tokens, tuple) and isinstance(pooled, tuple) and all(
                isinstance(t, torch.Tensor) for t in (*tokens, *pooled))):
            raise InvalidArgument(f"mode {self.mode!r}: the noise model needs the conditional and unconditional "
                                  f"prompt embeddings ({' / '.join(PROMPT_TOKEN_KEYS)} and {PROMPT_POOLED_KEY}); "
                                  "pass negative_prompt (\"\" for none) so the pipeline encodes both")
        self._prompt = (PROMPT_TOKEN_KEYS[key], tokens[1], tokens[0], pooled[1], pooled[0])

    def prepare_inputs(self, data: dict) -> list:
        self._capture_prompt(data)
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch(data, i, name) for i, name in zip(indices, self._input_predictions)]

    def prepare_inputs_from_block_state(self, data, input_fields: dict) -> list:
        pairs = {name: tuple(getattr(data, f, None) for f in field) if isinstance(field, tuple)
                 else getattr(data, field, None) for name, field in input_fields.items()}
        self._capture_prompt(pairs)
        indices = [0] if self.num_conditions == 1 else [0, 1]
        return [self._prepare_batch_from_block_state(input_fields, data, i, name)
                for i, name in zip(indices, self._input_predictions)]

    # ------------------------------------------------------------------ the mix
    def _weak(self, pred_cond: torch.Tensor) -> torch.Tensor:
        if self.prompt_summary is not None:
            self._features = self.prompt_summary
        if self._prompt is None and self._features is None:
            raise InvalidArgument(f"mode {self.mode!r}: no prompt embeddings were seen by prepare_inputs")
        if self._features is None:
            kind, tu, tc, pu, pc = self._prompt
            first = RECIPES[kind].cond_first
            self._features = prompt_features(stack_halves(tc, tu, first, 1), stack_halves(pc, pu, first, -1),
                                             self.noise_model.config.svd_rank)
        with torch.no_grad():
            weak = self.noise_model(pred_cond, *self._features, step=self._step or 0,
                                    num_steps=self._num_inference_steps or 1)
        return weak.to(pred_cond.dtype)

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None) -> GuiderOutput:
        mode = self.step_mode()
        weak = self._weak(pred_cond) if MODE_TABLE[mode].weak else None
        pred = mix_guidance(pred_cond, pred_uncond, weak, cfg_scale=self.guidance_scale, w2s_scale=self.w2s_scale,
                            mode=mode)
        if self._num_inference_steps is not None and self._step == self._num_inference_steps - 1:
            self._step = None  # the loop is over: the next run's encoders see 2 conditions again
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)
