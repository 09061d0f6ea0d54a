"""``deo segment train`` then ``deo segment predict`` through the command line, on the eo-learn patch."""

import json

import numpy as np
import pytest
import rasterio
import torch
from typer.testing import CliRunner

from tests.cli.helpers import assert_one_line_error, run
from tests.infer.helpers import assert_valid_cog
from tests.tasks.segment.test_segment import NODATA_BLOCK, write_eolearn

runner = CliRunner()
FAST = ["--model", "deo_swin_test", "--weights", "random", "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """A head trained on the eo-learn patch (2 epochs, tiny UPerNet), through the CLI."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("seg")
    image, label = write_eolearn(shared_data, tmp / "data")
    classes = tmp / "classes.yaml"
    classes.write_text(
        "classes:\n"
        "  - {value: 1, name: cultivated land, color: '#ffff00'}\n"
        "  - {value: 2, name: forest, color: '#006400'}\n"
        "  - {value: 3, name: grassland, color: '#7cfc00'}\n"
        "  - {value: 4, name: shrubland, color: '#8b4513'}\n"
        "  - {value: 8, name: artificial surface, color: '#ff0000'}\n"
        "ignore_index: 0\n"
    )
    out = tmp / "run"
    result, lines = run(
        [
            "segment", "train", "--images", str(image), "--labels", str(label), "--classes", str(classes),
            "--chip-size", "64", "--epochs", "2", "--head-channels", "16", "-o", str(out), "--batch-size", "4",
            "--set", "data.val_fraction=0.25", *FAST,
        ]
    )  # fmt: skip
    torch.set_num_threads(n)
    assert result.exit_code == 0, result.output
    return {"tmp": tmp, "image": image, "label": label, "run": out, "stdout": result.stdout}


def test_train_writes_a_self_describing_run_folder(trained):
    out = trained["run"]
    assert sorted(p.name for p in out.iterdir()) == ["head.pt", "metrics.json", "recipe.yaml"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_chips"] == 3 and metrics["val_chips"] == 1  # 4 chips of 64 px, one held out
    assert len(metrics["history"]) == 2 and "val_miou" in metrics["history"][0]
    assert set(metrics["val"]["iou"]) == {
        "cultivated land",
        "forest",
        "grassland",
        "shrubland",
        "artificial surface",
    }
    assert metrics["data"]["normalization"]["unit"] == "reflectance"  # 0-1 input, converted to DN
    head = torch.load(out / "head.pt", weights_only=True)
    assert head["deo_format"] == "head-v1" and head["task"] == "segment"
    assert head["head"]["kind"] == "upernet" and head["head"]["num_classes"] == 5
    assert head["encoder"]["model"] == "deo_swin_test" and head["encoder"]["embedded"]
    assert head["classes"]["ignore"] == [0] and head["classes"]["nodata"] == 255
    assert head["chip_size"] == 64 and head["recipe"]["data"]["classes"]
    assert "validation mIoU" in trained["stdout"]


def test_predict_writes_a_class_cog_on_exactly_the_input_grid(trained):
    tmp = trained["tmp"]
    mask, proba, png = tmp / "mask.tif", tmp / "proba.tif", tmp / "mask.png"
    result, _ = run(
        [
            "segment", "predict", str(trained["image"]), "-o", str(mask), "--head", str(trained["run"] / "head.pt"),
            "--probabilities", str(proba), "--preview", str(png), "--num-workers", "0", "--device", "cpu",
        ]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_valid_cog(mask)
    with rasterio.open(mask) as m, rasterio.open(trained["image"]) as src:
        assert m.crs == src.crs and m.transform == src.transform
        assert (m.width, m.height) == (src.width, src.height) == (100, 101)
        assert m.dtypes[0] == "uint8" and m.nodata == 255 and m.descriptions == ("class",)
        classes = m.read(1)
        assert (classes[NODATA_BLOCK] == 255).all()  # nodata exactly where the input is nodata
        rest = np.ones(classes.shape, bool)
        rest[NODATA_BLOCK] = False
        assert set(np.unique(classes[rest]).tolist()) <= {1, 2, 3, 4, 8}
        cmap = m.colormap(1)
        assert cmap[2] == (0, 100, 0, 255) and cmap[255][3] == 0
        tags = m.tags()
        assert [c["name"] for c in json.loads(tags["DEO_CLASSES"])["classes"]][1] == "forest"
        assert json.loads(tags["DEO_HEAD"])["kind"] == "upernet" and tags["DEO_MODEL"] == "deo_swin_test"
        assert json.loads(tags["DEO_NORMALIZATION"])["unit"] == "reflectance"
        # mode/nearest overviews never invent a class between two others
        ov = m.read(1, out_shape=(51, 50))
        assert set(np.unique(ov).tolist()) <= {1, 2, 3, 4, 8, 255}
    with rasterio.open(proba) as p:
        assert p.count == 5 and p.descriptions[1] == "forest" and p.transform == m.transform
        probs = p.read()
        assert np.isnan(probs[:, :10, :20]).all()
        np.testing.assert_allclose(probs[:, 10:].sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(np.array([1, 2, 3, 4, 8])[probs[:, 10:].argmax(0)], classes[10:])
    assert png.stat().st_size > 0 and (tmp / "mask.recipe.yaml").exists()


def test_predict_mistakes_are_one_line(trained, tmp_path, make_raster):
    head = str(trained["run"] / "head.pt")
    out = tmp_path / "m.tif"
    out.write_bytes(b"")
    result, lines = run(["segment", "predict", str(trained["image"]), "-o", str(out), "--head", head])
    assert_one_line_error(result, lines, 1, "already exists", "--overwrite")
    rgbn = make_raster(
        "four.tif", np.ones((4, 8, 8), np.uint16) * 500, descriptions=["B02", "B03", "B08", "B11"]
    )
    result, lines = run(["segment", "predict", str(rgbn), "-o", str(tmp_path / "x.tif"), "--head", head])
    assert_one_line_error(result, lines, 1, "was trained on 10 multispectral bands", "lacks B04, B05")
    assert not (tmp_path / "x.tif").exists()
    torch.save(
        {"deo_format": "head-v1", "task": "change", "head": {}, "head_state": {}, "encoder": {}},
        tmp_path / "c.pt",
    )
    result, lines = run(
        [
            "segment",
            "predict",
            str(trained["image"]),
            "-o",
            str(tmp_path / "y.tif"),
            "--head",
            str(tmp_path / "c.pt"),
        ]
    )
    assert_one_line_error(result, lines, 1, "is a change head", "detect-change --head")


def test_predict_feeds_the_stem_the_head_was_trained_on(trained, tmp_path):
    """A head trained on 10 bands refuses an RGB scene (as detect-change --head does) instead of
    reading the RGB stem's features; a head trained on RGB takes a 10-band scene's red, green, blue."""
    head = trained["run"] / "head.pt"
    assert torch.load(head, weights_only=True)["normalization"]["stem"] == "ms"
    with rasterio.open(trained["image"]) as src:
        names = list(src.descriptions)
        rgb = src.read([names.index(b) + 1 for b in ("B04", "B03", "B02")])
        profile = src.profile | {"count": 3}
    rgb_path = tmp_path / "rgb.tif"
    with rasterio.open(rgb_path, "w", **profile) as dst:
        dst.write(rgb)
        dst.descriptions = ("B04", "B03", "B02")
    out = tmp_path / "mask.tif"
    result, lines = run(["segment", "predict", str(rgb_path), "-o", str(out), "--head", str(head)])
    assert_one_line_error(
        result, lines, 1, "segment head head.pt was trained on 10 multispectral bands",
        "lacks B05, B06, B07, B08, B8A, B11, B12 (it has B04, B03, B02)", "train a head on RGB images",
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.tif"]

    state = torch.load(head, weights_only=True)
    state["normalization"]["stem"] = "rgb"
    torch.save(state, tmp_path / "rgb_head.pt")
    result, _ = run(
        ["segment", "predict", str(trained["image"]), "-o", str(out), "--head", str(tmp_path / "rgb_head.pt"),
         "--num-workers", "0", "--device", "cpu"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with rasterio.open(out) as m:
        used = json.loads(m.tags()["DEO_NORMALIZATION"])
    assert used["stem"] == "rgb" and used["input_bands"] == ["B04", "B03", "B02"]


def test_train_mistakes_are_one_line(trained, tmp_path):
    result, lines = run(
        ["segment", "train", "--images", str(trained["image"]), "-o", str(tmp_path / "r"), *FAST]
    )
    assert_one_line_error(result, lines, 2, "--images needs --labels")
    result, lines = run(
        [
            "segment",
            "train",
            "--images",
            str(trained["image"]),
            "--labels",
            str(trained["label"]),
            "-o",
            str(trained["run"]),
            *FAST,
        ]
    )
    assert_one_line_error(result, lines, 1, "is not empty", "--overwrite")
    result, lines = run(
        ["segment", "train", "--images", str(trained["image"]), "--labels", str(trained["label"]),
         "--chip-size", "48", "-o", str(tmp_path / "r"), *FAST]
    )  # fmt: skip
    assert_one_line_error(result, lines, 2, "not a multiple of the encoder's coarsest stride 32")


def test_predict_several_scenes_into_a_folder(trained, tmp_path):
    import shutil

    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    shutil.copy(trained["image"], a)
    shutil.copy(trained["image"], b)
    out = tmp_path / "masks"
    result, _ = run(
        ["segment", "predict", str(a), str(b), "-o", str(out), "--head", str(trained["run"] / "head.pt"),
         "--num-workers", "0", "--device", "cpu"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with rasterio.open(out / "a.tif") as ma, rasterio.open(out / "b.tif") as mb:
        np.testing.assert_array_equal(ma.read(1), mb.read(1))  # same pixels, same classes
        assert ma.transform == mb.transform


CLASS_FILES = {
    "value -> {name, color}": (
        "classes:\n  1: {name: cultivated land, color: '#ffff00'}\n  2: {name: forest, color: [0, 100, 0]}\n"
        "  3: {name: grassland, color: '#7cfc00'}\n  4: {name: shrubland, color: '#8b4513'}\n"
        "  8: {name: artificial surface, color: '#ff0000'}\nignore_index: 0\n"
    ),
    "list of {value, name, color}": (
        "- {value: 1, name: cultivated land, color: '#ffff00'}\n- {value: 2, name: forest, color: [0, 100, 0]}\n"
        "- {value: 3, name: grassland, color: '#7cfc00'}\n- {value: 4, name: shrubland, color: '#8b4513'}\n"
        "- {value: 8, name: artificial surface, color: '#ff0000'}\n"
    ),
    "value -> name": "classes: {1: cultivated land, 2: forest, 3: grassland, 4: shrubland, 8: artificial surface}\n",
}


@pytest.mark.parametrize("form", list(CLASS_FILES))
def test_class_file_forms_reach_the_predicted_mask(trained, tmp_path, form, one_torch_thread):
    """Each --classes form trains a head whose class names and colours end up in the mask file."""
    classes = tmp_path / "classes.yaml"
    classes.write_text(CLASS_FILES[form])
    out, mask = tmp_path / "run", tmp_path / "mask.tif"
    result, _ = run(
        ["segment", "train", "--images", str(trained["image"]), "--labels", str(trained["label"]),
         "--classes", str(classes), "--ignore-index", "0", "--chip-size", "64", "--epochs", "1",
         "--head", "linear", "-o", str(out), "--batch-size", "4", *FAST]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result, _ = run(
        ["segment", "predict", str(trained["image"]), "-o", str(mask), "--head", str(out / "head.pt"),
         "--num-workers", "0", "--device", "cpu"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    names = ["cultivated land", "forest", "grassland", "shrubland", "artificial surface"]
    with rasterio.open(mask) as m:
        written = json.loads(m.tags()["DEO_CLASSES"])
        cmap = m.colormap(1)
    assert [c["name"] for c in written["classes"]] == names
    assert [c["value"] for c in written["classes"]] == [1, 2, 3, 4, 8] and written["ignore"] == [0]
    if form == "value -> name":  # no colours given: the palette's, one per class, in the table
        assert len({cmap[v] for v in (1, 2, 3, 4, 8)}) == 5
    else:
        assert cmap[1] == (255, 255, 0, 255) and cmap[2] == (0, 100, 0, 255) and cmap[8] == (255, 0, 0, 255)
        assert [c["color"] for c in written["classes"]][:2] == ["#ffff00", "#006400"]


def test_a_class_file_entry_deo_cannot_read_is_one_line(trained, tmp_path):
    classes = tmp_path / "classes.yaml"
    classes.write_text("classes:\n  1: {name: forest, colour: '#00640'}\n")
    out = tmp_path / "run"
    result, lines = run(
        ["segment", "train", "--images", str(trained["image"]), "--labels", str(trained["label"]),
         "--classes", str(classes), "-o", str(out), *FAST]
    )  # fmt: skip
    assert_one_line_error(
        result, lines, 1, "colour of class 1 (forest) in classes.yaml", "'#00640' is not a colour"
    )
    assert not out.exists()


def test_predict_output_names_and_locks(trained, tmp_path):
    from deo_cli.io.atomic import output_lock

    head = str(trained["run"] / "head.pt")
    image = str(trained["image"])
    result, lines = run(["segment", "predict", image, "-o", str(tmp_path / "m.png"), "--head", head])
    assert_one_line_error(result, lines, 2, "-o m.png has the extension .png", "a COG (GeoTIFF)", "m.tif")
    out = tmp_path / "m.tif"
    result, lines = run(
        [
            "segment",
            "predict",
            image,
            "-o",
            str(out),
            "--head",
            head,
            "--probabilities",
            str(tmp_path / "p.xyz"),
        ]
    )
    assert_one_line_error(result, lines, 2, "--probabilities p.xyz has the extension .xyz", "p.tif")
    with output_lock(out):
        result, lines = run(["segment", "predict", image, "-o", str(out), "--head", head, "-q"])
        assert_one_line_error(
            result, lines, 1, "m.tif is being written by another deo run", "Wait for that run"
        )
    assert list(tmp_path.iterdir()) == []
