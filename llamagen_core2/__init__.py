"""llamagen_core2: a fast LlamaGen-compatible AR image generator with CoRe^2 guidance.

    from llamagen_core2 import LlamaGenPipeline, GuidanceConfig, GPT, VQModel, WeakModel, CaptionEncoder, generate

The names are imported on first use (module `__getattr__`), so `import llamagen_core2` stays cheap (no torch
import) and `llamagen-core2 --help` fast.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "GPT": "model", "VQModel": "vq", "WeakModel": "weak_model", "CaptionEncoder": "text", "generate": "generate",
    "LlamaGenPipeline": "pipeline", "LlamaGenPipelineOutput": "pipeline", "GuidanceConfig": "guidance_config",
    "Schedule": "guidance_config", "make_schedule": "guidance_config", "InvalidArgument": "errors",
    "CheckpointError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`llamagen_core2.generate` is the function: importing the submodule of the same name (which the import system
    binds on the package) must not replace it. `from llamagen_core2.generate import ...` is unaffected."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
