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
