"""STAC inputs on local data only: items and an ItemCollection over COGs made from ../shared/data,
a STAC API on 127.0.0.1 searched through pystac-client, bands from assets by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from deo_cli.errors import BandError, InputNotFoundError, UsageError
from deo_cli.io.raster import open_scene
from deo_cli.io.stac import asset_bands, map_assets, parse_query, read_stac, search_items
from deo_cli.sensors import DEO_S2_MANIFEST
from tests.cli.helpers import assert_one_line_error, run
from tests.io.stac_fixtures import make_items, serve_items, write_item_collection


@pytest.fixture(scope="module")
def items_json(shared_data, tmp_path_factory):
    """Two items (Earth Search and Planetary Computer asset naming) in an ItemCollection file."""
    root = tmp_path_factory.mktemp("stac")
    return write_item_collection(make_items(shared_data, root, n=2), root / "items.json")


@pytest.fixture
def api(shared_data, tmp_path):
    server = serve_items(shared_data, tmp_path / "www")
    yield server
    server.close()


def test_asset_bands_by_name_from_bands_eo_bands_key_and_file_name():
    assert asset_bands("B04", {"bands": [{"name": "B04"}]}) == (("B04",), ("bands B04",))
    # STAC 1.1 bands with only a common name; eo:bands name unknown, common name known
    assert asset_bands("x", {"bands": [{"name": "band8a", "eo:common_name": "nir08"}]})[0] == ("B8A",)
    assert asset_bands("x", {"eo:bands": [{"name": "band1", "common_name": "swir16"}]})[0] == ("B11",)
    assert asset_bands("red", {"href": "a.tif"}) == (("B04",), ("asset key red",))
    assert asset_bands("data", {"href": "https://h/T31UDQ_20240615_B8A_20m.tif?sig=1"})[0] == ("B8A",)
    # a 3-band file keeps its band order; a band deo does not know stays unnamed
    names, labels = asset_bands("x", {"eo:bands": [{"name": "red"}, {"name": "qa"}, {"name": "B03"}]})
    assert names == ("B04", "", "B03") and "unknown to deo" in labels[1]
    assert asset_bands("scl", {"href": "SCL.tif"})[0] == ("",)


def test_assets_renderings_metadata_duplicates_and_unknown_bands_are_left_out_with_a_reason():
    cog = "image/tiff; application=geotiff; profile=cloud-optimized"
    assets = {
        "red-jp2": {
            "href": "T31UDQ_B04.jp2",
            "type": "image/jp2",
            "roles": ["data"],
        },  # listed first, still loses
        "red": {"href": "T31UDQ_B04.tif", "type": cog, "roles": ["data"]},
        "visual": {"href": "tci.tif", "type": cog, "roles": ["visual"], "eo:bands": [{"name": "red"}]},
        "scl": {"href": "scl.tif", "type": cog, "roles": ["data"]},
        "thumbnail": {"href": "t.png", "type": "image/png", "roles": ["thumbnail"]},
        "nir": {"href": "sub/n.tif", "type": cog},
    }
    got = {a.key: a for a in map_assets(assets, "/data/item.json")}
    assert list(got) == list(assets)  # the item's order
    assert [k for k, a in got.items() if a.used] == ["red", "nir"]
    assert got["red-jp2"].why == "band B04 is read from asset red"
    assert got["visual"].why == "a rendering, not measurements" and got["scl"].why == "no band deo knows"
    assert got["thumbnail"].why == "not a raster"
    assert got["nir"].href == "/data/sub/n.tif"  # relative to the item's own file


def test_item_collection_scenes_carry_identity_and_read_bands_by_name(items_json):
    scenes = read_stac(str(items_json))
    assert [s.id for s in scenes] == ["S2A_MSIL2A_20170613T101031_87_48", "S2A_MSIL2A_20170617T113321_36_85"]
    es, pc = scenes
    assert (es.datetime, es.platform, es.cloud_cover, es.collection) == (
        "2017-06-13T10:10:31Z",
        "sentinel-2a",
        0.0,
        "sentinel-2-l2a",
    )
    assert pc.cloud_cover == 10.0 and es.href.endswith(f"{es.id}.json")
    for s in scenes:
        scene = open_scene(s)
        assert scene.name == s.id and scene.datetime == s.datetime and scene.stac["id"] == s.id
        assert {b.named_by for b in scene.sources} == {"stac"} and len(scene.sources) == 12
        # the 10 DEO bands read by name equal the COGs the assets point at
        sample = scene.read(list(DEO_S2_MANIFEST.bands))
        by_band = {b.name: b.path for b in scene.sources}
        with rasterio.open(by_band["B8A"]) as ds:  # 20 m, resampled onto the 10 m grid
            assert ds.res == (20.0, 20.0)
        with rasterio.open(by_band["B03"]) as ds:
            np.testing.assert_array_equal(sample.data[1], ds.read(1).astype(np.float32))
    es_assets = {a.key: a for a in es.assets}
    assert es_assets["nir08"].bands == ("B8A",) and not es_assets["red-jp2"].used
    assert es_assets["metadata"].why == "not a raster"


def test_one_item_file_is_one_scene_and_a_list_of_items_is_not(items_json, tmp_path):
    es = json.loads(items_json.read_text())["features"][0]
    single = tmp_path / "item.json"
    single.write_text(json.dumps(es))
    (scene,) = read_stac(str(single))
    assert scene.id == es["id"] and len(scene.used) == 12
    with pytest.raises(InputNotFoundError, match="holds 2 STAC items, not one scene"):
        open_scene(str(items_json))


def test_unusable_json_and_items_are_one_line_errors(tmp_path, items_json):
    other = tmp_path / "labels.json"
    other.write_text('{"labels": ["forest"]}')
    result, lines = run(["inspect", str(other)])
    assert_one_line_error(result, lines, 1, "is JSON but not a STAC Item")
    empty = json.loads(items_json.read_text())["features"][0]
    empty["assets"] = {"thumbnail": {"href": "t.png", "type": "image/png"}}
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(empty))
    with pytest.raises(BandError, match="no asset deo can read as a band"):
        open_scene(str(path))


def test_query_parsing():
    assert parse_query(["eo:cloud_cover<20", "platform=sentinel-2b", "view:sun_elevation>=30.5"]) == {
        "eo:cloud_cover": {"lt": 20},
        "platform": {"eq": "sentinel-2b"},
        "view:sun_elevation": {"gte": 30.5},
    }
    with pytest.raises(UsageError, match="PROPERTY<op>VALUE"):
        parse_query(["cloudy"])


def test_search_a_stac_api_on_localhost(api):
    found = search_items(
        api.url,
        collections=["sentinel-2-l2a"],
        bbox="-180,-90,180,90",
        datetime="2017-06/2017-09",
        query=["eo:cloud_cover<40"],
    )
    # 6 patches: 4 from June to September 2017, of which cloud cover 0, 10, 20 (not 30)
    assert [s.id for s in found] == [
        "S2A_MSIL2A_20170613T101031_87_48",
        "S2A_MSIL2A_20170617T113321_36_85",
        "S2A_MSIL2A_20170617T113321_4_55",
    ]
    posts = [p for m, path, p in api.log if m == "POST"]
    assert posts[0]["query"] == {"eo:cloud_cover": {"lt": 40}}  # a number, not the string "40"
    assert len(posts) == 2  # pages of 2 items: pystac-client followed "next"
    # the assets are read over HTTP through GDAL's /vsicurl/ (ranges), the same pixels as on disk
    scene = open_scene(found[0])
    assert scene.paths[0].startswith(api.url)
    sample = scene.read(["B04"])
    with rasterio.open(api.httpd.root / "cogs" / found[0].id / "B04.tif") as ds:
        np.testing.assert_array_equal(sample.data[0], ds.read(1).astype(np.float32))
    assert any(m == "GET" and path.endswith("B04.tif") for m, path, _ in api.log)


def test_search_errors_are_one_line(api):
    result, lines = run(["inspect", "--stac", api.url, "--datetime", "2030-01/2030-02"])
    assert_one_line_error(result, lines, 1, "found no items", "Widen --bbox or --datetime")
    result, lines = run(["inspect", "--stac", "http://127.0.0.1:9/", "--collection", "x"])
    assert_one_line_error(result, lines, 1, "cannot reach the STAC API at http://127.0.0.1:9/")
    result, lines = run(["inspect", "--collection", "sentinel-2-l2a"])
    assert_one_line_error(result, lines, 2, "--collection filters a STAC search", "Add --stac URL")
    result, lines = run(["inspect", "--stac", api.url, "--query", "cloudy"])
    assert_one_line_error(result, lines, 2, "--query 'cloudy' is not PROPERTY<op>VALUE")


def test_inspect_shows_which_asset_gives_each_band(api):
    result = run(["inspect", "--stac", api.url, "--query", "eo:cloud_cover=0", "--json"])[0]
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.stdout)
    st = report["stac"]
    assert st["id"] == report["scene"] == "S2A_MSIL2A_20170613T101031_87_48" and st["eo:cloud_cover"] == 0
    used = {a["key"]: a["bands"] for a in st["assets"] if a["used"]}
    assert used["nir08"] == ["B8A"] and used["red"] == ["B04"] and len(used) == 12
    left = {a["key"]: a["why"] for a in st["assets"] if not a["used"]}
    assert left == {
        "red-jp2": "band B04 is read from asset red",
        "visual": "a rendering, not measurements",
        "metadata": "not a raster",
    }
    b8a = next(b for b in report["bands"] if b["name"] == "B8A")
    assert (
        b8a["named_by"] == "stac"
        and b8a["label"] == "asset nir08: bands nir08"
        and b8a["resolution"] == [20, 20]
    )
    assert report["manifests"]["deo-s2-10"]["satisfied"]
    text = run(["inspect", "--stac", api.url, "--query", "eo:cloud_cover=0"])[0].stdout
    assert (
        "STAC item   S2A_MSIL2A_20170613T101031_87_48" in text
        and "no: band B04 is read from asset red" in text
    )
