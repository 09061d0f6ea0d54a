"""Running ``deo`` in-process and checking its one-line errors (shared by the CLI tests)."""

from typer.testing import CliRunner

from deo_cli.cli.app import app

runner = CliRunner()


def run(args):
    """Invoke ``deo ARGS``; return the result and the non-empty lines of its stderr."""
    result = runner.invoke(app, args)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    return result, lines


def assert_one_line_error(result, lines, code, *needles):
    """Exit ``code``, exactly one ``error: ...`` line on stderr holding every needle, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in result.output
