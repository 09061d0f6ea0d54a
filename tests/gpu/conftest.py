"""GPU tests: skipped, with the reason, where no CUDA device is visible.

Every module here marks its tests ``gpu``; ``python -m pytest -m gpu tests/gpu`` runs them on a
GPU machine (``benchmarks/gpu_check.sh`` does). The skip is added at collection, so the tests
themselves never call ``pytest.skip``.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skipif(True, reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _cuda_math_flags():
    """Restore the global matmul / cuDNN settings a test (``train`` sets TF32 and cuDNN
    benchmarking) changes, so the fp32 comparisons of later tests see torch's defaults."""
    import torch

    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.benchmark = saved[1]
    torch.backends.cuda.matmul.allow_tf32 = saved[2]
    torch.backends.cudnn.allow_tf32 = saved[3]
