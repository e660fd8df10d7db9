"""Diffusion adapter: CoRe^2 guidance modes for diffusers SDXL / SD3(.5) / FLUX (pins diffusers 0.42.1)."""
from .guided_denoiser import MODES, GuidanceSettings, GuidedDenoiser, expected_rows_per_image
from .moe_lora import expert_index
from .noise_model import NoiseModel, NoiseModelConfig, noise_model_preset, prompt_features
from .noise_model_io import load_noise_model, save_noise_model
from .runner import DiffuseResult, diffuse

__all__ = ["MODES", "GuidanceSettings", "GuidedDenoiser", "expected_rows_per_image", "expert_index", "NoiseModel",
           "NoiseModelConfig", "noise_model_preset", "prompt_features", "load_noise_model", "save_noise_model",
           "DiffuseResult", "diffuse"]
