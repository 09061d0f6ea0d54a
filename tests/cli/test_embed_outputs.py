"""``deo embed`` outputs keep the README's promises: one line and nothing left behind on every
refusal or failure, one run per output, Ctrl-C that says what it kept, values that are used as
asked (or refused), and float16 files that are the same bytes on every run."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from deo_cli.io.atomic import lock_path_for, output_lock
from tests.cli.helpers import assert_one_line_error, run
from tests.infer.helpers import S2_BANDS, assert_valid_cog, smooth_scene

FAST = ["--model", "deo_swin_test", "--weights", "random", "--num-workers", "0"]


@pytest.fixture
def scene(make_raster):
    return make_raster("s.tif", smooth_scene(80, 70), descriptions=S2_BANDS)


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_interrupted(result, lines, *needles):
    """Exit 130, exactly one ``error:`` line (the last) holding every needle, no traceback."""
    assert result.exit_code == 130, (result.exit_code, result.output)
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    for n in needles:
        assert n in errors[0], errors[0]
    assert "Traceback" not in result.output


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- one line, nothing written -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,extra,needles",
    [
        (
            "e.tif",
            ["--pool", "mean"],
            ["-o e.tif has the extension .tif", "GeoParquet (--pool mean)", "e.parquet"],
        ),
        ("e.zarr", ["--pool", "cls"], ["extension .zarr", "GeoParquet (--pool cls)", "e.parquet"]),
        ("e.xyz", [], ["-o e.xyz has the extension .xyz", "a COG (GeoTIFF)", "Use -o", "e.tif"]),
        ("e.parquet", ["--set", "output.format=zarr"], ["output.format zarr", "e.zarr"]),
    ],
)
def test_an_extension_that_does_not_match_the_format_is_refused(scene, tmp_path, name, extra, needles):
    result, lines = run(["embed", str(scene), "-o", str(tmp_path / name), *FAST, *extra])
    assert_one_line_error(result, lines, 2, *needles)
    assert left_in(tmp_path) == ["s.tif"]


def test_absurd_chip_size_is_refused_before_anything_is_allocated(scene, tmp_path):
    result, lines = run(["embed", str(scene), "-o", str(tmp_path / "e.tif"), *FAST, "--chip-size", "100000"])
    assert_one_line_error(
        result,
        lines,
        2,
        "--chip-size 100000 needs",
        "TB of memory for one batch of 16 chips",
        "Use --chip-size",
    )
    assert left_in(tmp_path) == ["s.tif"]
    # the size it suggests is a multiple of the stride and is accepted
    largest = int(lines[0].split("Use --chip-size ")[1].split()[0])
    assert largest % 16 == 0 and largest >= 64
    result, lines = run(["embed", str(scene), "-o", str(tmp_path / "e.tif"), *FAST, "--chip-size", "100"])
    assert_one_line_error(
        result, lines, 2, "--chip-size 100 is not a multiple of the feature stride 16", "112"
    )


def test_chip_memory_rule():
    from deo_cli.errors import UsageError
    from deo_cli.infer.tiling import check_chip_memory

    gb = 10**9
    check_chip_memory(224, 16, 10, 16, 224, memory=8 * gb)  # 58 MB: fine
    with pytest.raises(UsageError, match=r"needs 400 GB .* this machine's 8 GB") as err:
        check_chip_memory(100_000, 0, 10, 16, 224, memory=8 * gb)
    # the largest allowed chip fits a quarter of the memory
    largest = int(err.value.fix.split("--chip-size ")[1].split()[0])
    check_chip_memory(largest, 0, 10, 16, memory=8 * gb)
    with pytest.raises(UsageError):
        check_chip_memory(largest + 16, 0, 10, 16, memory=8 * gb)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_folder_where_no_file_can_be_made_is_one_line(scene):
    result, lines = run(["embed", str(scene), "-o", "/proc/e.tif", *FAST])
    assert_one_line_error(result, lines, 1, "cannot create files in /proc", "output folder you can write to")


class FailAfterFirstBlock:
    """A sink that writes the first row block, then raises ``error`` (a crash or Ctrl-C)."""

    def __init__(self, sink, error, blocks=1):
        self._sink, self._error, self._left = sink, error, blocks

    def __getattr__(self, name):
        return getattr(self._sink, name)

    def write_rows(self, row0, data):
        if self._left == 0:
            raise self._error
        self._left -= 1
        self._sink.write_rows(row0, data)


def failing_run_dense(monkeypatch, error, blocks=1):
    import deo_cli.tasks.embed.scene as embed

    real = embed.run_dense

    def run_dense(reader, model, sink, **kw):
        return real(reader, model, FailAfterFirstBlock(sink, error, blocks), **kw)

    monkeypatch.setattr(embed, "run_dense", run_dense)


def test_a_failure_during_the_run_removes_its_temporaries(make_raster, tmp_path, monkeypatch):
    path = make_raster("s.tif", smooth_scene(400, 300), descriptions=S2_BANDS)  # 25 output rows
    failing_run_dense(monkeypatch, RuntimeError("boom"))  # after the first 16
    result, _ = run(["embed", str(path), "-o", str(tmp_path / "e.tif"), *FAST])
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert left_in(tmp_path) == ["s.tif"]  # no .e.partial.*, no lock


# -- Ctrl-C -------------------------------------------------------------------------------------


def test_ctrl_c_keeps_finished_rows_for_resume_and_says_where(make_raster, tmp_path, monkeypatch):
    path = make_raster("s.tif", smooth_scene(400, 300), descriptions=S2_BANDS)  # 25 output rows
    out = tmp_path / "e.tif"
    failing_run_dense(monkeypatch, KeyboardInterrupt())
    result, lines = run(["embed", str(path), "-o", str(out), *FAST])
    partial = tmp_path / ".e.partial.tif"
    assert_interrupted(
        result,
        lines,
        "interrupted. The rows finished so far are kept",
        f"--resume in {partial};",
        "with --resume",
    )
    assert left_in(tmp_path) == [".e.partial.json", ".e.partial.tif", "s.tif"]
    assert json.loads((tmp_path / ".e.partial.json").read_text())["rows_done"] == 16
    monkeypatch.undo()
    result, _ = run(["embed", str(path), "-o", str(out), *FAST, "--resume"])
    assert result.exit_code == 0, result.output
    assert left_in(tmp_path) == ["e.recipe.yaml", "e.tif", "s.tif"]
    result, _ = run(["embed", str(path), "-o", str(tmp_path / "whole.tif"), *FAST])
    with rasterio.open(out) as a, rasterio.open(tmp_path / "whole.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_ctrl_c_before_any_row_removes_everything_and_says_so(scene, tmp_path, monkeypatch):
    failing_run_dense(monkeypatch, KeyboardInterrupt(), blocks=0)
    result, lines = run(["embed", str(scene), "-o", str(tmp_path / "e.tif"), *FAST])
    assert_interrupted(result, lines, "interrupted. Unfinished outputs were removed")
    assert left_in(tmp_path) == ["s.tif"]


# -- one run per output -------------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys, time
    from deo_cli.io.atomic import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()
    """
)


