"""Diffusion adapter: CoRe^2 guidance modes for diffusers SDXL / SD3(.5) / FLUX (pins diffusers 0.42.1).

Classic pipelines run under `diffuse()` (a denoiser wrapper); the modular SDXL / SD3 pipelines take
`CoRe2Guidance` as their guider. Both read the diffusion mode table (modes.py), an extension of the AR one.

Names are imported from their modules on first use, so that importing the package (as the `diffuse` subcommand,
llamagen_core2/cli/diffusion.py, does for --help) imports neither torch-heavy modules nor diffusers.
"""
from ..optional import lazy_exports

_EXPORTS = {
    "MODES": "modes", "DIFFUSION_MODES": "modes", "CoRe2Guidance": "guider", "GuidanceSettings": "guided_denoiser", "GuidedDenoiser": "guided_denoiser",
    "expected_rows_per_image": "guided_denoiser", "expert_index": "moe_lora", "NoiseModel": "noise_model",
    "NoiseModelConfig": "noise_model", "noise_model_preset": "noise_model", "prompt_features": "prompt_summary",
    "prompt_summary": "prompt_summary", "PromptSummary": "prompt_summary",
    "load_noise_model": "noise_model_io", "save_noise_model": "noise_model_io", "DiffuseResult": "runner",
    "diffuse": "runner", "collect_diffusion": "collect", "train_noise_model": "reflect",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
