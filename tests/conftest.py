"""Setup shared by all test files.

Without CUDA the Triton kernels run under the interpreter, which triton only honours when
TRITON_INTERPRET=1 is in the environment before `triton` is first imported -- hence here.
Tests marked `gpu` (pyproject.toml) need CUDA and are skipped on a machine without it.
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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run on a GPU machine, e.g. benchmarks/gpu_report.py")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
