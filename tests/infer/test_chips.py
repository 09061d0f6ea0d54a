"""Chip reading (edges, normalisation), input preparation and the preview."""

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS

from deo_cli.data.normalize import Normalizer
from deo_cli.errors import BandError, DataError
from deo_cli.infer.chips import ChipReader, _FusedNormalizer
from deo_cli.infer.prepare import prepare_input, sample_pixels
from deo_cli.infer.preview import write_preview
from deo_cli.infer.tiling import TilePlan, edge_index, invalid_fraction
from deo_cli.io.grid import Grid
from deo_cli.io.raster import open_scene
from deo_cli.io.writers import RasterLayout, StreamingRasterWriter
from deo_cli.sensors import DEO_RGB_MANIFEST, DEO_S2_MANIFEST
from tests.infer.helpers import S2_BANDS, smooth_scene


@pytest.mark.parametrize(
    "manifest,factor", [(DEO_S2_MANIFEST, 1.0), (DEO_S2_MANIFEST, 1e4), (DEO_RGB_MANIFEST, 1.0)]
)
def test_fused_normalizer_equals_the_normalizer(manifest, factor):
    x = np.random.default_rng(0).uniform(0, 5000, (len(manifest.bands), 16, 16)).astype(np.float32)
    if factor != 1.0:
        x /= factor
    n = Normalizer.from_manifest(manifest, factor, 3000.0)
    np.testing.assert_allclose(_FusedNormalizer(n)(x.copy()), n(x), rtol=1e-5, atol=1e-5)


def s2_reader(make_raster, data, **raster_kw) -> tuple[ChipReader, Normalizer]:
    """A reader of 32 px chips (overlap 4, stride 8) over ``data`` written as a 10-band S2 scene."""
    scene = open_scene(make_raster("s.tif", data, descriptions=S2_BANDS, **raster_kw))
    plan = TilePlan.create(*data.shape[1:], 32, 4, 8)
    n = Normalizer.from_manifest(DEO_S2_MANIFEST, 1.0, 3000.0)
    return ChipReader(scene, DEO_S2_MANIFEST.bands, n, plan), n


def test_edge_chips_replicate_the_scene_edge(make_raster):
    data = smooth_scene(40, 50)
    reader, n = s2_reader(make_raster, data)
    chip = reader.plan.chips()[-1]  # bottom right: reaches past both edges
    s = reader.read(chip)
    expected = n(data[:, edge_index(chip.y, 32, 40)][:, :, edge_index(chip.x, 32, 50)].astype(np.float32))
    np.testing.assert_allclose(s.x, expected, atol=1e-5)
    assert not s.empty and s.valid_fraction == 1.0
    # feature pixels over the scene are valid; those wholly outside it count as invalid (cropped)
    assert (s.invalid[:6, :3] == 0).all() and (s.invalid[6:] == 1).all() and (s.invalid[:, 3:] == 1).all()


def test_a_fully_valid_interior_chip_takes_the_short_path_to_the_same_result(make_raster):
    data = smooth_scene(80, 80)
    reader, n = s2_reader(make_raster, data)
    plan = reader.plan
    chip = next(c for c in plan.chips() if c.x >= 0 and c.y >= 0 and c.x + 32 <= 80 and c.y + 32 <= 80)
    s = reader.read(chip)
    ones = np.ones((32, 32), bool)
    assert s.valid_fraction == 1.0 and not s.empty and s.invalid.dtype == np.float32
    np.testing.assert_array_equal(s.invalid, invalid_fraction(ones, ones, plan.stride))
    expected = n(data[:, chip.y : chip.y + 32, chip.x : chip.x + 32].astype(np.float32))
    np.testing.assert_allclose(s.x, expected, atol=1e-5)


def test_a_row_of_chips_read_as_one_strip_equals_each_chip_read_alone(make_raster):
    """``read_many`` reads a chip row as one window; every chip (scene edges, nodata holes,
    an all-nodata chip) must come out exactly as ``read`` gives it alone."""
    data = smooth_scene(70, 90)
    data[:, 20:30, 10:45] = 0  # a nodata hole across chip boundaries
    data[:, 40:, 60:] = 0  # an all-nodata corner
    reader, _ = s2_reader(make_raster, data, nodata=0)
    chips = reader.plan.chips()
    out = np.full((len(chips), 10, 32, 32), np.nan, np.float32)
    many = reader.read_many(chips, out=out)
    assert len({c.y for c in chips}) > 2 and any(s.empty for s in many)
    assert any(0 < s.valid_fraction < 1 for s in many)
    for k, (chip, s) in enumerate(zip(chips, many)):
        alone = reader.read(chip)
        assert s.chip == chip and s.empty == alone.empty and s.x is None
        assert s.valid_fraction == alone.valid_fraction
        np.testing.assert_array_equal(s.invalid, alone.invalid)
        if not s.empty:
            np.testing.assert_array_equal(out[k], alone.x)
    # without ``out`` the pixels come back in ``x``
    for s, alone in zip(reader.read_many(chips[:7]), (reader.read(c) for c in chips[:7])):
        np.testing.assert_array_equal(s.x, alone.x)


