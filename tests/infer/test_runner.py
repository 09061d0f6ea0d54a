"""The streaming runner: forward in micro-batches."""

import os
import threading

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS

from deo_cli.data.normalize import Normalizer
from deo_cli.infer.chips import ChipReader
from deo_cli.infer.runner import (
    CPU_MICRO_BATCH,
    CPU_SLICE_BYTES,
    _forward,
    decode_threads,
    default_micro_batch,
    make_loader,
    run_dense,
)
from deo_cli.infer.tiling import TilePlan
from deo_cli.io.grid import Grid
from deo_cli.io.raster import open_scene
from deo_cli.io.writers import RasterLayout, TiledWriter
from deo_cli.models import get_model_spec
from deo_cli.sensors import DEO_S2_MANIFEST
from tests.infer.helpers import S2_BANDS, ConvFeatures, smooth_scene

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingConv(torch.nn.Module):
    """A conv that records the batch size of every call."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.calls = []

    def forward(self, x):
        self.calls.append(len(x))
        return self.conv(x)


def test_default_micro_batch_is_small_on_the_cpu_and_whole_on_gpus():
    assert default_micro_batch(torch.device("cpu")) == CPU_MICRO_BATCH == 4
    assert default_micro_batch(torch.device("cuda")) == 0
    assert default_micro_batch(torch.device("cuda"), 8) == 8
    assert default_micro_batch(torch.device("cpu"), 16) == 16


@pytest.mark.parametrize(
    ("name", "chip", "expected"),
    [
        ("deo_swin_t", 224, 2),
        ("deo_swin_t", 448, 1),
        ("deo_swin_b", 224, 2),
        ("deo_vit_b8", 256, 1),
        ("deo_swin_test", 224, 4),
        ("deo_vit_b16", 224, 4),
    ],
)
def test_cpu_micro_batch_follows_the_models_activation_size(name, chip, expected):
    """Swin-T's stage 1 is 1.15 MB per 224 px chip: 2 chips per call keep a slice within
    CPU_SLICE_BYTES, 3 would not; a model without the attribute gets CPU_MICRO_BATCH; GPUs the whole batch."""

    class Spec:
        activation_bytes_per_pixel = get_model_spec(name).activation_bytes_per_pixel

    assert default_micro_batch(torch.device("cpu"), 0, Spec(), chip) == expected
    assert default_micro_batch(torch.device("cpu"), 3, Spec(), chip) == 3
    assert default_micro_batch(torch.device("cuda"), 0, Spec(), chip) == 0
    assert default_micro_batch(torch.device("cpu"), 0, object(), chip) == CPU_MICRO_BATCH
    per_chip = Spec.activation_bytes_per_pixel * chip**2
    assert expected == 1 or expected * per_chip <= CPU_SLICE_BYTES


@pytest.mark.parametrize("micro", [0, 1, 3, 4, 10, 64])
def test_forward_in_slices_equals_one_forward(micro):
    model = CountingConv()
    x = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = _forward(model, x, torch.device("cpu"), None)
    model.calls.clear()
    y = _forward(model, x, torch.device("cpu"), None, micro_batch=micro)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (10, 5, 8, 8)
    np.testing.assert_allclose(y, whole, rtol=1e-6, atol=1e-6)
    step = micro if 0 < micro < 10 else 10
    assert model.calls == [min(step, 10 - i) for i in range(0, 10, step)]


class RecordingSink:
    """Rows into an array; records the thread of every ``write_rows`` call."""

    block_rows = 16

    def __init__(self, channels, height, width, compresses=None):
        self.array = np.full((channels, height, width), np.nan, np.float32)
        self.threads = []
        if compresses is not None:
            self.compresses = compresses

    def write_rows(self, row0, data):
        self.threads.append(threading.current_thread().name)
        self.array[:, row0 : row0 + data.shape[1]] = data


@pytest.mark.parametrize(
    ("compresses", "thread"), [(False, "MainThread"), (True, "deo-sink"), (None, "deo-sink")]
)
def test_only_compressing_sinks_are_written_in_a_thread(make_raster, compresses, thread):
    """A sink that only copies rows to disk (float temporaries) is called directly, so no
    finished block waits in memory for the writer thread; the stitched rows are the same."""
    data = smooth_scene(150, 90)
    scene = open_scene(make_raster("s.tif", data, descriptions=S2_BANDS))
    plan = TilePlan.create(150, 90, 32, 4, 8)
    reader = ChipReader(
        scene, DEO_S2_MANIFEST.bands, Normalizer.from_manifest(DEO_S2_MANIFEST, 1.0, 3000.0), plan
    )
    model = ConvFeatures()
    sinks = {}
    for key, flag in (("run", compresses), ("direct", False)):
        sinks[key] = RecordingSink(model.channels, plan.out_height, plan.out_width, flag)
        run_dense(
            reader, model, sinks[key], num_workers=0, batch_size=4, background=None if key == "run" else False
        )
    assert set(sinks["run"].threads) == {thread} and len(sinks["run"].threads) == 3  # 38 rows: 16+16+6
    np.testing.assert_array_equal(sinks["run"].array, sinks["direct"].array)
    assert np.isfinite(sinks["run"].array).all()


def test_tiled_writer_compresses_integer_temporaries_only(tmp_path):
    grid = Grid(CRS.from_epsg(32633), Affine(10, 0, 500000, 0, -10, 5000000), 40, 20)
    cases = (
        ("float32", False, False),
        ("float32", True, False),
        ("uint8", False, True),
        ("int16", False, True),
    )
    for dtype, half, compresses in cases:
        layout = RasterLayout(
            count=2, dtype=dtype, nodata=None if half or dtype == "float32" else 0, half=half
        )
        w = TiledWriter(tmp_path / f"{dtype}{half}.tif", grid, layout)
        assert w.compresses is compresses
        w.write_rows(0, np.ones((2, 20, 40), np.float32))
        w.close()
        with rasterio.open(w.path) as ds:
            assert (ds.compression is not None) is compresses


def test_chips_read_in_this_process_are_decoded_by_every_core(tmp_path, monkeypatch):
    """Without DataLoader workers the model waits for each read, so GDAL decodes with every
    core; workers decode with one each; a GDAL_NUM_THREADS of the user's is left to GDAL. The
    pixels are the same either way."""
    monkeypatch.delenv("GDAL_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert decode_threads(0) == 3 and decode_threads(2) == 1
    data = smooth_scene(150, 90)
    path = tmp_path / "deflate.tif"  # DEFLATE tiles of 32 px: each chip strip spans several
    profile = dict(driver="GTiff", width=90, height=150, count=10, dtype="uint16", crs="EPSG:32633")
    profile |= dict(
        transform=Affine(10, 0, 500000, 0, -10, 5000000), tiled=True, blockxsize=32, blockysize=32
    )
    with rasterio.open(path, "w", compress="deflate", **profile) as dst:
        dst.write(data)
        dst.descriptions = tuple(S2_BANDS)
    scene = open_scene(path)
    plan = TilePlan.create(150, 90, 64, 16, 8)
    reader = ChipReader(
        scene, DEO_S2_MANIFEST.bands, Normalizer.from_manifest(DEO_S2_MANIFEST, 1.0, 3000.0), plan
    )
    chips = plan.chips()
    one = np.stack([s.x for s in reader.read_many(chips)])
    make_loader(reader, chips, 4, 0, torch.device("cpu"))
    assert scene.decode_threads == 3
    threaded = np.stack([s.x for s in reader.read_many(chips)])
    np.testing.assert_array_equal(threaded, one)
    make_loader(reader, chips, 4, 2, torch.device("cpu"))
    assert scene.decode_threads == 1
    monkeypatch.setenv("GDAL_NUM_THREADS", "2")
    assert decode_threads(0) == 1
