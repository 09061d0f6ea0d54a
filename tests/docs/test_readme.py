"""The README is executed: every command of its shell blocks runs here, in order, and must succeed.

Each command runs with ``bash`` in its own folder of one shared workspace (:mod:`tests.docs.workspace`:
placeholder files from ``../shared/data``, the official weights' file in a local Hugging Face
cache, ``$GEO_BENCH_DIR`` on the brick-kiln fixture, a GEO-Bench mirror on 127.0.0.1), with only
the substitutions :data:`tests.docs.readme.SUBSTITUTIONS` lists; the few commands that cannot run
here are in ``NOT_HERE``/``NEEDS_GPU`` with their reasons. A command passes when it exits 0,
prints no traceback, and every file it names with ``-o``/``--out``/``--preview``/``--polygons``/
``--probabilities`` exists afterwards.
"""

from __future__ import annotations

import re

import pytest

from tests.docs.readme import NEEDS_GPU, NOT_HERE, SUBSTITUTIONS, Command, adapt, outputs, readme_commands

COMMANDS = readme_commands()
TIMEOUT = 600


@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_readme_command_runs(cmd: Command, workspace):
    text, reason, used = adapt(cmd, workspace.ctx)
    if text is None:
        assert reason  # listed in NOT_HERE / NEEDS_GPU with its reason
        return
    folder, proc = workspace.run_once(text, f"L{cmd.line:04d}", TIMEOUT)
    log = f"README line {cmd.line}: {cmd.text}\nran: {text}\nsubstitutions: {used}\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, log
    assert "Traceback" not in proc.stderr, log
    for out in outputs(text):
        assert (folder / out).exists(), f"{out} was not written\n{log}"


def test_the_readme_has_commands_and_each_rule_is_used():
    """The parser finds the README's commands; every substitution and exception still matches
    some command (a rule nothing needs any more must go, so the list stays short and real)."""
    texts = [c.text for c in COMMANDS]
    assert len(texts) >= 25 and any(t.startswith("deo embed") for t in texts)
    for rule in [s.applies for s in SUBSTITUTIONS] + [p for p, _ in NOT_HERE + NEEDS_GPU]:
        assert any(re.search(rule, t) for t in texts), f"no README command matches {rule!r}"


def test_the_parser_joins_continuations_and_drops_comments():
    text = "\n".join(
        [
            "intro",
            "```bash",
            "deo embed a.tif -o 'x # y.tif'   # a comment",
            "torchrun --nnodes 2 \\",
            "  -m deo_cli pretrain --out runs/x",
            "# a comment line",
            "```",
            "```python",
            "not_a_command()",
            "```",
        ]
    )
    got = readme_commands(text)
    assert [(c.line, c.text) for c in got] == [
        (3, "deo embed a.tif -o 'x # y.tif'"),
        (4, "torchrun --nnodes 2 -m deo_cli pretrain --out runs/x"),
    ]
    assert outputs(got[0].text) == ["x # y.tif"] and outputs(got[1].text) == ["runs/x"]
