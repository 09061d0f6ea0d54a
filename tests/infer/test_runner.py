"""The streaming runner: forward in micro-batches."""

import numpy as np
import pytest
import torch

from deo_cli.infer.runner import CPU_MICRO_BATCH, _forward, default_micro_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingConv(torch.nn.Module):
    """A conv that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.calls = []

    def forward(self, x):
        self.calls.append(len(x))
        return self.conv(x)


def test_default_micro_batch_is_small_on_the_cpu_and_whole_on_gpus():
    assert default_micro_batch(torch.device("cpu")) == CPU_MICRO_BATCH == 4
    assert default_micro_batch(torch.device("cuda")) == 0
    assert default_micro_batch(torch.device("cuda"), 8) == 8
    assert default_micro_batch(torch.device("cpu"), 16) == 16


@pytest.mark.parametrize("micro", [0, 1, 3, 4, 10, 64])
def test_forward_in_slices_equals_one_forward(micro):
    model = CountingConv()
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = _forward(model, x, torch.device("cpu"), None)
    model.calls.clear()
    y = _forward(model, x, torch.device("cpu"), None, micro_batch=micro)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (10, 5, 8, 8)
    np.testing.assert_allclose(y, whole, rtol=1e-6, atol=1e-6)
    step = micro if 0 < micro < 10 else 10
    assert model.calls == [min(step, 10 - i) for i in range(0, 10, step)]
