"""Catalog-scale ``deo embed``: STAC items in, scenes over ranks and shards, a catalog out.

On local data only: items over COGs made from ../shared/data (:mod:`tests.io.stac_fixtures`),
the tiny test model, 2 gloo ranks on the CPU.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import RasterExtension
from pystac.validation import JsonSchemaSTACValidator
from rasterio.warp import transform_bounds

from deo_cli.recipes import EmbedRecipe, build_recipe
from deo_cli.tasks.embed.predict import run_embed
from tests.cli.helpers import run
from tests.infer.helpers import assert_valid_cog
from tests.io.stac_fixtures import make_items, synthetic_items, write_item_collection

FAST = ["--model", "deo_swin_test", "--weights", "random", "--num-workers", "0"]
IDS = [
    "S2A_MSIL2A_20170613T101031_87_48",
    "S2A_MSIL2A_20170617T113321_36_85",
    "S2A_MSIL2A_20170617T113321_4_55",
    "S2A_MSIL2A_20171221T112501_56_35",
    "S2B_MSIL2A_20170924T93020_69_24",
    "S2B_MSIL2A_20180204T94161_57_38",
]


@pytest.fixture(scope="module")
def items(shared_data, tmp_path_factory) -> Path:
    """The six BigEarthNet patches as STAC items (EPSG:32629, 32633, 32635) in an ItemCollection."""
    root = tmp_path_factory.mktemp("items")
    return write_item_collection(make_items(shared_data, root), root / "items.json")


def recipe(*sets):
    return build_recipe(
        EmbedRecipe,
        sets=["model.name=deo_swin_test", "model.weights=random", "runtime.num_workers=0", *sets],
    )


def index_of(folder: Path, drop=("seconds",)):
    df = gpd.read_parquet(folder / "index.parquet")
    return df.drop(columns=list(drop))


def validate_core(d: dict, kind) -> None:
    """pystac's validation against the core STAC schemas it ships (extension schemas are fetched
    from the web, which the tests do not reach: their fields are checked through pystac's API)."""
    JsonSchemaSTACValidator().validate_core(d, kind, d["stac_version"], None)


