import pickle

import numpy as np
import pytest
from affine import Affine
from rasterio.windows import Window

from deo_cli.errors import BandError, GeoreferenceError, InputNotFoundError, RasterReadError
from deo_cli.io.env import gdal_path
from deo_cli.io.raster import open_scene

RNG = np.random.default_rng(0)


def test_read_by_name_from_shuffled_descriptions(make_raster):
    bands = ["B08", "B02", "B12", "B04", "B03"]
    data = np.stack([np.full((20, 30), 100 * (i + 1), np.uint16) for i in range(5)])
    path = make_raster("shuffled.tif", data, descriptions=bands)
    scene = open_scene(path)
    assert scene.band_names == tuple(bands)
    sample = scene.read(["B02", "B03", "B04", "B08", "B12"])
    assert sample.band_names == ("B02", "B03", "B04", "B08", "B12")
    # B02 is the 2nd band in the file (value 200), B03 the 5th (500)...
    assert [float(sample.data[i, 0, 0]) for i in range(5)] == [200, 500, 400, 100, 300]
    # common names and aliases select the same bands
    alias = scene.read(["red", "B3", "nir"])
    np.testing.assert_array_equal(alias.data, sample.data[[2, 1, 3]])


def test_window_georeference_and_outside_pixels(make_raster):
    data = RNG.integers(1, 5000, (3, 40, 50)).astype(np.uint16)
    t = Affine(10, 0, 600000, 0, -10, 4000000)
    path = make_raster("s.tif", data, transform=t, descriptions=["B04", "B03", "B02"])
    scene = open_scene(path)
    s = scene.read(window=Window(-4, 30, 20, 20))  # 4 px left of the scene, 10 rows below it
    assert s.transform == t @ Affine.translation(-4, 30)
    assert s.crs == scene.crs and s.crs.to_epsg() == 32633
    assert s.valid[:10, 4:].all() and not s.valid[:, :4].any() and not s.valid[10:].any()
    np.testing.assert_array_equal(s.data[:, :10, 4:], data[:, 30:40, 0:16])
    assert (s.data[:, ~s.valid] == 0).all()


def test_nodata_and_nan_make_pixels_invalid(make_raster):
    data = np.full((2, 10, 10), 7.0, np.float32)
    data[0, 2, 3] = -9999
    data[1, 5, 5] = np.nan
    path = make_raster("n.tif", data, descriptions=["B11", "B12"], nodata=-9999)
    s = open_scene(path).read()
    assert not s.valid[2, 3] and not s.valid[5, 5] and s.valid.sum() == 98
    assert np.isfinite(s.data).all()
    # an extra nodata value from the user (e.g. 0 in L1C DN)
    data2 = np.ones((1, 4, 4), np.uint16)
    data2[0, 0, 0] = 0
    s2 = open_scene(make_raster("z.tif", data2, descriptions=["B02"]), nodata=0).read()
    assert not s2.valid[0, 0] and s2.valid.sum() == 15


def test_masks_without_nodata_and_band_order(tmp_path, make_raster):
    """Validity comes from whatever the file has (NaN in a float file without nodata, an
    internal mask on an integer file), and bands read in file order (decoded straight into
    the output) equal the same bands read in another order."""
    import rasterio

    f = RNG.random((2, 12, 12)).astype(np.float32)
    f[1, 4, 7] = np.nan
    s = open_scene(make_raster("f.tif", f, descriptions=["B11", "B12"])).read()
    assert not s.valid[4, 7] and s.valid.sum() == 143 and s.data[1, 4, 7] == 0.0

    data = RNG.integers(1, 5000, (3, 20, 20)).astype(np.uint16)
    path = make_raster("m.tif", data, descriptions=["B04", "B03", "B02"])
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as ds:
        mask = np.full((20, 20), 255, np.uint8)
        mask[:5, :3] = 0
        ds.write_mask(mask)
    scene = open_scene(path)
    win = Window(-2, -1, 10, 10)  # reaches outside the scene: read into a view of the output
    ordered, shuffled = scene.read(["B04", "B03", "B02"], win), scene.read(["B02", "B04", "B03"], win)
    np.testing.assert_array_equal(shuffled.data, ordered.data[[2, 0, 1]])
    np.testing.assert_array_equal(shuffled.valid, ordered.valid)
    expected = np.zeros((10, 10), bool)
    expected[1:, 2:] = mask[:9, :8] > 0
    np.testing.assert_array_equal(ordered.valid, expected)
    np.testing.assert_array_equal(ordered.data[:, expected], data[:, :9, :8][:, mask[:9, :8] > 0])
    assert (ordered.data[:, ~expected] == 0).all()


