"""GPU skips in one place: ``gpu`` tests need a CUDA device; ``cuda_build`` tests also need _C built with CUDA."""

from __future__ import annotations

import pytest
import torch


def _cuda_kernels_built() -> bool:
    try:
        from lowbit_engine import _C
    except ImportError:
        return False
    return bool(getattr(_C, "with_cuda", False))


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    built = _cuda_kernels_built()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on a lent GPU)")
    skip_build = pytest.mark.skip(reason="lowbit_engine._C was built without CUDA (LOWBIT_CUDA=0 or no nvcc)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        elif "cuda_build" in item.keywords and not built:  # Triton-only GPU tests run without it
            item.add_marker(skip_build)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seeded generator per test: random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)
