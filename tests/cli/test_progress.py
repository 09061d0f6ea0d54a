from deo_cli.cli.progress import RichProgress
from deo_cli.progress import NullProgress, Progress


def test_progress_implementations_follow_the_protocol(capsys):
    for p in (NullProgress(), RichProgress("chips")):
        assert isinstance(p, Progress)
        p.start(3, "embedding")
        p.advance(1, loss=0.5, lr=1e-4)
        p.advance(2)
        p.finish()
        p.finish()  # idempotent


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _plain(every=30.0):
    import io

    from rich.console import Console

    from deo_cli.cli.progress import PlainProgress

    buf = io.StringIO()
    clock = _Clock()
    return PlainProgress("chips", Console(file=buf, width=60), every=every, clock=clock), buf, clock


def test_plain_progress_prints_a_line_every_interval_with_rate_eta_and_metrics():
    p, buf, clock = _plain()
    p.start(400, "embedding scene.tif")
    clock.t += 10
    p.advance(50)
    assert buf.getvalue() == ""  # not yet 30 s
    clock.t += 30
    p.advance(50, loss=0.25)
    lines = buf.getvalue().splitlines()
    # 100 chips in 40 s: 2.5 chips/s, 300 left -> 2:00; long lines are not wrapped at 60 columns
    assert lines == [
        "embedding scene.tif: 100/400 chips (25 %), 2.5 chips/s, elapsed 0:40, ETA 2:00, loss 0.25"
    ]
    clock.t += 3560
    p.advance(300)
    p.finish()
    assert (
        buf.getvalue().splitlines()[-1]
        == "embedding scene.tif: 400/400 chips, 0.1 chips/s, done in 1:00:00, loss 0.25"
    )
    p.finish()  # idempotent
    assert len(buf.getvalue().splitlines()) == 3


def test_plain_progress_short_task_and_unknown_total():
    p, buf, clock = _plain()
    p.start(9, "a")
    clock.t += 1
    p.advance(9)
    p.finish()
    assert buf.getvalue() == ""  # the command's summary line reports it
    p.start(None, "pretraining")
    clock.t += 31
    p.advance(62)
    assert buf.getvalue().splitlines() == ["pretraining: 62 chips, 2.0 chips/s, elapsed 0:31"]


def test_rich_progress_writes_plain_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    import deo_cli.cli.progress as mod

    clock = _Clock()
    monkeypatch.setattr(mod.time, "monotonic", clock)
    p = RichProgress("steps")
    p.start(10, "pretraining")
    clock.t += 45
    p.advance(5, loss=1.5)
    p.finish()
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "pretraining: 5/10 steps (50 %), 0.1 steps/s, elapsed 0:45, ETA 0:45, loss 1.5",
        "pretraining: 5/10 steps, 0.1 steps/s, done in 0:45, loss 1.5",
    ]
