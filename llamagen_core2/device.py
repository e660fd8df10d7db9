"""Which torch device a command runs on: the one `--device` rule shared by every subcommand.

Contract (`resolve_device(spec) -> torch.device`):
  * "auto" (or None): "cuda" when CUDA is available, else "cpu".
  * "cpu" -> cpu; "mps" -> mps when available.
  * "cuda" -> cuda:LOCAL_RANK under torchrun (each process on its own GPU), cuda:0 otherwise. When
    LOCAL_RANK is not below the number of visible GPUs and exactly one GPU is visible (a launcher that sets
    CUDA_VISIBLE_DEVICES per process), that one GPU is used.
  * "cuda:N" is kept as typed, after checking that GPU N exists.
  * The chosen GPU becomes the current CUDA device (torch.cuda.set_device with an index: a bare "cuda"
    device has no index and set_device refuses it), so kernels and CUDA graphs that use the current device
    land on it too.
  * Anything else, or a GPU that is not there, is an InvalidArgument naming the value and the allowed forms.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Union

import torch

from .errors import InvalidArgument

DEVICE_FORMS = "'auto', 'cpu', 'cuda', 'cuda:N' (N = GPU index) or 'mps'"
_PATTERN = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def local_rank() -> Optional[int]:
    """torchrun's LOCAL_RANK as an int, None when unset; InvalidArgument when it is not a non-negative int."""
    value = os.environ.get("LOCAL_RANK")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise InvalidArgument(f"environment variable LOCAL_RANK must be a non-negative integer, got {value!r}")
    return int(value)


def parse_device(spec: Union[str, torch.device, None]) -> tuple[str, Optional[str]]:
    """`--device` text -> (kind, index or None), checking only the form (the CLI parses with it, no CUDA query)."""
    text = "auto" if spec is None else str(spec).strip()
    match = _PATTERN.fullmatch(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise InvalidArgument(f"device must be {DEVICE_FORMS}, got {text!r}")
    return match.group(1), match.group(2)


def resolve_device(spec: Union[str, torch.device, None] = "auto") -> torch.device:
    """`--device` text (or a torch.device) -> a concrete torch.device, by the rules in the module docstring."""
    text = "auto" if spec is None else str(spec).strip()
    kind, index = parse_device(text)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InvalidArgument("device 'mps' requested but Apple MPS is not available on this machine")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"device {text!r} requested but CUDA is not available "
                              f"(torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if index is not None:
        gpu = int(index)
    else:
        rank = local_rank()
        gpu = 0 if rank is None else rank
        if gpu >= count and count == 1:
            gpu = 0  # one visible GPU per process (the launcher set CUDA_VISIBLE_DEVICES)
        if gpu >= count:
            raise InvalidArgument(f"device 'cuda' under torchrun: LOCAL_RANK {rank} has no GPU "
                                  f"({count} visible, indices 0..{count - 1})")
    if gpu >= count:
        raise InvalidArgument(f"device {text!r}: there is no GPU {gpu} ({count} visible, indices 0..{count - 1})")
    torch.cuda.set_device(gpu)
    return torch.device("cuda", gpu)