def test_a_second_run_on_a_locked_output_stops_with_one_line_naming_the_holder(scene, tmp_path):
    out = tmp_path / "e.tif"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        result, lines = run(["embed", str(scene), "-o", str(out), *FAST, "--resume"])
        assert_one_line_error(
            result,
            lines,
            1,
            f"{out} is being written by another deo run (PID {holder.pid} on {socket.gethostname()} since ",
            "Wait for that run to finish",
        )
        assert left_in(tmp_path) == [".e.tif.lock", "s.tif"]  # the holder's lock, nothing of ours
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0 and left_in(tmp_path) == ["s.tif"]  # released and removed


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(scene, tmp_path):
    out = tmp_path / "e.tif"
    pid = dead_pid()
    lock_path_for(out).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "earlier"}))
    result, lines = run(["embed", str(scene), "-o", str(out), *FAST])
    assert result.exit_code == 0, result.output
    text = " ".join(" ".join(ln.split()) for ln in lines)  # rich wraps log lines
    assert f"taking over the lock of e.tif from a run that ended without releasing it (PID {pid}" in text
    assert left_in(tmp_path) == ["e.recipe.yaml", "e.tif", "s.tif"]


def test_output_lock_in_process(tmp_path):
    from deo_cli.errors import OutputLockedError

    out = tmp_path / "x.tif"
    with output_lock(out) as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["since"]
        with pytest.raises(OutputLockedError, match=f"PID {os.getpid()}"):
            with output_lock(out):
                pass
        assert lock.exists()
    assert not lock.exists()


# -- temporaries of a killed run ----------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_temporaries_of_a_killed_run_are_removed(scene, tmp_path, flag):
    out = tmp_path / "e.tif"
    if flag == "--overwrite":
        out.write_text("an old output")
    pid = dead_pid()
    stale = [f".e.cog-{pid}.tif", f".e.pyramid-{pid}.tif.ovr1.tif", f".e.pyramid-{pid}.tif.ovr1.json"]
    stale += [f".e.src-{pid}.vrt", f".e.recipe.yaml.tmp-{pid}"]
    for name in stale:
        (tmp_path / name).write_bytes(b"x" * 1000)
    other = tmp_path / ".other.cog-1.tif"  # another output's, of a running process (init)
    other.write_text("keep")
    result, _ = run(["embed", str(scene), "-o", str(out), *FAST, flag])
    assert result.exit_code == 0, result.output
    assert left_in(tmp_path) == [".other.cog-1.tif", "e.recipe.yaml", "e.tif", "s.tif"]
    assert_valid_cog(out)
    with rasterio.open(out) as ds:
        assert ds.count == 64 and np.isfinite(ds.read()).all()


# -- nothing changed silently -------------------------------------------------------------------


