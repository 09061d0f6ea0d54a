"""deo's training step against the official DEO-FM ``train_one_epoch`` (skipped unless
``DEO_FM_ROOT`` names a checkout of https://github.com/wolfilip/DEO-FM; nothing of it is in this
repository). ``benchmarks/official_step.py`` runs both on the same weights and crops at a tiny size,
stochastic depth off, in a child process (the official code is imported from that path)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not os.environ.get("DEO_FM_ROOT"), reason="DEO_FM_ROOT not set")


def test_one_step_computes_the_official_losses():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "official_step.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT ") :])
    deo, official = r["deo"], r["official"]
    for term in ("compression", "coding_rate", "distill_cls", "total"):
        assert deo[term] == pytest.approx(official[term], abs=2e-6), term
    patch = (deo["distill_patch_mid"] + deo["distill_patch_late"]) / 2
    assert patch == pytest.approx(official["distill_patch_mean"], abs=2e-6)
    # AdamW's first step moves every weight by about lr whatever the gradient's size, so weights whose
    # gradients are ~0 may move differently; most of the student must land on the same numbers
    assert r["student_max_abs_diff_after_step"] <= 2.01 * r["lr"]
    assert r["ema_max_abs_diff_after_step"] <= 2.01 * r["lr"] * (1 - 0.996) + 1e-6
