"""The catalog beside a folder of outputs: rows from the outputs' own metadata, merged by shards."""

from __future__ import annotations

import json
import threading

import geopandas as gpd
import numpy as np
import pytest
from affine import Affine
from rasterio.warp import transform_bounds

from deo_cli.io.catalog import LOCK, SceneRecord, footprint, read_index, update_catalog
from tests.conftest import write_raster


def embedding(folder, name, crs="EPSG:32631", x0=500000.0, seed=0):
    """A small float32 raster with the tags ``deo embed`` writes (what the index reads)."""
    tags = {
        "DEO_MODEL": "deo_swin_t",
        "DEO_WEIGHTS_SHA256": "ab" * 32,
        "DEO_LAYER": "2",
        "DEO_STRIDE": "16",
        "DEO_VERSION": "9.9",
        "DEO_SOURCE": json.dumps({"scene": name, "paths": [f"/data/{name}.tif"]}),
        "DEO_DATETIME": "2024-06-01T10:00:00Z",
    }
    data = np.random.default_rng(seed).normal(size=(3, 5, 7)).astype("float32")
    path = write_raster(folder / f"{name}.tif", data, crs=crs, transform=Affine(160, 0, x0, 0, -160, 5e6))
    import rasterio

    with rasterio.open(path, "r+") as ds:
        ds.update_tags(**tags)
    return path


def test_rows_come_from_the_outputs_and_footprints_follow_their_bounds(tmp_path):
    out = embedding(tmp_path, "a")
    update_catalog(tmp_path, [SceneRecord(out, "a", "written", seconds=1.5, chips=4)])
    (row,) = read_index(tmp_path)
    assert {k: row[k] for k in ("output", "status", "model", "layer", "stride", "output_crs", "width")} == {
        "output": "a.tif", "status": "written", "model": "deo_swin_t", "layer": 2, "stride": 16,
        "output_crs": "EPSG:32631", "width": 7,
    }  # fmt: skip
    assert row["weights_sha256"] == "ab" * 32 and row["source_datetime"] == "2024-06-01T10:00:00Z"
    assert row["source_href"] == "/data/a.tif" and row["seconds"] == 1.5 and row["chips"] == 4
    want = transform_bounds(
        "EPSG:32631", "EPSG:4326", 500000, 5e6 - 5 * 160, 500000 + 7 * 160, 5e6, densify_pts=21
    )
    np.testing.assert_allclose(row["geometry"].bounds, want, atol=1e-9)
    # a UTM square is not a lon/lat rectangle: the footprint follows its curved edges
    poly = footprint((300000, 4e6, 700000, 5e6), __import__("rasterio").crs.CRS.from_epsg(32631))
    assert len(poly.exterior.coords) == 81 and not poly.equals(poly.envelope)


def test_shards_merge_into_one_index_and_a_later_success_replaces_a_failure(tmp_path):
    outs = [embedding(tmp_path, f"s{i}", seed=i, x0=500000.0 + 2000 * i) for i in range(6)]
    records = [SceneRecord(o, o.stem, "written", seconds=1.0, chips=2) for o in outs]
    records[3] = SceneRecord(tmp_path / "s3.tif", "s3", "failed", error="cannot read s3. Check it.")
    start = threading.Barrier(2)

    def shard(k):
        start.wait()
        update_catalog(tmp_path, records[k::2])

    threads = [threading.Thread(target=shard, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    df = gpd.read_parquet(tmp_path / "index.parquet")
    assert list(df.output) == [f"s{i}.tif" for i in range(6)]
    assert list(df.status) == ["written"] * 3 + ["failed"] + ["written"] * 2
    assert df.loc[3, "error"] == "cannot read s3. Check it." and df.loc[3, "geometry"] is None
    coll = json.loads((tmp_path / "collection.json").read_text())
    assert sorted(lk["href"] for lk in coll["links"] if lk["rel"] == "item") == [
        f"./s{i}.item.json" for i in (0, 1, 2, 4, 5)
    ]
    assert not (tmp_path / LOCK).exists()
    # --resume later: the failed one is written, the others skipped keep their rows (seconds too)
    again = [SceneRecord(o, o.stem, "skipped") for o in outs]
    again[3] = SceneRecord(outs[3], "s3", "written", seconds=2.0, chips=2)
    result = update_catalog(tmp_path, again)
    df = gpd.read_parquet(tmp_path / "index.parquet")
    assert set(df.status) == {"written"} and list(df.seconds) == [1.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    assert [p.name for p in result.items] == ["s3.item.json"]  # only the new output's item is rewritten


def test_a_collection_is_not_written_without_an_output(tmp_path):
    result = update_catalog(tmp_path, [SceneRecord(tmp_path / "x.tif", "x", "failed", error="no. Fix it.")])
    assert result.collection is None and not (tmp_path / "collection.json").exists()
    assert read_index(tmp_path)[0]["status"] == "failed"


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_other_formats_are_indexed_from_their_metadata(tmp_path, fmt):
    if fmt == "zarr":
        pytest.importorskip("zarr")
    from deo_cli.io.catalog import output_info

    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "v.parquet"
        geo = {"primary_column": "geometry", "columns": {"geometry": {"encoding": "WKB",
               "bbox": [500000, 4990000, 501000, 5000000], "crs": __import__("pyproj").CRS.from_epsg(32631).to_json_dict()}}}  # fmt: skip
        meta = {
            b"geo": json.dumps(geo).encode(),
            b"deo": json.dumps({"deo_model": "m", "deo_layer": 1}).encode(),
        }
        pq.write_table(pa.table({"id": ["a", "b"]}).replace_schema_metadata(meta), path)
        info = output_info(path, "parquet")
        assert info["crs"].to_epsg() == 32631 and info["bounds"][0] == 500000 and info["height"] is None
        assert info["meta"]["deo_model"] == "m"
    else:
        path = tmp_path / "e.zarr"
        path.mkdir()
        attrs = {"proj:code": "EPSG:32631", "spatial:shape": [5, 7], "spatial:bbox": [0, 0, 7, 5],
                 "spatial:transform": [1, 0, 0, 0, -1, 5], "deo:DEO_MODEL": "m", "deo:DEO_LAYER": "1"}  # fmt: skip
        (path / "zarr.json").write_text(json.dumps({"attributes": attrs}))
        info = output_info(path, "zarr")
        assert (info["width"], info["height"]) == (7, 5) and info["meta"] == {
            "deo_model": "m",
            "deo_layer": 1,
        }
