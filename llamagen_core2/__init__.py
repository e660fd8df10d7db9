"""llamagen_core2: a fast LlamaGen-compatible AR image generator with CoRe^2 guidance.

    from llamagen_core2 import LlamaGenPipeline, GuidanceConfig, GPT, VQModel, WeakModel, CaptionEncoder, generate

The names are imported on first use (module `__getattr__`), so `import llamagen_core2` stays cheap (no torch
import) and `llamagen-core2 --help` fast.
"""
import importlib
import importlib.machinery
import importlib.util
import os
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


def _bind_kernels_from_checkout() -> None:
    """Make `llamagen_core2.kernels` the top-level `kernels/` folder of a checkout (editable install, or the
    repository root on sys.path).

    That folder has no `__init__.py` on purpose: with one, any Python started in the repository root
    (`python -m pytest`, a benchmark script) would import it as the top-level package `kernels`, shadowing the
    PyPI package of that name that transformers and diffusers import. Without one, setuptools' editable finder
    cannot map it as a subpackage, so it is bound here, as the namespace package the import system would build.
    An installed wheel holds `llamagen_core2/kernels/` as a real subdirectory and needs none of this.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")):
        return
    folder = os.path.join(os.path.dirname(here), "kernels")
    name = f"{__name__}.kernels"
    if name in sys.modules or not os.path.isdir(folder):
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [folder]
    sys.modules[name] = globals()["kernels"] = importlib.util.module_from_spec(spec)


_bind_kernels_from_checkout()


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