def test_item_collection_to_cogs_index_and_a_stac_collection(items, tmp_path):
    out = tmp_path / "out"
    result, _ = run(["embed", str(items), "-o", str(out), "--mosaic", *FAST])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.tif")) == sorted(f"{i}.tif" for i in IDS)  # one COG per item
    assert_valid_cog(out / f"{IDS[0]}.tif")
    assert (
        f"catalog: {out / 'index.parquet'} (6 scenes: 6 written), {out / 'collection.json'}" in result.stdout
    )

    # every output carries its item's identity
    with rasterio.open(out / f"{IDS[1]}.tif") as ds:
        assert json.loads(ds.tags()["DEO_STAC_ITEM"]) == {
            "id": IDS[1],
            "collection": "sentinel-2-l2a",
            "datetime": "2017-06-17T11:33:21Z",
            "platform": "sentinel-2a",
            "eo:cloud_cover": 10.0,
            "href": str(items.parent / "cogs" / IDS[1] / f"{IDS[1]}.json"),
        }
        assert ds.tags()["DEO_DATETIME"] == "2017-06-17T11:33:21Z"

    # index.parquet: GeoParquet in EPSG:4326, one row per scene, footprints = the outputs' bounds
    geo = json.loads(pq.read_schema(out / "index.parquet").metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["geometry_types"] == ["Polygon"]
    df = gpd.read_parquet(out / "index.parquet")
    assert df.crs.to_epsg() == 4326 and list(df.output) == [f"{i}.tif" for i in IDS]
    assert set(df.status) == {"written"} and set(df.model) == {"deo_swin_test"}
    assert set(df.layer) == {2} and set(df.stride) == {16} and set(df["format"]) == {"cog"}
    assert (
        list(df.cloud_cover) == [0, 10, 20, 30, 40, 50] and (df.seconds > 0).all() and (df.chips == 9).all()
    )
    assert list(df.source) == IDS and df.source_href.str.endswith(".json").all()
    for row in df.itertuples():
        with rasterio.open(out / row.output) as ds:
            want = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
            assert row.output_crs == f"EPSG:{ds.crs.to_epsg()}" and (row.width, row.height) == (
                ds.width,
                ds.height,
            )
        np.testing.assert_allclose(row.geometry.bounds, want, rtol=0, atol=1e-9)
    assert sorted(df.output_crs.unique()) == ["EPSG:32629", "EPSG:32633", "EPSG:32635"]

    # the STAC collection: valid, lists every item, each item valid with its extensions
    coll_dict = json.loads((out / "collection.json").read_text())
    validate_core(coll_dict, pystac.STACObjectType.COLLECTION)
    coll = pystac.Collection.from_file(str(out / "collection.json"))
    coll.validate()  # no extension on the collection: every schema is pystac's own
    got = sorted(coll.get_items(), key=lambda i: i.id)
    assert [i.id for i in got] == IDS
    assert coll.extent.temporal.intervals[0][0].isoformat() == "2017-06-13T10:10:31+00:00"
    for item in got:
        validate_core(item.to_dict(), pystac.STACObjectType.ITEM)
        asset = item.assets["embedding"]
        with rasterio.open(asset.get_absolute_href()) as ds:
            proj = ProjectionExtension.ext(item)
            assert proj.code == f"EPSG:{ds.crs.to_epsg()}" and proj.shape == [ds.height, ds.width]
            assert proj.transform == list(ds.transform)[:6]
            bands = RasterExtension.ext(asset).bands
            assert len(bands) == ds.count == 64 and bands[0].data_type == "float32"
            assert bands[0].spatial_resolution == 160.0 and bands[0].nodata == "nan"
        src = item.get_single_link("derived_from").get_absolute_href()
        assert json.loads(Path(src).read_text())["id"] == item.id  # links to its source item
        assert item.properties["eo:cloud_cover"] == df.set_index("source").cloud_cover[item.id]
        assert item.properties["deo:model"] == "deo_swin_test" and item.properties["platform"].startswith(
            "sentinel-2"
        )
        assert item.assets["recipe"].get_absolute_href().endswith(".recipe.yaml")

    # --mosaic: one VRT per CRS, each output's pixels where its bounds are
    vrts = sorted(p.name for p in out.glob("*.vrt"))
    assert vrts == ["mosaic_EPSG_32629.vrt", "mosaic_EPSG_32633.vrt", "mosaic_EPSG_32635.vrt"]
    with rasterio.open(out / "mosaic_EPSG_32635.vrt") as m:
        assert m.count == 64 and m.res == (160.0, 160.0) and m.descriptions[0] == "emb_0000"
        for f in df[df.output_crs == "EPSG:32635"].output:
            with rasterio.open(out / f) as ds:
                win = m.window(*ds.bounds)
                np.testing.assert_array_equal(m.read(window=win), ds.read())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no lock or temporary left


@pytest.mark.slow
def test_shards_and_ranks_give_the_outputs_and_index_of_one_process(items, tmp_path):
    one, shards, ranks = tmp_path / "one", tmp_path / "shards", tmp_path / "ranks"
    run_embed([str(items)], one, recipe())
    first = run_embed([str(items)], shards, recipe(), shard="0/2")
    assert [r.source for r in first] == IDS[0::2] and first.total == 6
    assert list(index_of(shards).output) == [f"{i}.tif" for i in IDS[0::2]]
    run_embed([str(items)], shards, recipe(), shard="1/2")
    run_embed([str(items)], ranks, recipe("gpus=2", "runtime.device=cpu"))

    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in shards.iterdir()) == sorted(p.name for p in ranks.iterdir())
    for name in names:
        if name.endswith((".tif", ".recipe.yaml")):  # the shards' files are the very same bytes
            assert filecmp.cmp(one / name, shards / name, shallow=False), name
        if name.endswith(".tif"):  # the ranks' too, but the recipe hash tag (the recipe says gpus: 2)
            with rasterio.open(one / name) as a, rasterio.open(ranks / name) as b:
                np.testing.assert_array_equal(a.read(), b.read())
                ta, tb = a.tags(), b.tags()
                assert ta.pop("DEO_RECIPE_HASH") != tb.pop("DEO_RECIPE_HASH") and ta == tb
    ref = index_of(one)
    assert ref.equals(index_of(shards)) and ref.equals(index_of(ranks))
    colls = [json.loads((f / "collection.json").read_text()) for f in (one, shards)]
    for c, name in zip(colls, ("one", "shards")):  # a collection is named after its folder
        assert (c.pop("id"), c.pop("title")) == (name, f"deo embeddings: {name}")
    assert colls[0] == colls[1]


