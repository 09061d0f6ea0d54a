"""Pretraining data: finding scenes, manifests with co-located RGB, windows, nodata, sharding, resume."""

from pathlib import Path

import numpy as np
import pytest
import torch

from deo_cli.data.multicrop import MultiCrop
from deo_cli.data.pretrain import (
    EpochSampler,
    PretrainDataset,
    PretrainSource,
    build_pretrain_loader,
    list_pretrain_sources,
    scan_pretrain_data,
)
from deo_cli.errors import BandError, DataError, InputNotFoundError, RasterReadError, UnitError
from deo_cli.sensors import DEO_S2_MANIFEST as M

BANDS = M.bands
NO_PHOTOMETRY = dict(color_jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))


def small_crops(**kw):
    return MultiCrop(M.mean, M.std, global_size=16, local_size=8, local_number=2, **kw)


def chip(make_raster, name, value=1000.0, size=32, nodata=None, dtype="uint16", bands=BANDS, ramp=1.0):
    data = np.full((len(bands), size, size), value, dtype=np.float64)
    data += ramp * np.arange(size)[None, None, :]  # a ramp, so crops differ
    return make_raster(name, data.astype(dtype), descriptions=list(bands), nodata=nodata)


def test_oscd_band_folders_become_scenes_and_label_masks_are_skipped(shared_data):
    data = scan_pretrain_data(shared_data / "oscd_subset", BANDS)
    assert len(data.sources) == 8  # 4 cities x 2 dates
    assert len(data.skipped) == 4 and all(s.endswith("-cm.tif") for s in data.skipped)
    assert data.unit == "dn" and data.unit_factor == 1.0
    for s in data.sources:
        assert isinstance(s.ms, tuple) and len(s.ms) == 13  # one file per band, B01..B12 + B8A
        assert len({Path(p).parent for p in s.ms}) == 1
        assert 300 < s.height < 700 and 300 < s.width < 700


def test_bigearthnet_patches(shared_data):
    data = scan_pretrain_data(shared_data / "bigearthnet_s2_example", BANDS)
    assert len(data.sources) == 6 and not data.skipped
    assert {(s.height, s.width) for s in data.sources} == {(120, 120)}  # the 10 m grid
    ds = PretrainDataset(data.sources, BANDS, small_crops(), window_size=64, windows_per_scene=3)
    assert len(ds) == 18  # 120 px > 64 px: three random windows per patch and epoch
    assert [ds.source_of(i) for i in (0, 2, 3, 17)] == [0, 0, 1, 5]


def test_globs_and_single_files(shared_data, tmp_path, make_raster):
    a, b = chip(make_raster, "a.tif"), chip(make_raster, "b.tif")
    assert [s.ms for s in list_pretrain_sources(str(tmp_path / "*.tif"))] == [str(a), str(b)]
    assert [s.ms for s in list_pretrain_sources(a)] == [str(a)]
    pattern = str(shared_data / "bigearthnet_s2_example" / "*" / "*_B0[2-4].tif")
    grouped = list_pretrain_sources(pattern)
    assert len(grouped) == 6 and all(len(s.ms) == 3 for s in grouped)


def test_csv_manifest_with_relative_paths_and_rgb(tmp_path, make_raster):
    chip(make_raster, "ms0.tif")
    chip(make_raster, "ms1.tif")
    make_raster("rgb0.tif", np.zeros((3, 64, 64), np.uint8), crs=None)
    (tmp_path / "train.csv").write_text("ms_path,rgb_path\nms0.tif,rgb0.tif\nms1.tif,\n")
    srcs = list_pretrain_sources(tmp_path / "train.csv")
    assert [(Path(s.ms).name, s.rgb and Path(s.rgb).name) for s in srcs] == [
        ("ms0.tif", "rgb0.tif"),
        ("ms1.tif", None),
    ]
    (tmp_path / "bad.csv").write_text("path\nms0.tif\n")
    with pytest.raises(DataError, match="no column 'ms_path'"):
        list_pretrain_sources(tmp_path / "bad.csv")