def test_set_model_is_a_usage_error_with_the_key_meant(scene, tmp_path):
    result, lines = run(
        ["embed", str(scene), "-o", str(tmp_path / "e.tif"), "--set", "model=foo", "--weights", "random"]
    )
    assert_one_line_error(
        result,
        lines,
        2,
        "--set model=foo gives the section 'model'",
        "Did you mean --set model.name=foo or --model foo?",
    )
    result, lines = run(
        ["embed", str(scene), "-o", str(tmp_path / "e.tif"), "--set", "model.name=foo", "--weights", "random"]
    )
    assert_one_line_error(result, lines, 2, "unknown model 'foo'", "deo_swin_b", "deo_vit_s16")
    assert left_in(tmp_path) == ["s.tif"]


@pytest.mark.parametrize("overlap", ["112", "100000", "20"])
def test_impossible_overlap_is_refused_with_the_allowed_range(scene, tmp_path, overlap):
    result, lines = run(["embed", str(scene), "-o", str(tmp_path / "e.tif"), *FAST, "--overlap", overlap])
    assert_one_line_error(
        result, lines, 2, f"--overlap {overlap}", "less than half a chip (32 px)", "Use --overlap 0 to 16"
    )
    assert left_in(tmp_path) == ["s.tif"]


def test_a_rounded_overlap_is_warned_and_recorded_as_used(scene, tmp_path):
    out = tmp_path / "e.tif"
    result, lines = run(["embed", str(scene), "-o", str(out), *FAST, "--overlap", "10"])
    assert result.exit_code == 0, result.output
    assert sum("--overlap 10 rounded up to 16 px" in ln for ln in lines) == 1
    saved = yaml.safe_load((tmp_path / "e.recipe.yaml").read_text())
    assert saved["tiling"]["overlap"] == 16
    with rasterio.open(out) as ds:
        assert json.loads(ds.tags()["DEO_TILING"])["overlap"] == 16


# -- float16 --------------------------------------------------------------------------------------


def test_float16_is_deterministic_half_precision_and_smaller(make_raster, tmp_path):
    path = make_raster("s.tif", smooth_scene(400, 300), descriptions=S2_BANDS)
    outs = {n: tmp_path / f"{n}.tif" for n in ("f32", "h1", "h2")}
    for name, out in outs.items():
        extra = [] if name == "f32" else ["--dtype", "float16"]
        assert run(["embed", str(path), "-o", str(out), *FAST, *extra])[0].exit_code == 0
    assert outs["h1"].read_bytes() == outs["h2"].read_bytes()  # the same bytes on every run
    assert outs["h1"].stat().st_size < 0.7 * outs["f32"].stat().st_size
    with rasterio.open(outs["f32"]) as f, rasterio.open(outs["h1"]) as h:
        ref = f.read()
        # the float32 values rounded to the nearest float16, exactly
        np.testing.assert_array_equal(h.read(), ref.astype(np.float16).astype(np.float32))
        assert h.tags()["DEO_DTYPE"].startswith("float16")
    with rasterio.open(outs["h1"], overview_level=0) as ov:  # overviews: half precision too
        o = ov.read()
        assert np.array_equal(o, o.astype(np.float16).astype(np.float32), equal_nan=True)
    assert_valid_cog(outs["h1"])


# -- the same rules in detect-change and segment predict -----------------------------------------


def test_detect_change_names_locks_and_overlaps(make_raster, tmp_path):
    from tests.cli.test_change import FAST as CHANGE
    from tests.cli.test_change import _pair

    pa, pb = _pair(make_raster)
    out = tmp_path / "c.tif"
    result, lines = run(
        ["detect-change", str(pa), str(pb), "-o", str(out), "--mask", str(tmp_path / "m.png"), *CHANGE]
    )
    assert_one_line_error(result, lines, 2, "--mask m.png has the extension .png", "a COG (GeoTIFF)", "m.tif")
    with output_lock(out):
        result, lines = run(["detect-change", str(pa), str(pb), "-o", str(out), *CHANGE])
        assert_one_line_error(
            result, lines, 1, "c.tif is being written by another deo run", f"PID {os.getpid()}"
        )
    result, lines = run(
        ["detect-change", str(pa), str(pb), "-o", str(out), *CHANGE, "--chip-size", "128", "--overlap", "40"]
    )
    assert_one_line_error(
        result, lines, 2, "--overlap 40 (rounded up to a multiple of 32 px: 64)", "Use --overlap 0 to 32"
    )
    assert left_in(tmp_path) == ["after.tif", "before.tif"]
    result, lines = run(
        ["detect-change", str(pa), str(pb), "-o", str(out), *CHANGE, "--chip-size", "128", "--overlap", "20"]
    )
    assert result.exit_code == 0, result.output
    assert any("--overlap 20 rounded up to 32 px" in ln for ln in lines), lines
    assert yaml.safe_load((tmp_path / "c.recipe.yaml").read_text())["tiling"]["overlap"] == 32
    with rasterio.open(out) as ds:
        assert json.loads(ds.tags()["DEO_TILING"])["overlap"] == 32