def test_prepare_input_picks_stem_unit_and_scale(make_raster):
    dn = smooth_scene(64, 64)
    ms = open_scene(make_raster("ms.tif", dn, descriptions=S2_BANDS))
    inp = prepare_input(ms, DEO_S2_MANIFEST, DEO_RGB_MANIFEST)
    assert inp.stem == "ms" and inp.unit == "dn" and inp.unit_factor == 1.0
    rgb = dn[:3].astype(np.float64)
    assert inp.rgb_max == pytest.approx(np.percentile(rgb, 99.9), rel=1e-6)  # small scene: every pixel
    only = open_scene(make_raster("b.tif", dn[3:5], descriptions=["B05", "B06"]))
    with pytest.raises(BandError, match="lacks band"):
        prepare_input(only, DEO_S2_MANIFEST, DEO_RGB_MANIFEST)
    empty = open_scene(make_raster("e.tif", np.zeros((10, 8, 8), np.uint16), descriptions=S2_BANDS, nodata=0))
    with pytest.raises(DataError, match="no valid pixels"):
        prepare_input(empty, DEO_S2_MANIFEST, DEO_RGB_MANIFEST)


def test_zeros_not_marked_nodata_are_warned_about(make_raster, caplog):
    dn = smooth_scene(64, 64)
    dn[:, :, :16] = 0  # a quarter of the scene 0 in every band, beyond a "swath edge"
    scene = open_scene(make_raster("edge.tif", dn, descriptions=S2_BANDS))
    with caplog.at_level("WARNING", logger="deo_cli"):
        prepare_input(scene, DEO_S2_MANIFEST, DEO_RGB_MANIFEST)
    (msg,) = [r.getMessage() for r in caplog.records if "--nodata 0" in r.getMessage()]
    assert "edge.tif: 25 % of its sampled pixels are 0 in every band" in msg
    # declared nodata, or zeros in some bands only: nothing to say
    caplog.clear()
    marked = open_scene(make_raster("marked.tif", dn, descriptions=S2_BANDS, nodata=0))
    dn[1:, :, :16] = 500
    some = open_scene(make_raster("some.tif", dn, descriptions=S2_BANDS))
    with caplog.at_level("WARNING", logger="deo_cli"):
        prepare_input(marked, DEO_S2_MANIFEST, DEO_RGB_MANIFEST)
        prepare_input(some, DEO_S2_MANIFEST, DEO_RGB_MANIFEST)
    assert not [r for r in caplog.records if "--nodata" in r.getMessage()]


def test_large_scenes_without_overviews_are_sampled_by_windows(make_raster):
    data = smooth_scene(200, 180)
    scene = open_scene(make_raster("s.tif", data, descriptions=S2_BANDS))
    s = sample_pixels(scene, ["B04"], max_pixels=2000, windows=4)  # 200 x 180 px > 2000 px
    assert s.data.shape == (1, 11, 16 * 11) and s.valid.all()  # 4 x 4 windows of 11 px
    assert set(np.unique(s.data)) <= set(np.unique(data[0].astype(np.float32)))
    # read with every core, and the scene's own setting given back
    scene.set_decode_threads(1)
    np.testing.assert_array_equal(sample_pixels(scene, ["B04"], max_pixels=2000, windows=4).data, s.data)
    assert scene.decode_threads == 1


def test_preview_is_rgba_with_transparent_nodata(tmp_path):
    grid = Grid(CRS.from_epsg(32631), Affine(160, 0, 0, 0, -160, 0), 30, 20)
    data = np.random.default_rng(0).normal(size=(6, 20, 30)).astype(np.float32)
    data[:, :5, :7] = np.nan
    w = StreamingRasterWriter(tmp_path / "e.tif", grid, RasterLayout(count=6))
    for r in range(0, 20, 16):
        w.write_rows(r, data[:, r : r + 16])
    w.finish()
    from PIL import Image

    png = write_preview(tmp_path / "e.tif", tmp_path / "p.png", min_size=1)
    img = np.asarray(Image.open(png))
    assert img.shape == (20, 30, 4)
    assert (img[:5, :7, 3] == 0).all() and (img[5:, 7:, 3] == 255).all()
    assert img[5:, 7:, :3].std() > 10  # colours vary
    # a small embedding is enlarged by a whole factor (256 // 30 = 8), each pixel a square
    big = np.asarray(Image.open(write_preview(tmp_path / "e.tif", tmp_path / "big.png")))
    assert big.shape == (160, 240, 4)
    np.testing.assert_array_equal(big[::8, ::8], img)
    with rasterio.open(tmp_path / "e.tif") as ds:
        assert ds.count == 6
