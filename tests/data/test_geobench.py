"""GEO-Bench v1 reader: the real brick_kiln fixture, written tasks, and the restricted unpickler."""

from __future__ import annotations

import ast
import json
import os
import pickle
import pickletools

import h5py
import numpy as np
import pytest

from deo_cli.data.geobench import (
    GEO_BENCH_ENV,
    GeoBenchTask,
    list_tasks,
    open_task,
    safe_loads,
    select_bands,
)
from deo_cli.data.geobench_pickle import TaskSpecifications
from deo_cli.errors import BandError, DataError
from deo_cli.sensors import BAND_SETS, DEO_RGB_MANIFEST, DEO_S2_MANIFEST
from tests.data.make_geobench_task import RGBN_BANDS, S2_12_CLOUD_BANDS, SO2SAT_BANDS, write_geobench_task

FIXTURE_IDS = ["examples_0_9", "examples_0_12", "examples_0_19", "examples_0_37", "examples_0_40"]


@pytest.fixture(scope="module")
def kiln(shared_data) -> GeoBenchTask:
    return open_task(shared_data / "geobench_brick_kiln_fixture")


# ---------------------------------------------------------------------------------------------
# The real fixture (GEO-Bench's own brick_kiln test copy)
# ---------------------------------------------------------------------------------------------


def test_fixture_has_13_named_s2_bands(kiln):
    assert kiln.kind == "classification"
    assert kiln.band_names == BAND_SETS["S2_L1C"].bands  # B01..B12 incl. B8A and B10, in order
    assert kiln.raw_band_names[0] == "01 - Coastal aerosol"
    assert kiln.raw_band_names[8] == "08A - Vegetation Red Edge"
    assert kiln.raw_band_names[10] == "10 - SWIR - Cirrus"
    assert kiln.dataset_name == "brick_kiln_v1.0"
    assert kiln.patch_size == (64, 64)
    assert kiln.label.num_classes == 2 and not kiln.label.multilabel
    assert kiln.label.class_names == ("not brick kiln", "brick kiln")


def test_fixture_partition_and_labels(kiln, shared_data):
    assert kiln.partitions() == ["default"]
    for split in ("train", "valid", "val", "test"):
        assert kiln.split_ids(split) == FIXTURE_IDS
    raw = h5py.File(shared_data / "geobench_brick_kiln_fixture" / "examples_0_37.hdf5", "r")
    for sample_id in FIXTURE_IDS:
        sample = kiln.load_sample(sample_id)
        assert sample.sample_id == sample_id
        assert sample.image.shape == (13, 64, 64) and sample.image.dtype == np.float32
        assert sample.label == 0 and isinstance(sample.label, int)  # SOURCE.md: all five are 0
        assert sample.transform is None and sample.crs is None  # the fixture has no georeference
    sample = kiln.load_sample("examples_0_37")
    np.testing.assert_array_equal(sample.image[3], np.asarray(raw["04 - Red"], dtype=np.float32))
    np.testing.assert_array_equal(
        sample.image[8], np.asarray(raw["08A - Vegetation Red Edge"], dtype=np.float32)
    )


def test_fixture_bands_for_deo_s2_and_rgb(kiln):
    # docs/method.md §3.1: 13-band S2 -> [B4, B3, B2, B5, B6, B7, B8, B8A, B11, B12]
    assert kiln.bands_for_model(DEO_S2_MANIFEST) == [3, 2, 1, 4, 5, 6, 7, 8, 11, 12]
    assert kiln.bands_for_model(DEO_RGB_MANIFEST) == [3, 2, 1]
    assert kiln.pick_manifest([DEO_S2_MANIFEST, DEO_RGB_MANIFEST]) is DEO_S2_MANIFEST
    assert kiln.band_indices(["B8A", "12 - SWIR", "red"]) == [8, 12, 3]
    with pytest.raises(BandError, match="VV"):
        kiln.bands_for_model(["B04", "VV"])


