"""Load / save diffusion noise models: the released CoRe^2 `.pth` files and our safetensors format.

* Released files (`sd35_noise_model.pth`, `sdxl_noise_model.pth`): flat state dicts, read with
  `torch.load(weights_only=True)` (checkpoint.read_state_dict); the architecture comes from a preset
  (`sd35` / `sdxl`) or an explicit NoiseModelConfig.
* Ours: a directory with `config.json` ({"model_type": ..., "config": NoiseModelConfig}) and
  `model.safetensors`, written atomically by checkpoint.save_pretrained.
Every load is strict: missing, unexpected or mis-shaped keys raise CheckpointError naming them.
The model is built on the meta device and the checked tensors are assigned, so loading the
~600M-parameter SD3.5 model does not allocate it twice.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import CheckpointError, InvalidArgument, NonFiniteError, check_all_finite
from ..io.checkpoint import CONFIG_NAME, read_config, read_state_dict, save_pretrained, validate_state_dict
from .noise_model import NoiseModel, NoiseModelConfig, noise_model_preset

MODEL_TYPE = "llamagen_core2.diffusion.noise_model"


def build_meta_model(config: NoiseModelConfig) -> NoiseModel:
    with torch.device("meta"):
        return NoiseModel(config)


def expected_shapes(config: NoiseModelConfig) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in build_meta_model(config).state_dict().items()}


def _resolve_config(path: Path, config, preset) -> NoiseModelConfig:
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        raw = read_config(path)
        if raw.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{path}/{CONFIG_NAME}: model_type must be {MODEL_TYPE!r}, got {raw.get('model_type')!r}")
        return NoiseModelConfig.from_saved(raw.get("config"), path / CONFIG_NAME)
    if config is not None:
        return config
    if preset is not None:
        return noise_model_preset(preset)
    raise InvalidArgument(
        f"{path}: a released .pth / bare safetensors noise model needs `preset` ('sd35' or 'sdxl') or `config`")


def load_noise_model(path: Union[str, os.PathLike], *, config: Optional[NoiseModelConfig] = None,
                     preset: Optional[str] = None, dtype: torch.dtype = torch.float32,
                     device: Union[str, torch.device] = "cpu") -> NoiseModel:
    """Load a noise model from a released .pth, a .safetensors file, or a save_noise_model directory."""
    path = Path(path)
    cfg = _resolve_config(path, config, preset)
    state = read_state_dict(path)
    model = build_meta_model(cfg)
    expected = model.state_dict()  # shapes and dtypes checked against these
    kept = validate_state_dict(
        state, expected, what=f"noise model ({cfg.base or 'custom'} config)",
        hint="Check the preset/config (in_channels, num_layers, text_tokens, pooled_dim, lora_rank, num_experts).")
    try:  # a NaN noise model would turn every image into noise silently
        check_all_finite(f"{path}: noise model", kept)
    except NonFiniteError as e:
        raise CheckpointError(str(e)) from None
    kept = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in kept.items()}
    model.load_state_dict(kept, strict=True, assign=True)
    return model.eval()


def save_noise_model(model: NoiseModel, directory: Union[str, os.PathLike]) -> None:
    save_pretrained(directory, model.state_dict(), {"model_type": MODEL_TYPE, "config": model.config.to_dict()})
