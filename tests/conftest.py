"""Shared test setup.

Without CUDA, Triton kernels run under Triton's CPU interpreter; the variable must be set before any
kernel module is imported. Tests marked ``gpu`` skip cleanly without CUDA.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine, see README)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU if there is one, else the CPU under TRITON_INTERPRET=1."""
    return "cuda" if HAS_CUDA else "cpu"
