import json

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
from affine import Affine
from rasterio.crs import CRS

from deo_cli.errors import OutputExistsError, UsageError
from deo_cli.io.grid import Grid
from deo_cli.io.vector import polygonize, write_vectors

GRID = Grid(CRS.from_epsg(32633), Affine(10, 0, 500000, 0, -10, 5000000), 40, 30)


def _mask():
    m = np.zeros((30, 40), bool)
    m[2:6, 3:8] = True  # 4 x 5 px rectangle: 20 px = 2000 m2
    m[10:20, 10:20] = True  # 10 x 10 square with a 2 x 2 hole: 96 px
    m[14:16, 14:16] = False
    m[25, 30] = True  # a single pixel: 100 m2
    m[26, 31] = True  # touches it diagonally: same region under 8-connectivity
    return m


def test_polygon_count_areas_and_crs():
    score = np.zeros((30, 40), np.float32)
    score[2:6, 3:8] = 0.5
    score[10:20, 10:20] = 0.9
    score[12, 12] = 1.0
    gdf = polygonize(_mask(), GRID, score=score)
    assert gdf.crs == GRID.crs
    # shapes() yields one polygon per 8-connected region (the diagonal pair becomes a multi-part
    # boundary: rasterio emits it as one polygon only when connected through an edge)
    areas = sorted(gdf["area"].round(3).tolist())
    assert sum(gdf["pixels"]) == 20 + 96 + 2
    assert 2000.0 in areas and 9600.0 in areas
    big = gdf[gdf["area"] == 9600.0].iloc[0]
    assert len(big.geometry.interiors) == 1  # the hole survives
    assert big["score_max"] == pytest.approx(1.0)
    assert big["score_mean"] == pytest.approx((95 * 0.9 + 1.0) / 96, rel=1e-5)
    # bounds in map coordinates: the rectangle starts 3 px right, 2 px down of the origin
    rect = gdf[gdf["area"] == 2000.0].iloc[0].geometry
    assert rect.bounds == (500030.0, 4999940.0, 500080.0, 4999980.0)
    np.testing.assert_allclose(gdf["area_m2"], gdf["area"])  # UTM: metres already


def test_area_in_square_metres_for_a_geographic_crs():
    # 0.001 deg pixels at 45 N: about 111.1 km x 78.8 km per degree -> 20 px ~ 1.75e5 m2
    grid = Grid(CRS.from_epsg(4326), Affine(0.001, 0, 10.0, 0, -0.001, 45.0), 40, 30)
    gdf = polygonize(_mask(), grid)
    rect = gdf[gdf["pixels"] == 20].iloc[0]
    assert rect["area"] == pytest.approx(20e-6)  # degrees squared
    lat = np.radians(45.0 - 0.004)
    approx = 20 * (111_132.0 * 0.001) * (111_320.0 * np.cos(lat) * 0.001)
    assert rect["area_m2"] == pytest.approx(approx, rel=5e-3)


def test_min_area_filter_and_valid_mask():
    gdf = polygonize(_mask(), GRID, min_area=1500)
    assert sorted(gdf["area"].tolist()) == [2000.0, 9600.0] and gdf["id"].tolist() == [1, 2]
    valid = np.ones((30, 40), bool)
    valid[:, :9] = False
    assert sorted(polygonize(_mask(), GRID, valid=valid, min_area=1500)["area"].tolist()) == [9600.0]
    assert len(polygonize(np.zeros((30, 40), bool), GRID)) == 0


def test_write_geoparquet_and_gpkg(tmp_path):
    gdf = polygonize(_mask(), GRID)
    pq_path = write_vectors(gdf, tmp_path / "change.parquet", metadata={"model": "deo_swin_b"})
    back = gpd.read_parquet(pq_path)
    assert back.crs == GRID.crs and len(back) == len(gdf)
    meta = pq.read_schema(pq_path).metadata
    assert json.loads(meta[b"deo"])["model"] == "deo_swin_b" and b"geo" in meta
    gpkg = write_vectors(gdf, tmp_path / "change.gpkg")
    assert gpd.read_file(gpkg).crs == GRID.crs
    with pytest.raises(OutputExistsError):
        write_vectors(gdf, tmp_path / "change.gpkg")
    with pytest.raises(UsageError, match="WGS84"):
        write_vectors(gdf, tmp_path / "change.geojson")
    with pytest.raises(UsageError, match="cannot tell the vector format"):
        write_vectors(gdf, tmp_path / "change.shp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["change.gpkg", "change.parquet"]
