"""Image/label pairs, class tables and label windows for segment training."""

import numpy as np
import pytest
import rasterio
from affine import Affine

from deo_cli.data.segdata import (
    IGNORE,
    ArrayLabels,
    ClassTable,
    RasterLabels,
    find_pairs,
    holdout,
    label_values,
    load_class_file,
    read_pairs_csv,
)
from deo_cli.errors import DataError, InputNotFoundError
from deo_cli.io.grid import Grid
from tests.conftest import write_raster


def test_find_pairs_matches_by_name_with_label_suffixes(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for stem in ("a", "b_image", "c"):
        write_raster(tmp_path / "img" / f"{stem}.tif", np.zeros((1, 4, 4), np.uint16))
    for stem in ("a_mask", "b_label", "c", "orphan_mask"):
        write_raster(tmp_path / "lab" / f"{stem}.tif", np.zeros((1, 4, 4), np.uint8))
    pairs = find_pairs(str(tmp_path / "img"), str(tmp_path / "lab"))
    got = {p.name: p.label.rsplit("/", 1)[-1] for p in pairs}
    assert got == {"a": "a_mask.tif", "b_image": "b_label.tif", "c": "c.tif"}
    assert all(p.split is None for p in pairs)
    # a glob works the same way; an image without a label is one clear error
    write_raster(tmp_path / "img" / "d.tif", np.zeros((1, 4, 4), np.uint16))
    with pytest.raises(DataError, match="no label raster matches image.*d.tif"):
        find_pairs(str(tmp_path / "img" / "*.tif"), str(tmp_path / "lab"))
    with pytest.raises(InputNotFoundError):
        find_pairs(str(tmp_path / "nope"), str(tmp_path / "lab"))


def test_pairs_csv_relative_paths_and_splits(tmp_path):
    write_raster(tmp_path / "i1.tif", np.zeros((1, 4, 4), np.uint16))
    write_raster(tmp_path / "l1.tif", np.zeros((1, 4, 4), np.uint8))
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,label,split\ni1.tif,l1.tif,validation\ni1.tif,l1.tif,\n")
    pairs = read_pairs_csv(csv)
    assert [p.split for p in pairs] == ["val", None]
    assert pairs[0].image == str(tmp_path / "i1.tif")
    csv.write_text("image,label,split\ni1.tif,l1.tif,holdout\n")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        read_pairs_csv(csv)
    csv.write_text("img,lab\ni1.tif,l1.tif\n")
    with pytest.raises(DataError, match="needs 'image' and 'label' columns"):
        read_pairs_csv(csv)


def test_class_file_list_and_mapping_forms(tmp_path):
    f = tmp_path / "classes.yaml"
    f.write_text(
        "classes:\n"
        "  - {value: 0, name: unlabelled}\n"
        "  - {value: 1, name: crops, color: '#ffff00'}\n"
        "  - {value: 8, name: built, color: [200, 0, 0]}\n"
        "ignore_index: 0\n"
    )
    t = load_class_file(f)
    assert t.values == (1, 8) and t.names == ("crops", "built") and t.ignore == (0,)
    assert t.classes[0].color == (255, 255, 0) and t.classes[1].color == (200, 0, 0)
    assert t.nodata == 255 and t.dtype == "uint8"
    cmap = t.colormap()
    assert cmap[1] == (255, 255, 0, 255) and cmap[255] == (0, 0, 0, 0)
    f.write_text("classes: {3: water, 300: glacier}\n")
    t = load_class_file(f)
    assert t.values == (3, 300) and t.nodata == 65535 and t.dtype == "uint16"
    f.write_text("classes: {1: a}\ncolours: 2\n")
    with pytest.raises(DataError, match="unknown key"):
        load_class_file(f)
    f.write_text("classes:\n  - {value: 1, name: a, color: pink}\n")
    with pytest.raises(DataError, match="not a colour"):
        load_class_file(f)


@pytest.mark.parametrize(
    "text",
    [
        # value -> {name, color}: the natural form (was read as a class named by the whole dict)
        "classes:\n  0: {name: unlabelled}\n  1: {name: crops, color: '#ffff00'}\n"
        "  8: {name: built, colour: [200, 0, 0]}\nignore_index: 0\n",
        # a list of {value, name, color}
        "classes:\n  - {value: 1, name: crops, color: '#FFFF00'}\n  - {value: 8, name: built, color: [200, 0, 0]}\n",
        # value -> name, colours from the palette; and a mix of both mapping forms
        "classes: {1: crops, 8: {name: built, color: 'c80000'}}\n",
        # a file that is only the classes
        "1: {name: crops, color: '#ffff00'}\n8: {name: built, color: [200, 0, 0]}\n",
        "- {value: 1, name: crops, color: '#ffff00'}\n- {value: 8, name: built, color: [200, 0, 0]}\n",
    ],
)
def test_class_file_natural_forms(tmp_path, text):
    f = tmp_path / "classes.yaml"
    f.write_text(text)
    t = load_class_file(f)
    assert t.values == (1, 8) and t.names == ("crops", "built")
    assert t.classes[1].color == (200, 0, 0)
    if "ffff00" in text.lower():
        assert t.classes[0].color == (255, 255, 0)


@pytest.mark.parametrize(
    "text, needles",
    [
        (
            "classes:\n  forest: 1\n",
            ["class 'forest' in classes.yaml", "is not a label value", "VALUE: NAME"],
        ),
        ("classes:\n  1: {name: a, colr: '#000000'}\n", ["class 1 in classes.yaml", "unknown key(s) colr"]),
        (
            "classes:\n  1: [a, '#000000']\n",
            ["class 1 in classes.yaml", "neither a class name nor {name, color}"],
        ),
        (
            "classes:\n  1: {name: a, color: pink}\n",
            ["colour of class 1 (a) in classes.yaml", "not a colour"],
        ),
        ("classes:\n  1: {name: a, color: [300, 0, 0]}\n", ["colour of class 1", "not a colour"]),
        ("classes:\n  - {name: a}\n", ["class entry 1 ({'name': 'a'}) in classes.yaml has no value"]),
        ("classes:\n  - {value: -2, name: a}\n", ["class entry 1", "-2 is not a label value"]),
        ("classes:\n  - {value: 1.5, name: a}\n", ["1.5 is not a label value"]),
        ("classes: forest\n", ["'classes' in classes.yaml is neither a mapping nor a list"]),
        ("classes:\n  1: a\nnodata: none\n", ["nodata in classes.yaml: 'none' is not a label value"]),
    ],
)
def test_class_file_mistakes_name_the_entry(tmp_path, text, needles):
    f = tmp_path / "classes.yaml"
    f.write_text(text)
    with pytest.raises(DataError) as info:
        load_class_file(f)
    line = info.value.one_line()
    assert "\n" not in line
    for n in needles:
        assert n in line, line


def test_class_table_encode_decode_and_roundtrip():
    t = ClassTable.from_values([0, 2, 5, 9], ignore=[0])
    assert t.values == (2, 5, 9) and t.names == ("class_2", "class_5", "class_9")
    labels = np.array([[0, 2, 5], [9, 7, np.nan]], np.float32)
    idx = t.encode(labels)
    np.testing.assert_array_equal(idx, [[IGNORE, 0, 1], [2, IGNORE, IGNORE]])
    np.testing.assert_array_equal(t.decode(np.array([2, 0, 1])), [9, 2, 5])
    assert ClassTable.from_dict(t.to_dict()) == t
    with pytest.raises(DataError, match="also a class"):
        ClassTable.from_values([1, 255], nodata=255)


def test_holdout_is_deterministic_and_never_empties_training():
    a, b = holdout(10, 0.2, seed=3), holdout(10, 0.2, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 2
    assert holdout(2, 0.9).sum() == 1 and holdout(1, 0.5).sum() == 0 and holdout(5, 0.0).sum() == 0


def test_raster_labels_on_another_grid_use_nearest_and_ignore_outside(tmp_path):
    # image grid: 10 m pixels; label raster: 20 m pixels covering only the left half
    lab = np.array([[1, 2], [3, 0]], np.uint8)  # 0 = nodata
    path = write_raster(
        tmp_path / "lab.tif",
        lab,
        crs="EPSG:32633",
        transform=Affine(20, 0, 500000, 0, -20, 5000040),
        nodata=0,
    )
    grid = Grid(rasterio.crs.CRS.from_epsg(32633), Affine(10, 0, 500000, 0, -10, 5000040), 8, 4)
    table = ClassTable.from_values([1, 2, 3])
    src = RasterLabels(path, grid, table)
    assert src.warp
    win = src.read(0, 0, 6)
    expect = np.full((6, 6), IGNORE)
    expect[:2, :2], expect[:2, 2:4], expect[2:4, :2] = 0, 1, 2  # nearest: each 20 m label -> 2x2 pixels
    np.testing.assert_array_equal(win, expect)  # label nodata, outside the raster, outside the grid: IGNORE
    assert label_values([path]) == {1, 2, 3}


def test_raster_labels_without_crs_must_match_the_image_size(tmp_path):
    path = write_raster(tmp_path / "cm.tif", np.array([[1, 2, 2]], np.uint8), crs=None)
    grid = Grid(rasterio.crs.CRS.from_epsg(4326), Affine(1e-4, 0, 2, 0, -1e-4, 48), 3, 1)
    table = ClassTable.from_values([1, 2])
    np.testing.assert_array_equal(RasterLabels(path, grid, table).read(0, -1, 3)[0], [IGNORE, 0, 1])
    with pytest.raises(DataError, match="has no CRS"):
        RasterLabels(path, Grid(grid.crs, grid.transform, 4, 1), table)
    arr = ArrayLabels(np.array([[0, 1], [1, 0]]))
    np.testing.assert_array_equal(arr.read(1, 1, 2), [[0, IGNORE], [IGNORE, IGNORE]])
