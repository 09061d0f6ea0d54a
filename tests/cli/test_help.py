"""The command line: six commands, help that never imports torch, exit codes of unbuilt cores."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from deo_cli import __version__
from deo_cli.cli.app import app

COMMANDS = ["inspect", "embed", "pretrain", "segment", "detect-change", "bench"]
runner = CliRunner()


def test_help_lists_the_six_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"deo {__version__}"


@pytest.mark.parametrize(
    "argv",
    [[]]
    + [[c] for c in COMMANDS]
    + [
        ["segment", "train"],
        ["segment", "predict"],
        ["pretrain", "export"],
        ["detect-change", "train"],
        ["bench", "download"],
    ],
)
def test_help_does_not_import_torch(argv):
    code = (
        "import sys\n"
        "from deo_cli.cli.app import app\n"
        "try:\n"
        f"    app({argv + ['--help']!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'timm', 'torchvision', 'rasterio', 'geopandas') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-500:]
    assert "Usage" in out.stdout


def test_python_dash_m_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "deo_cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == f"deo {__version__}"


def test_default_subcommands_route():
    # `deo pretrain --help` is `deo pretrain run --help`; `deo bench download --help` reaches download
    r = runner.invoke(app, ["pretrain", "--help"])
    assert r.exit_code == 0 and "--teacher-weights" in r.output and "pretrain export" in r.output
    r = runner.invoke(app, ["bench", "download", "--help"])
    assert r.exit_code == 0 and "--dest" in r.output
    r = runner.invoke(app, ["detect-change", "--help"])
    assert r.exit_code == 0 and "--polygons" in r.output
