"""segment core: the eo-learn test patch as rasters, the class sink, head files."""

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from deo_cli.data.segdata import ClassTable
from deo_cli.errors import WeightsError
from deo_cli.infer.dense import CogSink
from deo_cli.infer.headfile import (
    HeadFile,
    encoder_record,
    load_head,
    load_head_encoder,
    make_head,
    save_head,
)
from deo_cli.io.grid import Grid
from deo_cli.io.writers import RasterLayout
from deo_cli.models import build_encoder, save_encoder
from deo_cli.tasks.segment.predict import ClassSink

#: Band order of REFERENCE_SCENES.npy (eolearn_testeopatch/SOURCE.md).
EOLEARN_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
EOLEARN_NODATA = -1.0
#: Rows/cols of the image set to nodata by :func:`write_eolearn`.
NODATA_BLOCK = (slice(0, 10), slice(0, 20))


def eolearn_grid(folder: Path) -> tuple[Affine, int, int]:
    """Transform of the patch from bbox.geojson (EPSG:32633): 100 columns x 101 rows."""
    coords = json.loads((folder / "bbox.geojson").read_text())["coordinates"][0]
    xs, ys = [c[0] for c in coords], [c[1] for c in coords]
    w, h = 100, 101
    return Affine((max(xs) - min(xs)) / w, 0, min(xs), 0, -(max(ys) - min(ys)) / h, max(ys)), w, h


def write_eolearn(shared_data: Path, out: Path, scene: int = 2) -> tuple[Path, Path]:
    """The eo-learn patch as a 13-band float32 reflectance GeoTIFF (a nodata block in the top-left
    corner) and its LULC labels as a uint16 label GeoTIFF (0 = no data)."""
    folder = shared_data / "eolearn_testeopatch"
    transform, w, h = eolearn_grid(folder)
    img = np.load(folder / "REFERENCE_SCENES.npy", allow_pickle=False)[scene].transpose(2, 0, 1).copy()
    img[:, NODATA_BLOCK[0], NODATA_BLOCK[1]] = EOLEARN_NODATA
    lab = np.load(folder / "LULC.npy", allow_pickle=False)[..., 0]
    out.mkdir(parents=True, exist_ok=True)
    common = {"driver": "GTiff", "width": w, "height": h, "crs": "EPSG:32633", "transform": transform}
    image = out / "patch.tif"
    with rasterio.open(image, "w", count=13, dtype="float32", nodata=EOLEARN_NODATA, **common) as ds:
        ds.write(img.astype(np.float32))
        ds.descriptions = EOLEARN_BANDS
    label = out / "patch_label.tif"
    with rasterio.open(label, "w", count=1, dtype="uint16", nodata=0, **common) as ds:
        ds.write(lab[None].astype(np.uint16))
    return image, label


def test_eolearn_helper_writes_the_documented_grid(shared_data, tmp_path):
    image, label = write_eolearn(shared_data, tmp_path)
    with rasterio.open(image) as a, rasterio.open(label) as b:
        assert a.crs.to_epsg() == 32633 and (a.width, a.height) == (100, 101) == (b.width, b.height)
        assert a.transform == b.transform
        assert a.bounds.left == pytest.approx(465181.05, abs=0.01) and a.bounds.top == pytest.approx(
            5080254.63, abs=0.01
        )
        assert a.res == pytest.approx((9.9948, 9.9974), abs=1e-3)
        refl = a.read(4, masked=True)
        assert refl.mask[:10, :20].all() and not refl.mask[10:].any() and 0 < refl.max() < 1
        assert set(np.unique(b.read(1)).tolist()) == {0, 1, 2, 3, 4, 8}


