"""The three example lines of deo's design, as a user types them, with the built-in defaults.

No ``--recipe``: the default model (DEO Swin-B) with its default weights (the official file,
found in the workspace's Hugging Face cache), the paper's pretraining recipe, the paper's
GEO-Bench protocol. They go through the README test's substitutions (sizes capped with
``--limit``, steps and crop sizes; ``--gpus N`` as two CPU processes with gloo), so a line that is
also in the README runs once for both tests. Each test checks what the line wrote.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from deo_cli.models.registry import DEO_SWIN_B_WEIGHTS
from tests.docs.readme import Command, adapt

pytestmark = pytest.mark.slow


def run_ok(workspace, name: str, line: str):
    text, _, _ = adapt(Command(0, line), workspace.ctx)
    folder, proc = workspace.run_once(text, name, 900)
    assert proc.returncode == 0, f"{text}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return folder, proc


def test_deo_embed_scene_tif_o_emb_tif(workspace):
    folder, _ = run_ok(workspace, "design-embed", "deo embed scene.tif -o emb.tif")
    with rasterio.open(folder / "scene.tif") as src, rasterio.open(folder / "emb.tif") as emb:
        assert emb.crs == src.crs
        assert emb.transform == src.transform * Affine.scale(16)  # stage 3 of Swin-B: stride 16
        assert (emb.width, emb.height) == (-(-src.width // 16), -(-src.height // 16))
        assert emb.count == 512 and emb.descriptions[0] == "emb_0000"
        tags = emb.tags()
        data = emb.read()
    assert tags["DEO_MODEL"] == "deo_swin_b" and DEO_SWIN_B_WEIGHTS in tags["DEO_WEIGHTS"]
    assert len(json.loads(tags["DEO_BAND_MANIFEST"])["bands"]) == 10
    # the scene's nodata block (top-left corner) is nodata in the embedding; the rest is features
    assert np.isnan(data[:, 0, 0]).all()
    assert np.isfinite(data).mean() > 0.9 and np.nanstd(data) > 0
    assert (folder / "emb.recipe.yaml").is_file()


def test_deo_bench_suite_geobench(workspace):
    folder, proc = run_ok(workspace, "design-bench", "deo bench --suite geobench")
    (res,) = (folder / "bench-results").glob("geobench-*")
    with open(res / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_task = {r["dataset"]: r for r in rows}
    assert "m-brick-kiln" in by_task  # the fixture in $GEO_BENCH_DIR
    for r in rows:
        assert r["model"] == "deo_swin_b" and r["limit"] == "8" and 0.0 <= float(r["value"]) <= 1.0
        assert r["protocol"] in ("linear", "upernet")  # the paper's protocol per task kind
    assert (res / "results_and_parameters.csv").is_file()
    assert "GEO-Bench tasks are not under" in " ".join(proc.stderr.split())


def test_deo_pretrain_bands_s2_gpus_2(workspace):
    folder, _ = run_ok(workspace, "design-pretrain",
                       "deo pretrain --bands S2 --gpus 8 --data fmow_sentinel.csv --out runs/deo-b")  # fmt: skip
    run = folder / "runs" / "deo-b"
    ckpt = sorted(run.glob("checkpoint-*.pt"))[0]  # the first (the README's --resume adds one)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    recipe = state["recipe"]
    assert state["step"] == 1 and recipe["gpus"] == 2 and recipe["device"] == "cpu"
    # the paper's recipe: only the capped sizes differ from it
    assert recipe["model"]["name"] == "deo_swin_b" and recipe["crops"]["global_number"] == 2
    assert recipe["optim"]["lr"] == pytest.approx(5e-4) and recipe["epochs"] == 100
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
