"""examples/: the two scripts run on the bundled Paris sample with the tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import rasterio

from deo_cli.io.sources import sample_path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--model", "deo_swin_test", "--weights", "random", "--chip-size", "64"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _tiny(one_torch_thread):
    """The tiny model runs faster on one torch thread (see tests/conftest.py)."""


def test_embed_kmeans_writes_a_georeferenced_cluster_map(tmp_path, capsys):
    out = tmp_path / "clusters.tif"
    clusters = _load("embed_kmeans").main(["sample:paris", "-o", str(out), "--k", "4", *TINY])
    with rasterio.open(out) as ds, rasterio.open(sample_path("paris")) as src:
        values = ds.read(1)
        assert ds.crs == src.crs and ds.transform.almost_equals(src.transform * src.transform.scale(16))
        assert ds.shape == (26, 25) and ds.nodata == 255
    np.testing.assert_array_equal(values, clusters.values)
    assert set(np.unique(values)) == {0, 1, 2, 3}  # every pixel valid, every cluster used
    assert "4 clusters" in capsys.readouterr().out


def test_change_paris_writes_score_and_polygons(tmp_path, capsys):
    out, polys = tmp_path / "change.tif", tmp_path / "change.parquet"
    change, polygons = _load("change_paris").main(["-o", str(out), "--polygons", str(polys), *TINY])
    with rasterio.open(out) as ds, rasterio.open(sample_path("paris")) as src:
        assert ds.crs == src.crs and ds.shape == change.score.shape
        np.testing.assert_array_equal(ds.read(1), change.score.values)
    assert set(np.unique(change.mask.values)) <= {0, 1, 255}
    flagged = float((change.mask.values == 1).mean())
    assert flagged == pytest.approx(change.attrs["changed_fraction"], abs=1e-6) and 0 < flagged < 0.2
    assert len(polygons) == change.attrs["polygon_count"] >= 1 and polygons.crs == src.crs
    assert f"{len(polygons)} polygons" in capsys.readouterr().out