def test_parquet_manifest(tmp_path, make_raster):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ms = chip(make_raster, "ms.tif")
    pq.write_table(pa.table({"s2": [str(ms)], "aerial": [None]}), tmp_path / "m.parquet")
    srcs = list_pretrain_sources(tmp_path / "m.parquet", ms_column="s2", rgb_column="aerial")
    assert srcs == [PretrainSource(str(ms), None)]


def test_rgb_image_replaces_rgb_channels(tmp_path, make_raster):
    ms = chip(make_raster, "ms.tif", size=32)  # its RGB: a left-to-right ramp
    yy = np.repeat(np.linspace(0, 255, 128)[:, None], 128, axis=1)  # top-to-bottom ramp, 4x finer
    make_raster("rgb.tif", np.stack([yy, yy, yy]).astype(np.uint8), crs=None)
    mc = MultiCrop(M.mean, M.std, global_size=16, local_number=0, hflip_p=0.0, **NO_PHOTOMETRY)
    with_rgb = PretrainDataset([PretrainSource(str(ms), str(tmp_path / "rgb.tif"))], BANDS, mc)
    rgb = with_rgb[(0, 0)]["global"][0][:3] * torch.tensor(M.std[:3]).reshape(3, 1, 1)
    assert (rgb[:, -1, :] - rgb[:, 0, :]).mean() > 0.5  # varies down the rows: the RGB image's ramp
    assert (rgb[:, :, -1] - rgb[:, :, 0]).abs().max() < 1e-3
    without = PretrainDataset([PretrainSource(str(ms))], BANDS, mc)[(0, 0)]["global"][0][:3]
    assert (without[:, :, -1] - without[:, :, 0]).mean() > 0.05  # the S2 ramp runs across columns


def test_windows_of_large_scenes_skip_mostly_nodata(tmp_path, make_raster):
    data = np.full((10, 64, 64), 2000, np.uint16)
    data[:, :, :40] = 0  # 62 % of the scene is nodata
    path = make_raster("scene.tif", data, descriptions=list(BANDS), nodata=0)
    src = PretrainSource(str(path), height=64, width=64)
    ds = PretrainDataset(
        [src], BANDS, small_crops(), window_size=24, windows_per_scene=4, max_nodata_fraction=0.5
    )
    assert len(ds) == 4
    rng = np.random.default_rng(0)
    for _ in range(30):
        image, valid, rgb = ds._read(0, rng)
        assert image.shape == (10, 24, 24) and valid.float().mean() >= 0.5 and rgb is None
        assert (image[:, valid] == 2000).all()


def test_all_nodata_chips_are_replaced(tmp_path, make_raster):
    bad = make_raster("bad.tif", np.zeros((10, 32, 32), np.uint16), descriptions=list(BANDS), nodata=0)
    good = chip(make_raster, "good.tif", value=3000)
    ds = PretrainDataset([PretrainSource(str(bad)), PretrainSource(str(good))], BANDS, small_crops())
    for epoch in range(3):
        views = ds[(epoch, 0)]  # index 0 is the empty chip: a replacement is read instead
        assert all((v != 0).any() for v in views["global"]) and views["index"] == 0
    only_bad = PretrainDataset([PretrainSource(str(bad))], BANDS, small_crops())
    with pytest.raises(DataError, match="no window"):
        only_bad[0]


def test_scan_skips_empty_chips_with_a_warning_and_names_them_when_all_are(tmp_path, make_raster, caplog):
    bad = make_raster("bad.tif", np.zeros((10, 32, 32), np.uint16), descriptions=list(BANDS), nodata=0)
    chip(make_raster, "good.tif", value=3000)
    data = scan_pretrain_data(tmp_path, BANDS, window_size=64)
    assert [Path(s.name).name for s in data.sources] == ["good.tif"] and data.skipped == [str(bad)]
    assert "skipping 1 scene(s) without a window with at most 50% nodata (first: bad.tif" in caplog.text
    (tmp_path / "good.tif").unlink()
    make_raster("bad2.tif", np.zeros((10, 32, 32), np.uint16), descriptions=list(BANDS), nodata=0)
    with pytest.raises(DataError, match=r"in 2 scenes \(bad.tif, bad2.tif\): every pixel is nodata"):
        scan_pretrain_data(tmp_path, BANDS)


