"""``deo inspect`` through the command line: the README's inventory of a folder of scenes."""

import glob
import json

import numpy as np

from tests.cli.helpers import assert_one_line_error, run


def test_readme_inventory_skips_what_is_not_a_raster(shared_data, tmp_path):
    """`deo inspect ../shared/data/bigearthnet_s2_example/* --json -o inventory.json`: the shell
    glob also names SOURCE.md, which is skipped with one warning; each folder is one scene."""
    inputs = sorted(glob.glob(str(shared_data / "bigearthnet_s2_example" / "*")))
    assert any(p.endswith("SOURCE.md") for p in inputs) and len(inputs) == 7
    out = tmp_path / "inventory.json"
    result, lines = run(["inspect", *inputs, "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in lines if ln.startswith("WARNING")]
    text = " ".join(" ".join(lines).split())  # the terminal handler wraps long lines
    assert len(warnings) == 1 and "SOURCE.md: not a raster GDAL can open" in text
    assert "error" not in result.stderr
    inventory = json.loads(out.read_text())
    assert inventory == json.loads(result.stdout)
    assert [r["scene"].split("/")[-1] for r in inventory] == [p.split("/")[-1] for p in inputs[:-1]]
    assert [r["crs"] for r in inventory] == ["EPSG:32633"] + ["EPSG:32629"] * 3 + ["EPSG:32635"] * 2
    for r in inventory:
        day = r["scene"].split("/")[-1].split("_")[2][:8]  # S2A_MSIL2A_20170613T101031_87_48
        assert r["datetime"][:10] == f"{day[:4]}-{day[4:6]}-{day[6:]}" and (r["width"], r["height"]) == (
            120,
            120,
        )
        assert len(r["paths"]) == 12 and len(r["bands"]) == 12  # per-band files grouped into one scene
        assert [b["name"] for b in r["bands"]][:4] == ["B01", "B02", "B03", "B04"]
        assert r["manifests"]["deo-s2-10"]["satisfied"] and r["unit"]["unit"] == "dn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inventory.json"]


def test_what_is_not_a_raster_is_still_an_error_when_named_alone(shared_data, tmp_path, make_raster):
    source = shared_data / "bigearthnet_s2_example" / "SOURCE.md"
    out = tmp_path / "inventory.json"
    result, lines = run(["inspect", str(source), "-o", str(out)])
    assert_one_line_error(result, lines, 1, "cannot read", "SOURCE.md", "as a raster")
    notes = tmp_path / "notes.txt"
    notes.write_text("no raster here")
    result, lines = run(["inspect", str(source), str(notes), "-o", str(out)])
    assert lines[-1].startswith("error: none of the 2 inputs is a raster deo can read (SOURCE.md, notes.txt)")
    assert result.exit_code == 1 and not out.exists()
    # a missing path among several is a mistake, not something to skip
    scene = make_raster("a.tif", np.full((3, 8, 8), 900, np.uint16), descriptions=["B04", "B03", "B02"])
    result, lines = run(["inspect", str(scene), str(tmp_path / "b.tif"), str(notes), "-o", str(out)])
    assert (
        result.exit_code == 1 and lines[-1].startswith("error: input") and "b.tif does not exist" in lines[-1]
    )
    assert not out.exists()


def test_a_folder_of_scene_folders_says_so(shared_data):
    folder = shared_data / "bigearthnet_s2_example"
    result, lines = run(["inspect", str(folder)])
    assert_one_line_error(
        result, lines, 1, "holds the bands of several scenes", "6 folders", "bigearthnet_s2_example/*"
    )
    result, lines = run(["inspect", f"{folder}/*"])  # quoted: one scene's band files, not folders
    assert_one_line_error(
        result, lines, 1, "matches 6 folder(s) but no raster files", "leave the pattern unquoted"
    )
