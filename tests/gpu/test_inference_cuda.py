"""embed, segment predict and detect-change on a CUDA GPU equal the same run on the CPU in fp32.

Every run goes through the public entry point (``run_embed``, ``run_segment_predict``,
``run_detect_change``) with the recipe's ``runtime.device`` and ``runtime.precision``, DataLoader
workers as ``--device cuda`` picks them (``auto``: two, pinned memory), on the tiny random Swin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deo_cli.recipes import ChangeRecipe, EmbedRecipe, SegmentPredictRecipe, build_recipe
from deo_cli.tasks.change.predict import run_detect_change
from deo_cli.tasks.embed.predict import run_embed
from deo_cli.tasks.segment.predict import run_segment_predict
from tests.gpu.helpers import (
    AGREE_CONFIDENT,
    CONFIDENT,
    PRECISIONS,
    TOL,
    agreement,
    read,
    relative_error,
    vector_cosine,
    write_scenes,
    write_segment_head,
)

pytestmark = pytest.mark.gpu

TINY = ["model.name=deo_swin_test", "model.weights=random"]
TILING = ["tiling.chip_size=96", "tiling.overlap=32", "runtime.batch_size=8"]


def _runtime(device: str, precision: str) -> list[str]:
    workers = "0" if device == "cpu" else "auto"
    return [f"runtime.device={device}", f"runtime.precision={precision}", f"runtime.num_workers={workers}"]


def embed(scene, out, device: str, precision: str):
    recipe = build_recipe(EmbedRecipe, sets=[*TINY, *TILING, *_runtime(device, precision)])
    (res,) = run_embed([str(scene)], out, recipe)
    assert res.status == "written", res.error
    return res


def segment(scene, head, out, device: str, precision: str):
    recipe = build_recipe(SegmentPredictRecipe, sets=[*TILING, *_runtime(device, precision)])
    probs = out.with_name(out.stem + "_probabilities.tif")
    (res,) = run_segment_predict([str(scene)], out, head, recipe, probabilities=probs)
    assert res.error is None, res.error
    return out, probs


def change(before, after, out, device: str, precision: str):
    recipe = build_recipe(ChangeRecipe, sets=[*TINY, *TILING, *_runtime(device, precision)])
    return run_detect_change(str(before), str(after), out, recipe)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def cpu_runs(scenes, tmp_path_factory):
    """The CPU fp32 references, once for every precision."""
    folder = tmp_path_factory.mktemp("cpu")
    before, after = scenes
    embed(before, folder / "emb.tif", "cpu", "fp32")
    head = write_segment_head(folder / "head.pt", before)
    segment(before, head, folder / "seg.tif", "cpu", "fp32")
    res = change(before, after, folder / "change.tif", "cpu", "fp32")
    return {"folder": folder, "head": head, "change": res}


def compare_embeddings(ref_path, got_path, precision: str) -> dict:
    ref, ref_facts = read(ref_path)
    got, got_facts = read(got_path)
    assert got_facts == ref_facts
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))  # the same nodata
    cos = vector_cosine(ref, got)
    tol = TOL[precision]
    numbers = {
        "cos_p001": float(np.percentile(cos, 0.1)),
        "cos_mean": float(cos.mean()),
        "rel": relative_error(ref, got),
    }
    assert numbers["cos_p001"] >= tol["cos_p001"], numbers
    assert numbers["cos_mean"] >= tol["cos_mean"], numbers
    assert numbers["rel"] <= tol["rel"], numbers
    return numbers


def compare_segmentation(ref_paths, got_paths, precision: str) -> dict:
    (ref_cls, ref_facts), (got_cls, got_facts) = read(ref_paths[0]), read(got_paths[0])
    (ref_p, _), (got_p, _) = read(ref_paths[1]), read(got_paths[1])
    assert got_facts == ref_facts
    assert len(np.unique(ref_cls[np.isfinite(ref_cls)])) >= 2  # a map, not one class everywhere
    tol = TOL[precision]
    top2 = np.sort(np.nan_to_num(ref_p, nan=0.0), axis=0)
    confident = top2[-1] - top2[-2] >= CONFIDENT
    numbers = {
        "agree": agreement(np.nan_to_num(ref_cls, nan=-1), np.nan_to_num(got_cls, nan=-1)),
        "agree_confident": agreement(ref_cls[0][confident], got_cls[0][confident]),
        "confident_share": float(confident.mean()),
        "mad": float(np.nanmean(np.abs(ref_p - got_p))),
    }
    assert numbers["confident_share"] > 0.5, numbers
    assert numbers["agree"] >= tol["agree"], numbers
    assert numbers["agree_confident"] >= AGREE_CONFIDENT, numbers
    assert numbers["mad"] <= tol["mad"], numbers
    return numbers


def compare_change(ref, got, precision: str) -> dict:
    (ref_s, ref_facts), (got_s, got_facts) = read(ref.output), read(got.output)
    (ref_m, _), (got_m, _) = read(ref.mask), read(got.mask)
    assert got_facts == ref_facts
    np.testing.assert_array_equal(np.isnan(got_s), np.isnan(ref_s))
    tol = TOL[precision]
    spread = float(np.nanmax(ref_s) - np.nanmin(ref_s))
    numbers = {
        "agree": agreement(np.nan_to_num(ref_m, nan=-1), np.nan_to_num(got_m, nan=-1)),
        "mad": float(np.nanmean(np.abs(ref_s - got_s))) / spread,
        "threshold": (ref.threshold.value, got.threshold.value),
    }
    assert 0.0 < ref.changed_fraction < 0.5  # the planted block, not everything
    assert numbers["agree"] >= tol["agree"], numbers
    assert numbers["mad"] <= tol["mad"], numbers
    return numbers


@pytest.mark.parametrize("precision", PRECISIONS)
def test_embed_on_cuda_equals_cpu_fp32(scenes, cpu_runs, tmp_path, precision):
    out = tmp_path / "emb.tif"
    res = embed(scenes[0], out, "cuda", precision)
    assert res.chips > 1
    compare_embeddings(cpu_runs["folder"] / "emb.tif", out, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_segment_on_cuda_equals_cpu_fp32(scenes, cpu_runs, tmp_path, precision):
    got = segment(scenes[0], cpu_runs["head"], tmp_path / "seg.tif", "cuda", precision)
    folder = cpu_runs["folder"]
    compare_segmentation((folder / "seg.tif", folder / "seg_probabilities.tif"), got, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_detect_change_on_cuda_equals_cpu_fp32(scenes, cpu_runs, tmp_path, precision):
    got = change(*scenes, tmp_path / "change.tif", "cuda", precision)
    compare_change(cpu_runs["change"], got, precision)


def test_embed_gpus_n_equals_one_process(scenes, tmp_path):
    """``deo embed --gpus N`` with N = every visible GPU (ranks on NCCL when N > 1) writes the
    raster of one process."""
    from typer.testing import CliRunner

    from deo_cli.cli.app import app

    n = torch.cuda.device_count()
    common = ["embed", str(scenes[0]), "--model", "deo_swin_test", "--weights", "random"]
    common += ["--device", "cuda", "--precision", "fp32", "--chip-size", "96", "--overlap", "32"]
    runner = CliRunner()
    one, many = tmp_path / "one.tif", tmp_path / "many.tif"
    r1 = runner.invoke(app, [*common, "-o", str(one), "--gpus", "1"])
    assert r1.exit_code == 0, r1.output
    rn = runner.invoke(app, [*common, "-o", str(many), "--gpus", str(n)])
    assert rn.exit_code == 0, rn.output
    a, fa = read(one)
    b, fb = read(many)
    assert fa == fb
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
