"""Imported on use: optional dependencies where a feature needs them, and a package's public names.

`require` is the one place a missing optional package becomes an error that names the pip extra installing it
(`errors.MissingDependency`, a ModuleNotFoundError that the command line prints as one line), instead of a bare
"No module named 'diffusers'" from deep inside a feature. `lazy_exports` gives a package names that are imported
from its modules on first use, so importing the package (or one of its modules) imports nothing else.
"""
from __future__ import annotations

import importlib
import sys
import types

from .errors import MissingDependency

# top-level package -> the extra of pyproject.toml that installs it
EXTRAS = {"diffusers": "diffusion", "triton": "triton"}


def require(module: str, feature: str) -> types.ModuleType:
    """Import `module` for `feature` (e.g. "the diffusion adapter"), or raise MissingDependency naming the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        package = module.partition(".")[0]
        if (e.name or "").partition(".")[0] != package:
            raise  # the package is there but something it imports is not: not ours to rename
        raise MissingDependency(f"{feature} needs the optional package {package}, which is not installed: "
                                f"pip install -e \".[{EXTRAS[package]}]\" in the repository", name=package) from None


def lazy_exports(package: str, exports: dict):
    """(__getattr__, __dir__) for the package `package` whose public names are `exports` (name -> module relative
    to the package): a name is imported from its module on first access and then bound on the package."""
    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