def test_a_scene_whose_asset_is_missing_or_unreadable_fails_alone(shared_data, tmp_path):
    root = tmp_path / "items"
    feats = make_items(shared_data, root, n=4)
    missing = root / "gone" / "B04.tif"
    broken = root / "broken_B8A.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    feats[1]["assets"]["B04"]["href"] = str(missing)
    feats[2]["assets"]["nir08"]["href"] = str(broken)
    items = write_item_collection(feats, root / "items.json")
    out = tmp_path / "out"
    result, lines = run(["embed", str(items), "-o", str(out), *FAST])
    assert result.exit_code == 1
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 2, lines
    assert errors[0].startswith(f"error: {IDS[1]}: cannot open {missing}: file not found")
    assert errors[1].startswith(f"error: {IDS[2]}: cannot read {broken} as a raster")
    assert "2 of 4 scenes written, 2 failed" in result.output
    assert sorted(p.name for p in out.glob("*.tif")) == [f"{IDS[0]}.tif", f"{IDS[3]}.tif"]
    df = gpd.read_parquet(out / "index.parquet").set_index("source")
    assert list(df.status) == ["written", "failed", "failed", "written"]
    assert df.loc[IDS[1], "error"].startswith(f"cannot open {missing}") and df.loc[IDS[1], "geometry"] is None
    assert df.loc[IDS[2], "cloud_cover"] == 20 and df.loc[IDS[2], "source_collection"] == "sentinel-2-l2a"

    # the assets come back: --resume embeds only the two that failed
    missing.parent.mkdir()
    missing.write_bytes((root / "cogs" / IDS[1] / "B04.tif").read_bytes())
    broken.write_bytes((root / "cogs" / IDS[2] / "B8A.tif").read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif")}
    stale = out / f".{IDS[0]}.partial.json"  # a run killed between renaming an output and cleaning up
    stale.write_text("{}")
    result, _ = run(["embed", str(items), "-o", str(out), "--resume", *FAST])
    assert not stale.exists()
    assert result.exit_code == 0, result.output
    assert result.stdout.count("skipped (exists, --resume)") == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tif") if p.name in before} == before
    df = gpd.read_parquet(out / "index.parquet")
    assert list(df.status) == ["written"] * 4 and df.error.isna().all() and df.seconds.notna().all()


def _rank_child(pid: int) -> int | None:
    """The spawned rank process among ``pid``'s children (not multiprocessing's resource tracker)."""
    for kid in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with open(f"/proc/{kid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return int(kid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank process through /proc")
def test_a_killed_rank_then_resume_gives_the_outputs_of_an_uninterrupted_run(tmp_path):
    items = write_item_collection(synthetic_items(tmp_path / "src", 8, 384), tmp_path / "items.json")
    ref = tmp_path / "ref"
    run_embed([str(items)], ref, recipe("gpus=2", "runtime.device=cpu"))

    out = tmp_path / "out"
    args = [str(items), "-o", str(out), *FAST, "--gpus", "2", "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deo_cli", "embed", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    # scenes of equal size alternate between the ranks: rank 1 has scenes 1, 3, 5, 7
    t0 = time.monotonic()
    while not (out / "scene_001.tif").exists() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.01)
    rank1 = _rank_child(proc.pid)
    assert rank1 is not None, proc.communicate()
    os.kill(rank1, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert errors and all("rank 1 stopped before finishing it. Rerun with --resume" in e for e in errors), (
        stderr
    )
    assert "Traceback" not in stderr
    df = gpd.read_parquet(out / "index.parquet")
    assert len(df) == 8 and (df.status == "failed").sum() == len(errors)

    result, _ = run(["embed", *args, "--resume"])
    assert result.exit_code == 0, result.output
    for name in sorted(p.name for p in ref.glob("*.tif")):
        assert filecmp.cmp(ref / name, out / name, shallow=False), name
    got, want = index_of(out, drop=("seconds", "chips")), index_of(ref, drop=("seconds", "chips"))
    assert got.equals(want)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