def test_class_sink_argmax_nodata_and_probabilities(tmp_path):
    table = ClassTable.from_values([3, 7, 9])
    grid = Grid(rasterio.crs.CRS.from_epsg(32633), Affine(10, 0, 0, 0, -10, 0), 5, 16)
    lay = RasterLayout(count=1, dtype="uint8", nodata=table.nodata, resampling="mode")
    play = RasterLayout(count=3, dtype="float32", resampling="average")
    cls = CogSink(tmp_path / "c.tif", grid, lay, 16, table.colormap())
    prob = CogSink(tmp_path / "p.tif", grid, play, 16)
    sink = ClassSink(table, cls, prob)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 16, 5)).astype(np.float32)
    logits[:, 0, 0] = np.nan
    sink.write_rows(0, logits)
    cls.finish(), prob.finish()
    with rasterio.open(tmp_path / "c.tif") as c, rasterio.open(tmp_path / "p.tif") as p:
        classes, probs = c.read(1), p.read()
        assert c.colormap(1)[7][:3] == table.classes[1].color
    expect = np.array([3, 7, 9])[np.nan_to_num(logits, nan=0).argmax(0)]
    expect[0, 0] = table.nodata
    np.testing.assert_array_equal(classes, expect)
    assert np.isnan(probs[:, 0, 0]).all()
    np.testing.assert_allclose(np.nansum(probs, 0)[1:], 1.0, atol=1e-6)
    assert sink.nodata_pixels == 1 and sink.counts.sum() == 16 * 5 - 1


def _head_file(encoder, task="segment") -> HeadFile:
    head = make_head("upernet", encoder.feature_channels, encoder.feature_strides, 3, channels=16)
    rec = encoder_record(encoder)
    return HeadFile(
        task=task,
        head={
            "kind": "upernet",
            "channels": 16,
            "num_classes": 3,
            "in_channels": list(encoder.feature_channels),
            "in_strides": list(encoder.feature_strides),
            "fusion": None,
        },
        head_state=head.state_dict(),
        encoder=rec,
        encoder_state=None if not rec["embedded"] else encoder.state_dict(),
        classes=ClassTable.from_values([1, 2, 3]).to_dict(),
        chip_size=64,
    )


def test_head_files_name_their_encoder_and_refuse_mismatches(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("deo_swin_test", weights=None)
    # random encoder: embedded in the head file, restored exactly
    hf = _head_file(enc)
    assert hf.encoder["embedded"] and hf.encoder["weights"] == "random"
    save_head(hf, tmp_path / "head.pt")
    loaded = load_head(tmp_path / "head.pt", "segment")
    again = load_head_encoder(loaded)
    x = torch.randn(1, 10, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[2], enc(x)[2])
    assert loaded.sha256 and loaded.describe()["kind"] == "upernet"
    with pytest.raises(WeightsError, match="is a segment head, not a change head.*segment predict"):
        load_head(tmp_path / "head.pt", "change")
    # encoder from a file: referenced by URI and SHA-256, checked when loaded again
    save_encoder(enc, tmp_path / "enc.pt")
    enc_file = build_encoder("deo_swin_test", weights=str(tmp_path / "enc.pt"))
    hf = _head_file(enc_file)
    assert not hf.encoder["embedded"] and hf.encoder_state is None
    save_head(hf, tmp_path / "head2.pt")
    ok = load_head_encoder(load_head(tmp_path / "head2.pt"))
    assert ok.weights_sha256 == enc_file.weights_sha256
    torch.manual_seed(1)
    save_encoder(build_encoder("deo_swin_test", weights=None), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="trained on deo_swin_test weights with SHA-256"):
        load_head_encoder(load_head(tmp_path / "head2.pt"), weights=str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        load_head(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(WeightsError, match="not a deo head file"):
        load_head(tmp_path / "plain.pt")


def test_train_on_a_geobench_segmentation_task(tmp_path):
    from deo_cli.recipes import SegmentTrainRecipe, build_recipe
    from deo_cli.tasks.segment.train import run_segment_train
    from tests.data.make_geobench_task import write_geobench_task

    write_geobench_task(
        tmp_path / "gb", "m-tiny-seg", kind="segmentation", size=32, n_samples=8, num_classes=3
    )
    recipe = build_recipe(
        SegmentTrainRecipe,
        sets=[
            "data.geobench_task=m-tiny-seg",
            f"data.geobench_root={tmp_path / 'gb'}",
            "model.name=deo_swin_test",
            "model.weights=random",
            "epochs=1",
            "head_channels=8",
            "runtime.device=cpu",
            "runtime.num_workers=0",
            "runtime.batch_size=4",
        ],
    )
    res = run_segment_train(recipe, tmp_path / "run")
    head = load_head(res.head, "segment")
    assert ClassTable.from_dict(head.classes).names == ("class 0", "class 1", "class 2")
    assert head.chip_size == 32  # GEO-Bench's native patch size
    assert head.normalization["stem"] == "ms" and head.normalization["unit"] == "dn"
    assert res.metrics["data"]["source"] == "geobench:m-tiny-seg"
    assert res.train_chips >= 2 and "val" in res.metrics
