"""OSCD, both modes, through ``benchmarks/oscd_change.py`` at tiny settings (random weights).

Supervised: trained on bercy, bordeaux and aguasclaras, scored on paris (0.29 % change, so the
trivial "everything changed" F1 is 0.0057) through ``run_detect_change`` with the trained head.
Settings chosen for speed *and* a wide margin: frozen tiny encoder, no augmentation (the head's
inputs are computed once), 12 epochs at lr 3e-3, change weighted by sqrt(no-change / change),
the command's default full-resolution pixel-difference branch and P(change) threshold 0.5.
Measured here: F1 0.072 and 0.128 (13x and 22x the trivial F1) at seeds 0 and 1, 22 s on one
thread. One torch thread: on a 2-core machine shared with other work, two threads took ten
times as long.

Zero-shot at the command's defaults (levels 0-2 on the stride-4 grid, Otsu): F1 0.018 and 0.030
(3x and 5x the trivial F1; stage 3 alone on the stride-16 grid gave 0.0041, below it).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "oscd_change.py"


def _bench():
    spec = importlib.util.spec_from_file_location("oscd_change_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_oscd_both_modes_beat_the_trivial_f1(shared_data, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "oscd.json"
        _bench().main(
            [
                "--data", str(shared_data / "oscd_subset"), "--test-city", "paris",
                "--epochs", "12", "--head-channels", "16", "--lr", "3e-3", "--chip-size", "64",
                "--zero-shot", "default:embedding", "--work", str(tmp_path / "work"), "--out", str(out),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(n)
    result = json.loads(out.read_text())
    assert result["test_city"] == "paris" and sorted(result["train_cities"]) == [
        "aguasclaras",
        "bercy",
        "bordeaux",
    ]
    assert result["weights"] == "random" and result["model"] == "deo_swin_test"
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"supervised", "zero-shot"}
    trivial = result["trivial_f1"]
    assert trivial == pytest.approx(2 * 0.0029 / 1.0029, abs=2e-4)  # paris: 0.29 % change
    for r in rows.values():
        assert {"f1", "iou", "precision", "recall", "threshold", "trivial_f1"} <= set(r)
        assert 0.0 <= r["iou"] <= r["f1"] <= 1.0
        assert r["valid_pixels"] == 408 * 390  # scored on paris's whole 10 m grid
    assert rows["supervised"]["f1"] > 5 * trivial
    assert rows["supervised"]["threshold_method"] == "head"
    assert rows["supervised"]["threshold"] == 0.5  # threshold_shrink 1: the head's trained decision
    # zero-shot at the command's defaults (levels 0-2 on the stride-4 grid, Otsu) beats the trivial F1
    z = rows["zero-shot"]
    assert z["threshold_method"] == "otsu" and z["levels"] == [0, 1, 2] and z["mask_stride"] == 4
    assert z["f1"] > trivial
    # the supervised run left its head and the rasters the command wrote
    work = tmp_path / "work"
    assert (work / "change_head" / "head.pt").exists() and (work / "supervised_mask.tif").exists()