def test_fixture_normalize_is_band_stats_zscore(kiln, shared_data):
    stats = json.loads((shared_data / "geobench_brick_kiln_fixture" / "band_stats.json").read_text())
    sample = kiln.load_sample("examples_0_12")
    idx = kiln.bands_for_model(DEO_S2_MANIFEST)
    out = kiln.normalize(sample.image[idx], idx)
    assert out.shape == (10, 64, 64) and out.dtype == np.float32
    red = stats["04 - Red"]
    expected = (sample.image[3].astype(np.float64) - red["mean"]) / red["std"]
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)
    swir2 = stats["12 - SWIR"]
    np.testing.assert_allclose(
        out[9], (sample.image[12] - swir2["mean"]) / swir2["std"], rtol=1e-5, atol=1e-5
    )
    # all bands at once, and batches (N, C, H, W)
    full = kiln.normalize(sample.image)
    np.testing.assert_allclose(full[idx], out, rtol=1e-6)
    batch = kiln.normalize(np.stack([sample.image[idx]] * 2), idx)
    np.testing.assert_allclose(batch[1], out, rtol=1e-6)
    with pytest.raises(ValueError):
        kiln.normalize(sample.image[:3], idx)


def test_select_bands_by_name(kiln):
    sample = kiln.load_sample("examples_0_9")
    rgb = select_bands(sample.image, kiln.raw_band_names, ["B4", "green", "02 - Blue"])
    np.testing.assert_array_equal(rgb, sample.image[[3, 2, 1]])
    with pytest.raises(BandError):
        select_bands(sample.image, kiln.band_names, ["VV"])


def test_fixture_task_specs_reads_without_geobench(shared_data):
    data = (shared_data / "geobench_brick_kiln_fixture" / "task_specs.pkl").read_bytes()
    modules = {
        arg.split()[0]
        for op, arg, _ in pickletools.genops(data)
        if op.name == "SHORT_BINUNICODE" and arg in ("ccb.io.task", "ccb.io.dataset", "ccb.io.label")
    }
    assert modules == {"ccb.io.task", "ccb.io.dataset", "ccb.io.label"}  # the early module names
    specs = safe_loads(data)
    assert isinstance(specs, TaskSpecifications)
    assert len(specs.bands_info) == 13
    assert "geobench" not in {m.split(".")[0] for m in __import__("sys").modules}


# ---------------------------------------------------------------------------------------------
# The restricted unpickler
# ---------------------------------------------------------------------------------------------


def test_unpickler_rejects_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    with pytest.raises(DataError, match=r"os\.system"):
        safe_loads(payload)
    assert not marker.exists()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(DataError, match="system"):
        safe_loads(pickle.dumps(Evil()))
    assert not marker.exists()


class Arbitrary:
    def __init__(self):
        self.x = 1


def test_unpickler_rejects_other_classes_and_gadgets():
    with pytest.raises(DataError, match=r"test_geobench\.Arbitrary|Arbitrary"):
        safe_loads(pickle.dumps(Arbitrary()))
    # a geobench module name does not open the module: only the known class names are mapped
    with pytest.raises(DataError, match=r"geobench\.task\.load_task_specs"):
        safe_loads(b"\x80\x04\x8c\rgeobench.task\x8c\x0fload_task_specs\x93.")
    with pytest.raises(DataError, match="builtins.eval"):
        safe_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match="object dtype"):
        safe_loads(pickle.dumps(np.array([1, "a"], dtype=object)))
    with pytest.raises(DataError, match="not a valid GEO-Bench pickle"):
        safe_loads(b"\x80\x04garbage")
    # plain data and numeric arrays are fine
    out = safe_loads(pickle.dumps({"a": np.arange(3, dtype=np.int16), "b": {1, 2}, "c": np.float32(2)}))
    np.testing.assert_array_equal(out["a"], [0, 1, 2])
    assert out["b"] == {1, 2} and out["c"] == np.float32(2)


def test_open_task_refuses_malicious_task_specs(tmp_path):
    folder = tmp_path / "m-evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "task_specs.pkl").write_bytes(f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(DataError, match=r"task_specs\.pkl.*posix\.system"):
        open_task(folder)
    assert not marker.exists()


