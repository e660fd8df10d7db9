"""Test-session setup shared by all test files.

Without CUDA the Triton kernels run under the interpreter, which triton only honours when
TRITON_INTERPRET=1 is in the environment before `triton` is first imported -- hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
