"""`deo bench download` through the CLI against a local mirror on 127.0.0.1 (no real network)."""

from typer.testing import CliRunner

from deo_cli.cli.app import app
from deo_cli.data.geobench import open_task
from tests.bench.test_download import mirror  # noqa: F401  (fixture)

runner = CliRunner()


def test_cli_download_then_rerun_is_a_no_op(mirror, tmp_path):  # noqa: F811
    server, _ = mirror
    dest = tmp_path / "gb"
    r = runner.invoke(
        app, ["-q", "bench", "download", "--suite", "geobench", "--dest", str(dest), "--source", server.url]
    )
    assert r.exit_code == 0, r.output
    assert "3 file(s) fetched" in r.output
    assert open_task("m-brick-kiln", root=dest).kind == "classification"
    r = runner.invoke(app, ["-q", "bench", "download", "--dest", str(dest), "--source", server.url])
    assert r.exit_code == 0 and "0 file(s) fetched" in r.output


def test_cli_download_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("GEO_BENCH_DIR", raising=False)
    r = runner.invoke(app, ["bench", "download"])
    assert r.exit_code == 1 and r.stderr.startswith("error: no destination for GEO-Bench")
    r = runner.invoke(app, ["bench", "download", "--suite", "imagenet", "--dest", str(tmp_path)])
    assert r.exit_code == 2 and "knows no suite 'imagenet'" in r.stderr
