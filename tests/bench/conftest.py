"""Bench tests run many small tensor ops: one torch thread avoids fighting over shared cores."""

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    yield
