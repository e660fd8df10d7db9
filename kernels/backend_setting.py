"""`LLAMAGEN_CORE2_KERNELS`: the kernel backend a user asks for (auto | triton | torch), read on every call so tests
can flip it. What each value means is decided in one place, kernels/dispatch.py; the timed choices
(kernels/timed_choice.py) read it too (a forced backend forces their candidates). Imports nothing of the package."""
from __future__ import annotations

import os

from ..errors import InvalidArgument

ENV_VAR = "LLAMAGEN_CORE2_KERNELS"
CHOICES = ("auto", "triton", "torch")


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise InvalidArgument(f"{ENV_VAR} must be one of {CHOICES}, got {value!r}")
    return value
