"""Guidance: the settings of one generation and the math that turns predictions into tokens.

    config.py     the mode table, the effective-mode rule, `Schedule`, `GuidanceConfig` (the one carrier of
                  guidance settings), the model types' default settings
    mixing.py     `mix_guidance`: CFG and CoRe^2 weak-to-strong mixing (AR logits and diffusion predictions)
    sampling.py   `guided_sample`: mix + temperature + top-k + top-p + sampling (torch reference; the fused
                  kernel is kernels/fused_guided_sample.py)
    philox.py     the race noise both sampler backends draw
    seeding.py    the seed rule: one Philox key per image

The public names below are imported from their modules on first use (`from llamagen_core2.guidance import
guided_sample`), so importing one module of this package never imports the others.
"""
from ..optional import lazy_exports

_EXPORTS = {
    "ModeSpec": "config", "MODE_TABLE": "config", "MODES": "config", "MODE_IDS": "config", "check_mode": "config",
    "needs_uncond": "config", "needs_weak": "config", "require_weak": "config", "cfg_is_cond": "config",
    "cfg_mixes": "config", "effective_mode": "config", "reads_uncond": "config", "sampler_inputs": "config",
    "Schedule": "config", "make_schedule": "config", "GuidanceConfig": "config", "Scale": "config",
    "mix_guidance": "mixing",
    "filter_flags": "sampling", "filter_logits": "sampling", "sample_logits": "sampling", "race_key": "sampling",
    "guided_sample": "sampling",
    "image_key": "seeding", "image_keys": "seeding", "row_keys": "seeding",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
