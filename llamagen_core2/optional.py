"""Optional dependencies: imported where a feature needs them, never when the core package is imported.

`require` is the one place a missing optional package becomes an error that names the pip extra installing it
(`errors.MissingDependency`, a ModuleNotFoundError that the command line prints as one line), instead of a bare
"No module named 'diffusers'" from deep inside a feature.
"""
from __future__ import annotations

import importlib
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