def test_samples_depend_on_seed_epoch_index_only(tmp_path, make_raster):
    srcs = [PretrainSource(str(chip(make_raster, f"c{i}.tif", value=1000 + 500 * i))) for i in range(3)]
    ds = PretrainDataset(srcs, BANDS, small_crops(), seed=7)
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(1, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a["global"] + a["local"], b["global"] + b["local"]))
    assert not torch.equal(a["global"][0], c["global"][0])
    other_seed = PretrainDataset(srcs, BANDS, small_crops(), seed=8)[(0, 1)]
    assert not torch.equal(a["global"][0], other_seed["global"][0])


def test_sampler_shards_are_disjoint_and_resumable():
    data = list(range(23))
    shards = [list(EpochSampler(data, num_replicas=3, rank=r, seed=1)) for r in range(3)]
    flat = [i for s in shards for _, i in s]
    assert len(flat) == len(set(flat)) == 21 and all(e == 0 for s in shards for e, _ in s)  # drop_last
    s = EpochSampler(data, num_replicas=1, rank=0, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=5)
    assert list(s) == full[5:] and len(s) == 18 and all(e == 2 for e, _ in full)
    s.set_epoch(3)
    assert [i for _, i in s] != [i for _, i in full]


def test_loader_batches_do_not_depend_on_workers(tmp_path, make_raster):
    srcs = [PretrainSource(str(chip(make_raster, f"c{i}.tif", value=1000 + 300 * i))) for i in range(5)]
    ds = PretrainDataset(srcs, BANDS, small_crops(), seed=3)
    batches = []
    for workers in (0, 1):
        loader, sampler = build_pretrain_loader(ds, 2, num_workers=workers, seed=3)
        sampler.set_epoch(1)
        batches.append(list(loader))
    assert len(batches[0]) == 2  # 5 samples, batch 2, drop_last
    for x, y in zip(*batches):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["global"], y["global"])
        assert x["global"].shape == (2, 2, 10, 16, 16) and x["local"].shape == (2, 2, 10, 8, 8)
    with pytest.raises(DataError, match="fewer than one batch"):
        build_pretrain_loader(ds, 6)


def test_errors_before_training(tmp_path, make_raster):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        scan_pretrain_data(tmp_path / "missing", BANDS)
    (tmp_path / "broken.tif").write_text("not a raster")
    with pytest.raises(RasterReadError, match="broken.tif"):
        scan_pretrain_data(tmp_path / "broken.tif", BANDS)
    rgb_only = chip(make_raster, "rgb_only.tif", bands=("B04", "B03", "B02"))
    with pytest.raises(BandError, match=r"lacks band\(s\) B05, B06"):
        scan_pretrain_data(rgb_only, BANDS)
    byte = chip(make_raster, "byte.tif", value=10, dtype="uint8")
    with pytest.raises(UnitError, match="0-255"):
        scan_pretrain_data(byte, BANDS)


def test_reflectance_is_scaled_to_dn_and_limit_subsets(tmp_path, make_raster):
    for i in range(4):
        chip(make_raster, f"r{i}.tif", value=0.2, dtype="float32", ramp=0.01)
    data = scan_pretrain_data(tmp_path, BANDS, limit=2, seed=0)
    assert data.unit == "reflectance" and data.unit_factor == 10000.0 and len(data.sources) == 2
    assert data.fingerprint == scan_pretrain_data(tmp_path, BANDS, limit=2, seed=0).fingerprint
    assert scan_pretrain_data(tmp_path, BANDS, unit="dn").unit_factor == 1.0
