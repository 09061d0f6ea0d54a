"""GEO-Bench samples as model input: bands by name, stems, per-task z-score, sizes, masks."""

import pickle

import numpy as np
import pytest
import torch

from deo_cli.bench.inputs import IGNORE, GeoBenchTorchDataset, plan_inputs
from deo_cli.data.geobench import open_task
from deo_cli.errors import BandError
from deo_cli.sensors import DEO_RGB_MANIFEST, DEO_S2_MANIFEST
from tests.data.make_geobench_task import RGBN_BANDS, SO2SAT_BANDS, write_geobench_task


def test_fixture_s2_bands_in_deo_order_and_task_zscore(shared_data):
    task = open_task(shared_data / "geobench_brick_kiln_fixture")
    inputs = plan_inputs(task, DEO_S2_MANIFEST, DEO_RGB_MANIFEST, None)
    assert inputs.stem == "ms" and inputs.image_size == 64  # native size
    assert inputs.band_indices == (3, 2, 1, 4, 5, 6, 7, 8, 11, 12)  # docs/method.md §3.1
    assert inputs.band_names == DEO_S2_MANIFEST.bands
    ds = GeoBenchTorchDataset(inputs, task.split_ids("test"))
    item = ds[0]
    raw = task.load_sample(task.split_ids("test")[0]).image
    b04 = (raw[3] - task.band_mean[3]) / task.band_std[3]
    assert item["image"].shape == (10, 64, 64) and item["image"].dtype == torch.float32
    np.testing.assert_allclose(item["image"][0].numpy(), b04, rtol=1e-5, atol=1e-5)
    assert item["label"].item() == 0 and item["label"].dtype == torch.long


def test_model_normalisation_max_scales_rgb(shared_data):
    task = open_task(shared_data / "geobench_brick_kiln_fixture")
    inputs = plan_inputs(task, DEO_S2_MANIFEST, DEO_RGB_MANIFEST, None, normalization="model")
    x = inputs.image(task.load_sample("examples_0_9").image)
    raw = task.load_sample("examples_0_9").image[[3, 2, 1]]
    rgb01 = raw / raw.max()
    mean, std = np.array(DEO_S2_MANIFEST.mean[:3]), np.array(DEO_S2_MANIFEST.std[:3])
    np.testing.assert_allclose(
        x[:3], (rgb01 - mean[:, None, None]) / std[:, None, None], rtol=1e-4, atol=1e-4
    )


def test_rgbn_task_takes_the_rgb_stem_with_its_first_three_bands(tmp_path):
    w = write_geobench_task(tmp_path, "m-chesapeake", bands=RGBN_BANDS, size=12, n_samples=6)
    task = open_task(w.path)
    inputs = plan_inputs(task, DEO_S2_MANIFEST, DEO_RGB_MANIFEST, None)
    assert inputs.stem == "rgb" and inputs.band_indices == (0, 1, 2)
    assert inputs.band_names == ("red", "green", "blue")
    with pytest.raises(BandError, match="has none of the inputs"):
        plan_inputs(task, DEO_S2_MANIFEST, None, None)  # an encoder without an RGB stem


def test_so2sat_takes_its_ten_s2_channels(tmp_path):
    w = write_geobench_task(
        tmp_path, "m-so2sat", kind="classification", bands=SO2SAT_BANDS, size=8, n_samples=6
    )
    inputs = plan_inputs(open_task(w.path), DEO_S2_MANIFEST, DEO_RGB_MANIFEST, None)
    # 8 Sentinel-1 channels first, then B02..B8A, B11, B12: B04 is channel 10
    assert inputs.stem == "ms" and inputs.band_indices == (10, 9, 8, 11, 12, 13, 14, 15, 16, 17)


def test_resize_masks_nearest_out_of_range_ignored_and_flips(tmp_path):
    w = write_geobench_task(tmp_path, "m-tiny-seg", size=16, n_samples=6, num_classes=3)
    task = open_task(w.path)
    sid = task.split_ids("train")[0]
    truth = w.labels[sid].copy()
    inputs = plan_inputs(task, DEO_S2_MANIFEST, DEO_RGB_MANIFEST, 32)
    assert inputs.image_size == 32
    item = GeoBenchTorchDataset(inputs, [sid])[0]
    assert item["image"].shape == (10, 32, 32) and item["mask"].shape == (32, 32)
    np.testing.assert_array_equal(item["mask"][::2, ::2].numpy(), truth)  # nearest x2
    # a class outside 0..K-1 becomes the ignore value
    inputs_native = plan_inputs(task, DEO_S2_MANIFEST, DEO_RGB_MANIFEST, None)
    ds = GeoBenchTorchDataset(inputs_native, [sid])
    ds.num_classes = 2
    mask = ds[0]["mask"].numpy()
    assert (mask[truth == 2] == IGNORE).all() and (mask[truth < 2] == truth[truth < 2]).all()
    # flips move image and mask together
    torch.manual_seed(3)
    flipped = [GeoBenchTorchDataset(inputs_native, [sid], flips=True)[0] for _ in range(8)]
    plain = GeoBenchTorchDataset(inputs_native, [sid])[0]
    seen = set()
    for f in flipped:
        for dims in ((), (-1,), (-2,), (-2, -1)):
            img = plain["image"].flip(dims) if dims else plain["image"]
            msk = plain["mask"].flip(dims) if dims else plain["mask"]
            if torch.equal(f["image"], img):
                assert torch.equal(f["mask"], msk)
                seen.add(dims)
    assert len(seen) >= 2


def test_dataset_pickles_for_spawned_workers(shared_data):
    task = open_task(shared_data / "geobench_brick_kiln_fixture")
    ds = GeoBenchTorchDataset(
        plan_inputs(task, DEO_S2_MANIFEST, DEO_RGB_MANIFEST, None), task.split_ids("test")
    )
    copy = pickle.loads(pickle.dumps(ds))  # the task's GEO-Bench specs do not pickle: reopened by path
    assert copy.inputs.task.path == task.path and copy.inputs.band_indices == ds.inputs.band_indices
    assert torch.equal(copy[1]["image"], ds[1]["image"]) and copy[1]["label"] == ds[1]["label"]