def test_load_sample_refuses_malicious_sample_pickle(tmp_path):
    written = write_geobench_task(tmp_path, "m-tiny", kind="classification", n_samples=3)
    marker = tmp_path / "pwned"
    with h5py.File(written.path / "sample_000.hdf5", "r+") as h5:
        h5.attrs["pickle"] = str(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    task = open_task(written.path)
    with pytest.raises(DataError, match=r"sample_000\.hdf5.*os\.system"):
        task.load_sample("sample_000")
    assert not marker.exists()
    assert task.load_sample("sample_001").label == 1


# ---------------------------------------------------------------------------------------------
# Finding tasks; one-line errors
# ---------------------------------------------------------------------------------------------


def test_missing_geobench_dir_says_how_to_get_the_data(monkeypatch, tmp_path):
    monkeypatch.delenv(GEO_BENCH_ENV, raising=False)
    with pytest.raises(DataError) as err:
        open_task("m-eurosat")
    text = str(err.value)
    assert "\n" not in text
    assert GEO_BENCH_ENV in text and "deo bench download --suite geobench" in text

    monkeypatch.setenv(GEO_BENCH_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="does not exist.*deo bench download"):
        open_task("m-eurosat")


def test_missing_task_lists_what_is_there(monkeypatch, tmp_path):
    write_geobench_task(tmp_path, "m-brick-kiln", kind="classification", n_samples=3)
    monkeypatch.setenv(GEO_BENCH_ENV, str(tmp_path))
    with pytest.raises(DataError) as err:
        open_task("m-eurosat")
    text = str(err.value)
    assert "\n" not in text and "m-brick-kiln" in text and "--tasks m-eurosat" in text
    with pytest.raises(DataError, match="does not exist"):
        open_task(str(tmp_path / "classification_v1.0" / "m-eurosat"))


def test_open_by_name_alias_and_env(monkeypatch, tmp_path):
    write_geobench_task(tmp_path, "m-cashew-plant", bands=S2_12_CLOUD_BANDS, n_samples=3)
    write_geobench_task(tmp_path, "m-brick-kiln", kind="classification", n_samples=3)
    monkeypatch.setenv(GEO_BENCH_ENV, str(tmp_path))
    assert [p.name for p in list_tasks()] == ["m-brick-kiln", "m-cashew-plant"]
    for name in ("m-cashew-plant", "m-cashew-plantation", "cashew-plant", "M_CASHEW_PLANT"):
        task = open_task(name)
        assert task.name == "m-cashew-plant" and task.benchmark == "segmentation_v1.0"
    assert open_task("brick_kiln", root=tmp_path).kind == "classification"


# ---------------------------------------------------------------------------------------------
# Written tasks: segmentation, multi-label, RGBN, Sentinel-1 + Sentinel-2
# ---------------------------------------------------------------------------------------------


def test_written_segmentation_task_reads_back(tmp_path):
    written = write_geobench_task(tmp_path, "m-cashew-plant", bands=S2_12_CLOUD_BANDS, size=16, n_samples=6)
    task = open_task(written.path)
    assert task.kind == "segmentation" and task.label.num_classes == 3
    assert task.band_names == (*BAND_SETS["S2_L2A"].bands, "Cloud Probability")
    assert task.patch_size == (16, 16)
    assert task.partitions() == ["default", "0.50x_train"]
    assert task.split_ids("train") == written.partitions["default"]["train"]
    assert task.split_ids("train", "0.50x_train") == written.partitions["0.50x_train"]["train"]
    with h5py.File(written.path / "sample_000.hdf5") as h5:
        assert "04 - Red_2020-06-01" in h5 and "label" in h5  # v1.0 style date-suffixed keys
    for sample_id, image in written.images.items():
        sample = task.load_sample(sample_id)
        np.testing.assert_array_equal(sample.image, image.astype(np.float32))
        np.testing.assert_array_equal(sample.label, written.labels[sample_id])
        assert sample.label.dtype == np.int64 and sample.label.shape == (16, 16)
        assert sample.transform == written.transforms[sample_id]
        assert sample.crs is not None and "UTM zone 31N" in sample.crs
        assert sample.date == written.date
    # 12-band S2 without B10: indices shift (docs/method.md §3.1)
    assert task.bands_for_model(DEO_S2_MANIFEST) == [3, 2, 1, 4, 5, 6, 7, 8, 10, 11]
    stats = json.loads((written.path / "band_stats.json").read_text())
    sample = task.load_sample("sample_002")
    idx = task.bands_for_model(DEO_S2_MANIFEST)
    norm = task.normalize(sample.image[idx], idx)
    b11 = stats["11 - SWIR"]
    np.testing.assert_allclose(norm[8], (sample.image[10] - b11["mean"]) / b11["std"], rtol=1e-5, atol=1e-5)


def test_written_multilabel_task_under_old_module_names(tmp_path):
    written = write_geobench_task(
        tmp_path,
        "m-bigearthnet",
        kind="classification",
        multilabel=True,
        num_classes=7,
        package="ccb.io",
        dated=False,
    )
    with open(written.path / "task_specs.pkl", "rb") as fh:
        assert b"ccb.io.label" in fh.read()
    task = open_task(written.path)
    assert task.label.multilabel and task.label.num_classes == 7
    for sample_id, label in written.labels.items():
        got = task.load_sample(sample_id).label
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, label)
    samples = list(task.iter_samples("train", limit=2))
    assert [s.sample_id for s in samples] == written.partitions["default"]["train"][:2]


