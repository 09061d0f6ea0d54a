"""Every user mistake: a non-zero exit, one line naming the problem and the fix, no output left."""

import numpy as np
import pytest
from typer.testing import CliRunner

from deo_cli.cli.app import app
from tests.cli.helpers import assert_one_line_error, run

runner = CliRunner()


@pytest.fixture
def scene(make_raster):
    return make_raster("scene.tif", np.full((3, 8, 8), 1000, np.uint16), descriptions=["B04", "B03", "B02"])


def test_missing_file(tmp_path):
    out = tmp_path / "report.json"
    result, lines = run(["inspect", str(tmp_path / "missing.tif"), "-o", str(out)])
    assert_one_line_error(result, lines, 1, "missing.tif does not exist", "Check the path")
    assert list(tmp_path.iterdir()) == []


def test_unreadable_raster(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster at all")
    out = tmp_path / "report.json"
    result, lines = run(["inspect", str(bad), "-o", str(out)])
    assert_one_line_error(result, lines, 1, "cannot read", "bad.tif", "GeoTIFF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tif"]


def test_missing_band(scene, tmp_path):
    out = tmp_path / "report.json"
    result, lines = run(["inspect", str(scene), "--bands", "S2", "-o", str(out)])
    assert_one_line_error(
        result, lines, 1, "lacks band(s) B05, B06, B07, B08, B8A, B11, B12", "(it has B04, B03, B02)"
    )
    assert not out.exists()


def test_output_exists_without_overwrite(scene, tmp_path):
    out = tmp_path / "report.json"
    out.write_text("keep me")
    result, lines = run(["inspect", str(scene), "-o", str(out)])
    assert_one_line_error(result, lines, 1, "already exists", "--overwrite")
    assert out.read_text() == "keep me"
    result = runner.invoke(app, ["inspect", str(scene), "-o", str(out), "--overwrite"])
    assert result.exit_code == 0 and '"B04"' in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "scene.tif"]


def test_bad_recipe_key(scene, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tiling:\n  chip_sise: 128\n")
    out = tmp_path / "emb.tif"
    result, lines = run(["embed", str(scene), "-o", str(out), "--recipe", str(recipe)])
    assert_one_line_error(
        result, lines, 2, "unknown recipe key 'tiling.chip_sise'", "Did you mean 'tiling.chip_size'?"
    )
    assert not out.exists()
    result, lines = run(["embed", str(scene), "-o", str(out), "--set", "output.dtype=float33"])
    assert_one_line_error(result, lines, 2, "'output.dtype' must be one of")


def test_no_crs_reported_not_fatal_for_inspect(make_raster):
    path = make_raster("nocrs.tif", np.ones((1, 4, 4), np.uint16), crs=None, descriptions=["B04"])
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0 and '"crs": null' in result.output


def test_verbose_adds_traceback(tmp_path):
    result = runner.invoke(app, ["-v", "inspect", str(tmp_path / "missing.tif")])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "error: input" in result.stderr


def test_output_folder_blocked_by_a_file(scene, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    result, lines = run(["embed", str(scene), "-o", str(tmp_path / "out" / "emb.tif")])
    assert_one_line_error(result, lines, 1, "cannot create the output folder", "a file is in the way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "scene.tif"]


@pytest.mark.parametrize(
    "code, needles",
    [
        (28, ("No space left on device", "emb.tif", "Free some space")),  # ENOSPC
        (13, ("Permission denied", "emb.tif", "Check the permissions of that file")),  # EACCES
    ],
)
def test_full_disk_or_refused_permission_is_one_line(scene, tmp_path, monkeypatch, code, needles):
    import errno
    import os

    import deo_cli.tasks.embed.predict as embed

    assert code in (errno.ENOSPC, errno.EACCES)
    out = tmp_path / "emb.tif"

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(out))

    monkeypatch.setattr(embed, "run_embed", refuse)
    result, lines = run(["embed", str(scene), "-o", str(out)])
    assert_one_line_error(result, lines, 1, *needles)


def test_other_os_errors_keep_their_traceback(scene, tmp_path, monkeypatch):
    import deo_cli.tasks.embed.predict as embed

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(embed, "run_embed", broken)
    result = runner.invoke(app, ["embed", str(scene), "-o", str(tmp_path / "emb.tif")])
    assert result.exit_code == 1 and isinstance(result.exception, OSError)


def test_global_flags_after_the_command(tmp_path):
    from deo_cli.cli.common import hoist_global_flags

    assert hoist_global_flags(["embed", "a.tif", "-o", "e.tif", "-v"]) == [
        "-v",
        "embed",
        "a.tif",
        "-o",
        "e.tif",
    ]
    assert hoist_global_flags(["pretrain", "export", "r", "-q", "--", "-v"]) == [
        "-q",
        "pretrain",
        "export",
        "r",
        "--",
        "-v",
    ]
    assert hoist_global_flags(["-v", "embed", "a.tif"]) == ["-v", "embed", "a.tif"]
    assert hoist_global_flags([]) == []
    # -v after the command: the traceback before the one line; -q after it: no INFO lines
    missing = str(tmp_path / "missing.tif")
    result = runner.invoke(app, ["inspect", missing, "-v"])
    assert result.exit_code == 1 and "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: input")
    result, lines = run(["inspect", missing, "-q"])
    assert_one_line_error(result, lines, 1, "missing.tif does not exist")
