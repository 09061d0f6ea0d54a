import json

import numpy as np
import pytest

from deo_cli.errors import UnitError
from deo_cli.io.inspect import inspect_scene
from deo_cli.io.units import conversion_factor, infer_unit

S2_RES = {
    "B01": 60,
    "B02": 10,
    "B03": 10,
    "B04": 10,
    "B05": 20,
    "B06": 20,
    "B07": 20,
    "B08": 10,
    "B8A": 20,
    "B09": 60,
    "B10": 60,
    "B11": 20,
    "B12": 20,
}


def _scene_folders(shared_data):
    ben = sorted(p for p in (shared_data / "bigearthnet_s2_example").iterdir() if p.is_dir())
    oscd = sorted((shared_data / "oscd_subset" / "images").glob("*/imgs_[12]"))
    assert len(ben) == 6 and len(oscd) == 8
    return ben, oscd


def test_inspect_names_every_band_bigearthnet(shared_data):
    ben, _ = _scene_folders(shared_data)
    for folder in ben:
        r = inspect_scene(folder)
        names = [b["name"] for b in r["bands"]]
        assert sorted(names) == sorted(k for k in S2_RES if k != "B10")  # L2A: no B10
        assert r["crs"].startswith("EPSG:32")  # UTM, as the patches' metadata says
        for b in r["bands"]:
            assert b["resolution"][0] == pytest.approx(S2_RES[b["name"]]) and b["named_by"] == "filename"
        assert r["unit"]["unit"] == "dn" and r["resolution"] == [10.0, 10.0]
        assert r["band_sets"]["S2"]["satisfied"] and r["band_sets"]["S2_L1C"]["missing"] == ["B10"]
        meta = json.loads(next(folder.glob("*_labels_metadata.json")).read_text())
        assert r["bounds"][0] == pytest.approx(meta["coordinates"]["ulx"])
        assert r["bounds"][3] == pytest.approx(meta["coordinates"]["uly"])


def test_inspect_names_every_band_oscd(shared_data):
    _, oscd = _scene_folders(shared_data)
    for folder in oscd:
        r = inspect_scene(folder)
        names = [b["name"] for b in r["bands"]]
        assert names == [
            "B01",
            "B02",
            "B03",
            "B04",
            "B05",
            "B06",
            "B07",
            "B08",
            "B8A",
            "B09",
            "B10",
            "B11",
            "B12",
        ]
        assert r["crs"] == "EPSG:4326"
        res10 = r["bands"][1]["resolution"][0]
        for b in r["bands"]:
            assert b["resolution"][0] == pytest.approx(res10 * S2_RES[b["name"]] / 10, rel=0.02)
        assert r["band_sets"]["S2_L1C"]["satisfied"] and r["manifests"]["deo-s2-10"]["satisfied"]
        assert r["unit"]["unit"] == "dn"
        left, bottom, right, top = r["bounds"]
        assert -180 < left < right < 180 and -90 < bottom < top < 90


def test_inspect_reports_missing_bands_and_unit(make_raster):
    path = make_raster(
        "rgb.tif",
        np.random.default_rng(0).integers(0, 256, (3, 16, 16)),
        dtype="uint8",
        descriptions=["red", "green", "blue"],
    )
    r = inspect_scene(path)
    assert r["unit"]["unit"] == "byte"
    assert r["band_sets"]["RGB"]["satisfied"]
    assert r["manifests"]["deo-s2-10"]["missing"] == ["B05", "B06", "B07", "B08", "B8A", "B11", "B12"]


@pytest.mark.parametrize(
    "values, dtype, unit",
    [
        (np.linspace(0, 0.6, 100), "float32", "reflectance"),
        (np.linspace(0, 8000, 100), "uint16", "dn"),
        (np.linspace(0, 8000, 100), "float32", "dn"),
        (np.arange(0, 256), "uint8", "byte"),
        (np.arange(0, 256), "uint16", "byte"),
        (np.array([]), "uint16", "unknown"),
    ],
)
def test_infer_unit(values, dtype, unit):
    assert infer_unit(values, dtype).unit == unit


def test_unit_conversion():
    assert conversion_factor("reflectance", "dn") == 10000.0
    assert conversion_factor("dn", "dn") == 1.0 and conversion_factor("byte", "any") == 1.0
    with pytest.raises(UnitError, match="looks like 0-255 but the model expects DN"):
        conversion_factor("byte", "dn")


def test_inspect_reports_zeros_no_nodata_marks(make_raster):
    from typer.testing import CliRunner

    from deo_cli.cli.app import app

    data = np.full((2, 20, 20), 900, np.uint16)
    data[:, :5] = 0  # a quarter of the rows 0 in both bands
    data[0, 10, :] = 0  # zeros in one band only do not count
    path = make_raster("edge.tif", data, descriptions=["B04", "B08"])
    assert inspect_scene(path)["zero_fraction"] == 0.25
    assert inspect_scene(path, nodata=0)["zero_fraction"] == 0.0  # marked: they are not valid
    out = CliRunner().invoke(app, ["inspect", str(path)]).stdout
    assert "25.0% of valid pixels are 0 in every band: unmarked nodata? (--nodata 0)" in out
