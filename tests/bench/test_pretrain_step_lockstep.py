"""``benchmarks/pretrain_step.py``'s step timing and its ``--lockstep`` protocol, without models:
the official loop's batches are timed per step with the warm-up left out, a gated child says
READY before its first timed step, waits for ``go`` before each, reports DONE after each, and
winds down only after ``end``; the paired ratio is each deo step over the official step beside it."""

import importlib.util
import io
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "deo_bench_pretrain_step", ROOT / "benchmarks" / "pretrain_step.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _consume(loader, work_s: float) -> int:
    seen = 0
    for _ in loader:
        time.sleep(work_s)
        seen += 1
    return seen


def test_timed_batches_time_each_step_and_leave_out_the_warmup(bench):
    loader = bench.TimedBatches("batch", n=5, warmup=2)
    assert _consume(loader, 0.02) == 5
    wall, cpu = loader.times()
    assert len(wall) == len(cpu) == 3
    assert all(0.02 <= t < 0.5 for t in wall)
    assert all(c < 0.02 for c in cpu)  # sleeping is not CPU time


def test_gated_child_speaks_the_lockstep_protocol(bench, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("go\ngo\nend\n"))
    monkeypatch.setattr(sys, "__stdout__", out)
    loader = bench.TimedBatches("batch", n=3, warmup=1, gate=bench.Gate(True, steps=2))
    assert _consume(loader, 0.01) == 3
    lines = out.getvalue().splitlines()
    assert lines[0] == "READY"
    assert [ln.split()[0] for ln in lines[1:]] == ["DONE", "DONE"]
    reported = [float(ln.split()[1]) for ln in lines[1:]]
    assert reported == pytest.approx(loader.times()[0], abs=1e-5)
    assert sys.stdin.read() == ""  # 'end' consumed after the last step


def test_gate_refuses_an_unexpected_word(bench, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("stop\n"))
    monkeypatch.setattr(sys, "__stdout__", io.StringIO())
    with pytest.raises(SystemExit, match="expected 'go'"):
        bench.Gate(True, steps=1).before_step(0)


def test_gate_off_and_warmup_steps_do_nothing(bench, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    out = io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", out)
    bench.Gate(False, steps=2).before_step(0)
    bench.Gate(True, steps=2).before_step(-1)
    bench.Gate(True, steps=2).after_step(-1, 1.0)
    assert out.getvalue() == ""


def test_paired_ratio_is_each_deo_step_over_the_official_one_beside_it(bench):
    runs = {
        "deo": [{"step_s_all": [4.0, 5.0, 6.0]}],
        "official": [{"step_s_all": [5.0, 5.0, 4.0]}],
    }
    paired = bench._paired(runs)
    assert paired["ratio_paired_all"] == [0.8, 1.0, 1.5]
    assert paired["ratio_paired_median"] == 1.0