def test_rgbn_task_goes_through_rgb_stem(tmp_path):
    written = write_geobench_task(tmp_path, "m-chesapeake", bands=RGBN_BANDS, package="geobench.io")
    task = open_task(written.path)
    assert task.band_names == ("red", "green", "blue", "NearInfrared")
    assert task.bands_for_model(DEO_RGB_MANIFEST) == [0, 1, 2]  # first 3 channels of RGBN
    assert task.pick_manifest([DEO_S2_MANIFEST, DEO_RGB_MANIFEST]) is DEO_RGB_MANIFEST
    with pytest.raises(BandError, match="B05"):
        task.bands_for_model(DEO_S2_MANIFEST)


def test_so2sat_keeps_sentinel1_names(tmp_path):
    written = write_geobench_task(
        tmp_path, "m-so2sat", kind="classification", bands=SO2SAT_BANDS, num_classes=17
    )
    task = open_task(written.path)
    assert task.band_names[:2] == ("01 - VH.Real", "02 - VH.Imaginary")  # not mistaken for B01, B02
    assert task.band_names[8:] == ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    assert task.bands_for_model(DEO_S2_MANIFEST) == [10, 9, 8, 11, 12, 13, 14, 15, 16, 17]


def test_damaged_or_missing_samples_are_data_errors(tmp_path):
    written = write_geobench_task(tmp_path, "m-tiny", kind="classification", n_samples=3)
    task = open_task(written.path)
    with pytest.raises(DataError, match="missing"):
        task.load_sample("sample_999")
    with pytest.raises(DataError, match="no partition"):
        task.split_ids("train", "0.10x_train")
    with pytest.raises(DataError, match="no split"):
        task.split_ids("holdout")
    with h5py.File(written.path / "sample_001.hdf5", "r+") as h5:
        del h5[written.raw_band_names[4] + "_2020-06-01"]
    with pytest.raises(DataError, match="lacks band"):
        task.load_sample("sample_001")
    (written.path / "sample_002.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="cannot read"):
        task.load_sample("sample_002")


def test_sample_pickle_attribute_is_a_bytes_literal(shared_data):
    # GEO-Bench stores str(pickle.dumps(attrs)): the reader must literal_eval, never eval.
    with h5py.File(shared_data / "geobench_brick_kiln_fixture" / "examples_0_9.hdf5") as h5:
        raw = h5.attrs["pickle"]
    assert isinstance(raw, str) and raw.startswith("b")
    attrs = safe_loads(ast.literal_eval(raw))
    assert attrs["label"] == 0 and attrs["04 - Red"]["band_info"].name == "04 - Red"
