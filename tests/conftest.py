"""Test-session setup shared by all test files.

Without CUDA the Triton kernels run under the interpreter, which triton only honours when
TRITON_INTERPRET=1 is in the environment before `triton` is first imported -- hence here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny ops: on a shared 2-core box extra threads only add contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