def test_band_folder_resamples_coarse_bands_to_finest_grid(tmp_path, make_raster):
    folder = tmp_path / "T31UDQ_20200101T103000"
    folder.mkdir()
    t10 = Affine(10, 0, 300000, 0, -10, 5000000)
    t20 = Affine(20, 0, 300000, 0, -20, 5000000)
    fine = RNG.integers(100, 3000, (40, 60)).astype(np.uint16)
    coarse = np.tile(np.arange(30, dtype=np.uint16) * 4, (20, 1))  # linear in x
    from tests.conftest import write_raster

    write_raster(folder / "T31UDQ_20200101T103000_B04.tif", fine, transform=t10)
    write_raster(folder / "T31UDQ_20200101T103000_B8A.tif", coarse, transform=t20)
    (folder / "notes.txt").write_text("not a raster")
    scene = open_scene(folder)
    assert (scene.width, scene.height) == (60, 40) and scene.transform == t10
    assert scene.datetime == "2020-01-01T10:30:00Z"
    s = scene.read(["B8A", "B04"], Window(0, 0, 60, 40))
    np.testing.assert_array_equal(s.data[1], fine)
    assert s.valid.all()
    # 10 m pixel centre j sits at 20 m pixel coordinate j/2 - 1/4: bilinear interpolation of a
    # field linear in x gives 4 * (j/2 - 1/4) exactly, away from the edges
    up = s.data[0]
    assert up.shape == (40, 60)
    j = np.arange(2, 58)
    np.testing.assert_allclose(up[5:35, 2:58], np.tile(4 * (j / 2 - 0.25), (30, 1)), atol=1e-3)
    nearest = open_scene(folder, resampling="nearest").read(["B8A"]).data[0]
    np.testing.assert_array_equal(nearest, np.kron(coarse, np.ones((2, 2))))


def test_explicit_band_names_and_unnamed_bands(make_raster):
    data = RNG.integers(0, 3000, (13, 8, 8)).astype(np.uint16)
    path = make_raster("nodesc.tif", data)
    scene = open_scene(path)
    assert scene.band_names[0] == "band_1"
    with pytest.raises(BandError, match="carry no name: pass --band-names"):
        scene.read(["B04"])
    named = open_scene(path, band_names="S2_L1C")
    np.testing.assert_array_equal(named.read(["B04"]).data[0], data[3])
    listed = open_scene(path, band_names=",".join(f"B{i:02d}" for i in range(1, 13)) + ",B8A")
    np.testing.assert_array_equal(listed.read(["B8A"]).data[0], data[12])
    with pytest.raises(BandError, match="lists 3 names but the scene has 13 bands"):
        open_scene(path, band_names="B04,B03,B02")


def test_missing_band_message_lists_what_is_there(make_raster):
    path = make_raster("rgb.tif", np.ones((3, 4, 4), np.uint8), descriptions=["red", "green", "blue"])
    with pytest.raises(BandError, match=r"lacks band\(s\) B05, B8A \(it has B04, B03, B02\)"):
        open_scene(path).read(["B04", "B05", "B8A"])


