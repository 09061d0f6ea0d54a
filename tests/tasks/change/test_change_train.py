"""detect-change train on a tiny synthetic OSCD-format folder: frozen and fine-tuned siamese heads,
then detect-change --head through the same streaming path."""

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from deo_cli.errors import DataError, RecipeError, UsageError
from deo_cli.infer.headfile import load_head
from deo_cli.recipes import ChangeRecipe, ChangeTrainRecipe, build_recipe
from deo_cli.tasks.change.predict import run_detect_change
from deo_cli.tasks.change.train import run_change_train
from tests.conftest import write_raster
from tests.infer.helpers import smooth_scene

OSCD_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")


def write_oscd(root: Path, cities=("alpha", "beta"), size=(64, 96)) -> Path:
    """An OSCD-format folder: per city 13 single-band uint16 files per date (10 m grid, EPSG:32631),
    a 1/2-coded change label without georeference, and the official split files."""
    h, w = size
    for k, city in enumerate(cities):
        base = smooth_scene(h, w, bands=13, seed=10 + k)
        after = base.astype(np.int32).copy()
        change = np.zeros((h, w), bool)
        change[10 + 5 * k : 30 + 5 * k, 20:44] = True  # a new "building": bright in every band
        after[:, change] = after[:, change] // 3 + 2500
        t = Affine(10, 0, 440000 + 5000 * k, 0, -10, 5400000)
        for d, img in (("imgs_1", base), ("imgs_2", after.astype(np.uint16))):
            folder = root / "images" / city / d
            folder.mkdir(parents=True, exist_ok=True)
            for i, b in enumerate(OSCD_BANDS):
                write_raster(
                    folder / f"T31UDQ_2017010{k + 1}T105019_{b}.tif", img[i], crs="EPSG:32631", transform=t
                )
        (root / "images" / city / "dates.txt").write_text("date_1: 20160101\ndate_2: 20170101\n")
        cm = root / "train_labels" / city / "cm"
        cm.mkdir(parents=True, exist_ok=True)
        write_raster(cm / f"{city}-cm.tif", (change + 1).astype(np.uint8), crs=None)
    (root / "images" / "train.txt").write_text(",".join(cities[:-1]))
    (root / "images" / "test.txt").write_text(cities[-1])
    return root


def train_recipe(data, *sets):
    return build_recipe(
        ChangeTrainRecipe,
        sets=[
            f"data={data}",
            "model.name=deo_swin_test",
            "model.weights=random",
            "chip_size=32",
            "head_channels=8",
            "runtime.device=cpu",
            "runtime.num_workers=0",
            "runtime.batch_size=8",
            *sets,
        ],
    )


@pytest.fixture(scope="module")
def oscd(tmp_path_factory):
    return write_oscd(tmp_path_factory.mktemp("oscd"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_frozen_head_then_detect_change_with_it(oscd, tmp_path):
    res = run_change_train(
        train_recipe(oscd, "train_cities=alpha", "test_cities=beta", "epochs=2", "lr=3e-3", "augment=none"),
        tmp_path / "run",
    )
    m = res.metrics
    assert m["train_cities"] == ["alpha"] and set(m["test"]) == {"beta"}
    assert m["encoder"] == "frozen" and len(m["history"]) == 2 and 0.05 <= m["val_best_threshold"] <= 0.95
    assert m["threshold_shrink"] == 1.0 and m["threshold"] == 0.5  # default: the trained decision
    assert 0 < m["change_fraction_train"] < 0.2 and m["class_weights"][1] > 1
    head = load_head(res.head, "change")
    assert head.head["fusion"] == "diff" and head.head["in_channels"] == [16, 32, 64, 128]
    assert head.head["pixel_channels"] == 32 and head.head["pixel_bands"] == 10  # |x1 - x2| branch
    assert any(k.startswith("pixel.") for k in head.head_state)
    assert head.encoder["embedded"] and head.threshold == m["threshold"]
    city = oscd / "images" / "beta"
    out = tmp_path / "c.tif"
    det = run_detect_change(
        str(city / "imgs_1"), str(city / "imgs_2"), out, build_recipe(ChangeRecipe), head=res.head
    )
    assert det.mode == "supervised" and det.threshold.method == "head"
    assert det.threshold.value == pytest.approx(m["threshold"])
    with rasterio.open(out) as s, rasterio.open(city / "imgs_1" / "T31UDQ_20170102T105019_B02.tif") as src:
        assert s.transform == src.transform and s.shape == src.shape  # P(change) on the input grid
        p = s.read(1)
        assert np.isfinite(p).all() and 0.0 <= p.min() and p.max() <= 1.0
    # the test-city metrics of training came from the same streaming path: same F1
    with rasterio.open(det.mask) as mk:
        pred = mk.read(1) == 1
    label = np.asarray(rasterio.open(oscd / "train_labels" / "beta" / "cm" / "beta-cm.tif").read(1)) == 2
    tp, fp, fn = (pred & label).sum(), (pred & ~label).sum(), (~pred & label).sum()
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    assert f1 == pytest.approx(m["test"]["beta"]["f1"], nan_ok=True)


def test_finetuned_encoder_travels_in_the_head_file(oscd, tmp_path):
    res = run_change_train(
        train_recipe(
            oscd,
            "train_cities=alpha,beta",
            "epochs=1",
            "finetune=true",
            "fusion=concat",
            "head=linear",
            "threshold_shrink=0.5",
        ),
        tmp_path / "run",
    )
    head = load_head(res.head, "change")
    m = res.metrics
    assert m["threshold"] == pytest.approx(0.5 + 0.5 * (m["val_best_threshold"] - 0.5))  # halfway
    assert head.threshold == m["threshold"] and m["threshold_shrink"] == 0.5
    assert head.encoder["frozen"] is False and head.encoder["embedded"]
    assert head.head["in_channels"] == [32, 64, 128, 256]  # [f1, f2] per level
    assert any(k.startswith("stages") or k.startswith("features") for k in head.encoder_state)
    assert res.metrics["encoder"] == "fine-tuned" and "test" not in res.metrics


def test_train_mistakes(oscd, tmp_path):
    with pytest.raises(UsageError, match="both train and test"):
        run_change_train(train_recipe(oscd, "train_cities=alpha", "test_cities=alpha"), tmp_path / "a")
    with pytest.raises(DataError, match="not found"):
        run_change_train(train_recipe(oscd, "train_cities=gamma"), tmp_path / "b")
    with pytest.raises(UsageError, match="coarsest stride 32"):
        run_change_train(train_recipe(oscd, "chip_size=48"), tmp_path / "c")
    with pytest.raises(RecipeError, match="threshold_shrink"):
        train_recipe(oscd, "threshold_shrink=2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
