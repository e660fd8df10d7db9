"""llamagen_core2: a fast LlamaGen-compatible AR image generator with CoRe^2 guidance.

    from llamagen_core2 import LlamaGenPipeline, GuidanceConfig, GPT, VQModel, WeakModel, CaptionEncoder, generate

The names are imported on first use (module `__getattr__`), so `import llamagen_core2` stays cheap (no torch
import) and `llamagen-core2 --help` fast. Where each concern lives (sub-packages and the import floors between
them): docs/design.md#layout.

Module paths from before the sub-packages (`llamagen_core2.engine`, `.guidance_config`, `.weak_model`, ...)
still import: `_MOVED` maps each to its module, and `import llamagen_core2.<old path>` gives that same module
object (so monkeypatching either name patches the one module). New code uses the new paths.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

from .optional import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {  # public name -> module (relative to the package) it is imported from on first use
    "GPT": "decode.model", "KVCache": "decode.kv_cache", "Engine": "decode.engine", "GenerationStats": "decode.step",
    "StepRecord": "decode.step", "generate": "decode.generate",
    "VQModel": "encoders.vq", "CaptionEncoder": "encoders.text",
    "WeakModel": "core2.weak_model", "sample_images": "core2.sample",
    "LlamaGenPipeline": "pipeline", "LlamaGenPipelineOutput": "pipeline",
    "GuidanceConfig": "guidance.config", "Schedule": "guidance.config", "make_schedule": "guidance.config",
    "MODE_TABLE": "guidance.config", "MODES": "guidance.config", "mix_guidance": "guidance.mixing",
    "guided_sample": "guidance.sampling", "image_key": "guidance.seeding", "row_keys": "guidance.seeding",
    "InvalidArgument": "errors", "CheckpointError": "errors", "NonFiniteError": "errors",
    "MissingDependency": "errors",
}
__all__ = sorted(_EXPORTS)

_MOVED = {  # module path before the sub-packages (issue 23) -> its module now, both relative to the package
    "files": "io.files", "checkpoint": "io.checkpoint", "hub": "io.hub", "images": "io.images",
    "run_settings": "io.run_settings", "shards": "io.shards",
    "guidance_config": "guidance.config", "philox": "guidance.philox", "seeding": "guidance.seeding",
    "model": "decode.model", "block_ops": "decode.block_ops", "decode_ops": "decode.decode_ops",
    "engine": "decode.engine", "static_decode": "decode.static_decode", "generate": "decode.generate",
    "jacobi": "decode.jacobi", "memory": "decode.memory",
    "vq": "encoders.vq", "text": "encoders.text",
    "weak_model": "core2.weak_model", "collect": "core2.collect", "reflect": "core2.reflect", "sample": "core2.sample",
    "cli_common": "cli.args", "core2_cli": "cli.core2", "diffusion.cli": "cli.diffusion",
}


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


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """The import hook behind `_MOVED`: `import llamagen_core2.<old path>` loads nothing of its own, it returns the
    module at the new path, so both names are one object in sys.modules."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname[len(__name__) + 1:] if fullname.startswith(__name__ + ".") else None
        if old not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name[len(__name__) + 1:]]}")
        spec.loader_state = module.__spec__  # the import system sets module.__spec__ to this alias spec: undone below
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """An exported name stays what `_EXPORTS` says: `llamagen_core2.generate` is the function, and importing the
    module of the same name (`llamagen_core2.generate`, an old path of `llamagen_core2.decode.generate`), which
    the import system binds on the package, does not replace it. `from llamagen_core2.generate import ...` is
    unaffected."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