def test_duplicate_band_is_refused(make_raster):
    path = make_raster("dup.tif", np.ones((2, 4, 4), np.uint16), descriptions=["B04", "red"])
    with pytest.raises(BandError, match="more than once"):
        open_scene(path)


def test_no_crs_is_refused_unless_allowed(make_raster):
    path = make_raster("nocrs.tif", np.ones((1, 4, 4), np.uint16), crs=None, descriptions=["B04"])
    with pytest.raises(GeoreferenceError, match="no CRS.*--allow-no-crs"):
        open_scene(path)
    scene = open_scene(path, allow_no_crs=True)
    assert scene.crs is None and scene.read().valid.all()


def test_unreadable_and_missing_inputs(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(RasterReadError, match="cannot read .*broken.tif as a raster"):
        open_scene(bad)
    with pytest.raises(InputNotFoundError, match="does not exist"):
        open_scene(tmp_path / "nope.tif")
    with pytest.raises(InputNotFoundError, match="no files match"):
        open_scene(str(tmp_path / "*_B04.tif"))
    with pytest.raises(InputNotFoundError, match="no sample scene named 'mars'"):
        open_scene("sample:mars")


def test_glob_and_list_file(tmp_path):
    from tests.conftest import write_raster

    for b in ("B02", "B03", "B04"):
        write_raster(tmp_path / f"x_{b}.tif", np.full((4, 4), int(b[1:]), np.uint16))
    s = open_scene(str(tmp_path / "x_B0*.tif")).read(["B04", "B02"])
    assert s.data[:, 0, 0].tolist() == [4, 2]
    listing = tmp_path / "bands.txt"
    listing.write_text("x_B03.tif\n# a comment\nx_B02.tif\n")
    assert open_scene(f"@{listing}").band_names == ("B03", "B02")


def test_scene_pickles_without_handles(make_raster):
    path = make_raster("p.tif", np.ones((2, 5, 5), np.uint16), descriptions=["B04", "B08"])
    scene = open_scene(path)
    scene.read()  # opens a handle
    clone = pickle.loads(pickle.dumps(scene))
    assert clone._handles == {} and clone.band_names == scene.band_names
    np.testing.assert_array_equal(clone.read().data, scene.read().data)


def test_remote_paths_map_to_gdal_vsi():
    assert gdal_path("https://x.org/a.tif") == "/vsicurl/https://x.org/a.tif"
    assert gdal_path("s3://bucket/key.tif") == "/vsis3/bucket/key.tif"
    assert gdal_path("gs://b/k.tif") == "/vsigs/b/k.tif"
    assert gdal_path("/data/a.tif") == "/data/a.tif"


def test_sample_scene_is_real_sentinel2():
    scene = open_scene("sample:paris")
    assert scene.crs.to_epsg() == 4326 and (scene.width, scene.height) == (390, 408)
    assert len(scene.band_names) == 13 and scene.datetime.startswith("2016-11-30")
    s = scene.read(["B04", "B08"], Window(100, 100, 32, 32))
    assert s.valid.all() and 200 < s.data.mean() < 6000


@pytest.mark.parametrize("nodata", [None, 0])
def test_overview_of_a_multiband_file_without_overviews_matches_gdal_nearest(
    make_raster, nodata, monkeypatch
):
    """A multi-band file without overviews is decimated block by block (each block decoded once,
    not once per band), to exactly the pixels GDAL's nearest decimation picks."""
    import rasterio
    from rasterio.enums import Resampling

    import deo_cli.io.raster as raster

    monkeypatch.setattr(raster, "DECIMATE_CHUNK_BYTES", 4 * 16 * 16 * 3)  # several chunks per block row
    data = RNG.integers(1, 5000, (3, 150, 97)).astype(np.uint16)
    data[:, 40:60, 10:30] = 0
    path = make_raster("s.tif", data, descriptions=["B04", "B03", "B02"], nodata=nodata)
    with rasterio.open(path) as src:  # the same, in 16 px tiles
        profile = src.profile | {"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "deflate"}
    path = path.with_name("tiled.tif")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = ("B04", "B03", "B02")
    scene = open_scene(path)
    ov = scene.overview(max_pixels=40 * 25)  # factor 4: 38 x 25, not a whole divisor of 150 x 97
    with rasterio.open(path) as ds:
        assert not ds.overviews(1) and ds.block_shapes[0] == (16, 16)
        ref = ds.read(out_shape=(3, 38, 25), resampling=Resampling.nearest, out_dtype="float32")
    assert ov.data.shape == (3, 38, 25)
    expected_valid = np.ones((38, 25), bool) if nodata is None else (ref != 0).all(axis=0)
    assert expected_valid.mean() < 1.0 or nodata is None
    np.testing.assert_array_equal(ov.valid, expected_valid)
    np.testing.assert_array_equal(ov.data, np.where(expected_valid, ref, 0.0))


def test_cropped_scene_reads_the_same_pixels_on_a_smaller_grid(tmp_path, make_raster, shared_data):
    from rasterio.warp import transform_bounds

    data = np.arange(3 * 40 * 50, dtype=np.uint16).reshape(3, 40, 50)
    scene = open_scene(make_raster("s.tif", data, descriptions=["B04", "B03", "B02"]))
    # 10 m pixels from (500000, 5000000): a box from mid-pixel (col 3.5, row 5.2) to (col 20.1, row 30)
    box = (500035.0, 5000000.0 - 300.0, 500201.0, 5000000.0 - 52.0)
    crop = scene.cropped(box)
    assert (crop.width, crop.height) == (18, 25)  # widened to whole pixels: cols 3-20, rows 5-29
    assert crop.transform == Affine(10, 0, 500030, 0, -10, 5000000 - 50)
    assert crop.crs == scene.crs and crop.band_names == scene.band_names
    np.testing.assert_array_equal(crop.read().data, data[:, 5:30, 3:21])
    outside = crop.read(["B04"], Window(-2, 0, 4, 1))  # beyond the crop is outside the scene
    assert outside.valid.tolist() == [[False, False, True, True]]
    # the same box given in lon/lat
    lonlat = transform_bounds(scene.crs, "EPSG:4326", 500040, 4999710, 500200, 4999950)
    again = scene.cropped(lonlat, "EPSG:4326")
    assert again.width >= 16 and again.height >= 24 and again.grid.bounds[0] <= 500040
    # a box reaching past the scene is cut to it; one beside it is a clear error
    assert scene.cropped((499000, 4999000, 500100, 5001000)).grid.shape == (40, 10)
    with pytest.raises(GeoreferenceError, match="do not overlap scene s.tif"):
        scene.cropped((0, 0, 10, 10))
    # multi-resolution band folders: the coarse bands are resampled onto the same smaller grid
    folder = open_scene(str(shared_data / "bigearthnet_s2_example" / "S2A_MSIL2A_20170613T101031_87_48"))
    g = folder.grid.bounds
    part = folder.cropped((g[0] + 200, g[1] + 300, g[0] + 700, g[1] + 900))
    win = Window(20, folder.height - 90, 50, 60)
    assert part.grid.shape == (60, 50) and part.transform == folder.grid.window_transform(win)
    np.testing.assert_array_equal(part.read().data, folder.read(None, win).data)


def test_bounds_in_another_crs_need_a_scene_crs(make_raster):
    scene = open_scene(make_raster("n.tif", np.ones((1, 8, 8), np.uint16), crs=None), allow_no_crs=True)
    assert scene.cropped((0, 2, 4, 8)).grid.shape == (6, 4)  # pixel coordinates (rows downward)
    with pytest.raises(GeoreferenceError, match="has no CRS"):
        scene.cropped((0, 0, 1, 1), "EPSG:4326")
