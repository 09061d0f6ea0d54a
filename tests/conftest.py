"""Shared fixtures: the real Sentinel-2 data beside the checkout, and small raster factories."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (real Sentinel-2 data; see each folder's SOURCE.md)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}: clone the project beside ../shared")
    return SHARED_DATA
