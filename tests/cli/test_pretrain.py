"""`deo pretrain` end to end through the CLI: real Sentinel-2 data, exact resume, two processes, errors."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from deo_cli.cli.app import app
from deo_cli.models import build_encoder, load_encoder
from deo_cli.recipes import RECIPES_DIR

runner = CliRunner()

#: The tiny recipe made smaller still for the resume and multi-process tests.
SMALL = ["--batch-size", "4", "--set", "crops.local_number=2", "--num-workers", "1"]


def deo(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def rows(run, kind="step"):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    if kind == "step":
        return [r for r in lines if "loss" in r]
    return [r for r in lines if r.get("event") == kind]


def one_line_error(result, code, *needles):
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("dataset", ["oscd_subset", "bigearthnet_s2_example"])
def test_tiny_recipe_trains_and_the_loss_falls(shared_data, tmp_path, dataset):
    run = tmp_path / "run"
    result = deo(
        "pretrain", "--recipe", "tiny_cpu", "--data", shared_data / dataset, "--out", run,
        "--max-steps", 10, "--set", "checkpoint_every=100",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "steps       10 of" in result.stdout
    losses = [r["loss"] for r in rows(run)]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses  # the seeded run learns
    start = rows(run, "start")[0]
    assert start["precision"] == "fp32" and start["compile"] is False  # auto: eager fp32 on the CPU
    first = rows(run)[0]
    assert (
        first["lr"] == 0.0
        and first["momentum"] == pytest.approx(0.996)
        and first["wd"] == pytest.approx(0.04)
    )
    assert {"compression", "coding_rate", "distill_cls", "distill_patch_mid", "distill_patch_late"} <= set(
        first
    )

    ckpts = sorted(run.glob("checkpoint-*.pt"))
    assert [p.name for p in ckpts] == ["checkpoint-00000010.pt"]
    ckpt = torch.load(ckpts[0], weights_only=True)
    assert ckpt["deo_format"] == "pretrain-v1" and ckpt["step"] == 10 and ckpt["model"] == "deo_swin_test"
    assert ckpt["recipe"]["teacher"]["weights"] == "random" and ckpt["manifest"]["name"] == "deo-s2-10"
    assert ckpt["data"]["unit"] == "dn" and len(ckpt["rng"]) == 1
    assert (run / "recipe.yaml").read_text().startswith("# deo")

    # Export: loadable with --weights by embed/segment/bench (load_encoder / build_encoder).
    result = deo(
        "pretrain", "export", run, "-o", tmp_path / "model.pt"
    )  # a run folder: its newest checkpoint
    assert result.exit_code == 0, result.output
    assert "checkpoint-00000010.pt" in result.stdout
    exported = load_encoder(tmp_path / "model.pt")
    direct = build_encoder("deo_swin_test", weights=str(ckpts[0]))
    x = torch.randn(1, 10, 32, 32)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(exported(x), direct(x)))


def test_resume_continues_exactly(shared_data, tmp_path):
    data = shared_data / "bigearthnet_s2_example"
    common = ["pretrain", "--recipe", "tiny_cpu", "--data", data, *SMALL, "--set", "checkpoint_every=3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert deo(*common, "--out", straight, "--max-steps", 6).exit_code == 0
    assert deo(*common, "--out", stopped, "--max-steps", 3).exit_code == 0
    again = deo(*common, "--out", stopped, "--max-steps", 4)
    one_line_error(again, 1, "already holds a run", "--resume")
    # Continue from the run folder alone: its recipe.yaml, plus the new stop.
    result = deo("pretrain", "--out", stopped, "--resume", "--max-steps", 6)
    assert result.exit_code == 0, result.output

    a = torch.load(straight / "checkpoint-00000006.pt", weights_only=True)
    b = torch.load(stopped / "checkpoint-00000006.pt", weights_only=True)
    for key in ("student_encoder", "teacher_encoder", "student_heads", "teacher_head_ms"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    for i, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][i]["exp_avg"], state["exp_avg"], rtol=0, atol=1e-6)
    assert [r["loss"] for r in rows(stopped)] == pytest.approx([r["loss"] for r in rows(straight)], abs=1e-6)
    assert [r["event"] for r in rows(stopped, "resume")] == ["resume"]


@pytest.mark.slow
def test_two_processes_see_disjoint_samples_and_agree(shared_data, tmp_path):
    run = tmp_path / "ddp"
    result = deo(
        "pretrain", "--recipe", "tiny_cpu", "--data", shared_data / "bigearthnet_s2_example", "--out", run,
        *SMALL, "--gpus", 2, "--device", "cpu", "--max-steps", 4, "--set", "log_samples=true",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    start = rows(run, "start")[0]
    assert start["world_size"] == 2 and start["global_batch"] == 8
    seen = [r["indices"] for r in rows(run, "samples")]
    assert len(seen) == 4 and all(len(ranks) == 2 and len(ranks[0]) == 4 for ranks in seen)
    rank0 = {i for step in seen for i in step[0]}
    rank1 = {i for step in seen for i in step[1]}
    assert len(rank0) == len(rank1) == 16 and not rank0 & rank1  # one epoch: no sample twice
    digests = rows(run, "end")[0]["rank_param_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both ranks
    assert len(torch.load(run / "checkpoint-00000004.pt", weights_only=True)["rng"]) == 2


# -- validation: one clear line, non-zero exit, nothing written ------------------------------------


def test_unreadable_data_path(tmp_path):
    run = tmp_path / "run"
    one_line_error(
        deo("pretrain", "--recipe", "tiny_cpu", "--data", tmp_path / "nope", "--out", run),
        1,
        "does not exist",
    )
    (tmp_path / "junk.tif").write_text("not a raster")
    one_line_error(
        deo("pretrain", "--recipe", "tiny_cpu", "--data", tmp_path / "junk.tif", "--out", run),
        1,
        "cannot read",
    )
    assert not run.exists()


def test_band_set_the_data_cannot_satisfy(tmp_path, make_raster):
    make_raster("rgb.tif", np.full((3, 32, 32), 900, np.uint16), descriptions=["B04", "B03", "B02"])
    run = tmp_path / "run"
    result = deo(
        "pretrain", "--recipe", "tiny_cpu", "--data", tmp_path / "rgb.tif", "--bands", "S2", "--out", run
    )
    one_line_error(result, 1, "lacks band(s) B05, B06, B07, B08, B8A, B11, B12")
    result = deo(
        "pretrain", "--recipe", "tiny_cpu", "--data", tmp_path / "rgb.tif", "--bands", "RGB", "--out", run
    )
    one_line_error(result, 1, "--bands RGB", "Pass --bands S2")
    assert not run.exists()


def test_recipe_with_an_unknown_key(shared_data, tmp_path):
    run = tmp_path / "run"
    data = shared_data / "bigearthnet_s2_example"
    result = deo("pretrain", "--recipe", "tiny_cpu", "--data", data, "--out", run, "--set", "optim.lrr=1e-3")
    one_line_error(result, 2, "unknown recipe key 'optim.lrr'", "Did you mean 'optim.lr'")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {RECIPES_DIR / 'pretrain' / 'tiny_cpu.yaml'}\ncrops:\n  local_sizes: 8\n")
    one_line_error(
        deo("pretrain", "--recipe", bad, "--data", data, "--out", run),
        2,
        "unknown recipe key 'crops.local_sizes'",
    )
    assert not run.exists()


def test_missing_teacher_weights(shared_data, tmp_path):
    run = tmp_path / "run"
    data = shared_data / "bigearthnet_s2_example"
    result = deo(
        "pretrain",
        "--recipe",
        "tiny_cpu",
        "--data",
        data,
        "--out",
        run,
        "--teacher-weights",
        tmp_path / "t.pt",
    )
    one_line_error(result, 1, "optical teacher: weights file", "--teacher-weights")
    result = deo(
        "pretrain", "--recipe", "tiny_cpu", "--data", data, "--out", run, "--teacher-weights", "default"
    )
    one_line_error(result, 1, "test_dinov3_tiny has no released weights")
    assert not run.exists()


S2_NAMES = ["B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]


def test_data_that_is_all_nodata_stops_before_training(tmp_path, make_raster):
    make_raster("allnodata.tif", np.zeros((10, 48, 48), np.uint16), descriptions=S2_NAMES, nodata=0)
    run = tmp_path / "run"
    result = deo("pretrain", "--recipe", "tiny_cpu", "--data", tmp_path / "allnodata.tif", "--out", run)
    one_line_error(result, 1, "no training window", "allnodata.tif", "every pixel is nodata", "deo inspect")
    assert "worker" not in result.output and not run.exists()
    # chips used whole are judged exactly: 70 % nodata is too much for max_nodata_fraction 0.5
    mostly = np.zeros((10, 48, 48), np.uint16)
    mostly[:, :14] = 1500
    make_raster("mostly.tif", mostly, descriptions=S2_NAMES, nodata=0)
    result = deo("pretrain", "--recipe", "tiny_cpu", "--data", tmp_path / "mostly.tif", "--out", run)
    one_line_error(result, 1, "mostly.tif", "71% of its pixels are nodata", "data.max_nodata_fraction")
    assert not run.exists()


def test_nodata_found_only_in_a_worker_is_one_line_and_keeps_an_existing_run(tmp_path, make_raster):
    # Valid pixels everywhere in the overview, but no 64 px window is more than 25 % valid:
    # only the DataLoader worker finds that out.
    data = np.zeros((10, 160, 160), np.uint16)
    valid = (np.arange(160) % 4 < 2)[:, None] & (np.arange(160) % 4 < 2)[None, :]
    data[:, valid] = 1800
    make_raster("sparse.tif", data, descriptions=S2_NAMES, nodata=0)
    run = tmp_path / "run"
    args = ["pretrain", "--recipe", "tiny_cpu", "--data", tmp_path / "sparse.tif", "--out", run]
    result = deo(*args, "--num-workers", 1)
    one_line_error(result, 1, "found no window with at most 50% nodata", "(in sparse.tif)", "deo inspect")
    assert "worker process" not in result.output and "Original Traceback" not in result.output
    assert not run.exists()  # the run never started: no folder left behind
    # A run folder the user already has is left exactly as it was, even with --overwrite.
    run.mkdir()
    (run / "checkpoint-00000002.pt").write_bytes(b"kept")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    one_line_error(deo(*args, "--num-workers", 1, "--overwrite"), 1, "found no window")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-00000002.pt", "metrics.jsonl"]
    assert (run / "checkpoint-00000002.pt").read_bytes() == b"kept"
