"""The documentation is self-contained: every section the code cites exists, nothing points outside.

(a) Every ``docs/method.md §X`` / ``docs/design.md §X`` citation in the package, tests,
benchmarks, recipes, docs, README and CHANGELOG names a heading of that file (both ends of a
range such as ``§2.6-2.8``, and every member of a list such as ``§2.5/§2.13``).
(b) No file of the repository points at documents that are not in it.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("method", "design")
CITING = ("deo_cli/", "tests/", "benchmarks/", "recipes/", "docs/", "README.md", "CHANGELOG.md")
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".json", ".csv", ".ini", ""}

SECTION = r"\d+(?:\.\d+)*"
#: "docs/method.md §2.7", "§2.6-2.8", "§2.2–§2.9", "§2.5/§2.13", "§2.6, §2.9" (also across a line break).
CITATION = re.compile(
    rf"docs/(?P<doc>{'|'.join(DOCS)})\.md\s+(?P<refs>§{SECTION}(?:\s*[-–]\s*§?{SECTION})?"
    rf"(?:\s*(?:/|,|and)\s*§{SECTION}(?:\s*[-–]\s*§?{SECTION})?)*)"
)
REF = re.compile(rf"§({SECTION})(?:\s*[-–]\s*§?({SECTION}))?")
HEADING = re.compile(rf"^#{{1,6}}\s+({SECTION})\.?\s", re.MULTILINE)

# Built by concatenation so that this file does not contain them itself.
FORBIDDEN = (
    "shared/" + "reference",
    "reference/" + "method.md",
    "peers" + ".md",
    "DESIGN" + ".md",
    "STYLE" + ".md",
)


def repo_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (new files are checked before they
    are committed); every file under the repository when git is not available."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [ROOT / p for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
        paths = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in paths if p.is_file())


def headings(doc: str) -> list[str]:
    return HEADING.findall((ROOT / "docs" / f"{doc}.md").read_text(encoding="utf-8"))


def citing_files() -> list[Path]:
    out = []
    for p in repo_files():
        rel = p.relative_to(ROOT).as_posix()
        if p.suffix in TEXT and any(rel == c or rel.startswith(c) for c in CITING):
            out.append(p)
    return out


def citations(text: str):
    """``(doc, section, line)`` for every section a text cites, ranges giving both ends."""
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        for ref in REF.finditer(m.group("refs")):
            for section in filter(None, ref.groups()):
                yield m.group("doc"), section, line


def test_citation_pattern_reads_every_form():
    text = (
        "a docs/method.md §2.7 b docs/method.md §2.6-2.8 c docs/method.md §2.2–§2.9\n"
        "d docs/method.md §2.5/§2.13 e (docs/method.md §2.6, §2.9) f docs/design.md §7.1, habit 1\n"
        "g docs/method.md\n§3.1) h docs/method.md §3.1. i (docs/design.md §2, docs/method.md §1)"
    )
    got = [(d, s) for d, s, _ in citations(text)]
    assert got == [
        ("method", "2.7"),
        ("method", "2.6"),
        ("method", "2.8"),
        ("method", "2.2"),
        ("method", "2.9"),
        ("method", "2.5"),
        ("method", "2.13"),
        ("method", "2.6"),
        ("method", "2.9"),
        ("design", "7.1"),
        ("method", "3.1"),
        ("method", "3.1"),
        ("design", "2"),
        ("method", "1"),
    ]


@pytest.mark.parametrize("doc", DOCS)
def test_headings_are_numbered_once(doc):
    found = headings(doc)
    assert found, f"docs/{doc}.md has no numbered headings"
    dup = sorted({s for s in found if found.count(s) > 1})
    assert not dup, f"docs/{doc}.md numbers these headings twice: {dup}"


def test_the_method_keeps_the_numbering_the_code_relies_on():
    found = set(headings("method"))
    expected = {"1", "2", "3", "3.1", "3.2"} | {f"2.{i}" for i in range(1, 14)}
    assert expected <= found, sorted(expected - found)
    assert {"2", "3", "4"} | {f"7.{i}" for i in range(1, 6)} <= set(headings("design"))


def test_every_cited_section_exists():
    sections = {doc: set(headings(doc)) for doc in DOCS}
    dangling, count = [], 0
    for path in citing_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for doc, section, line in citations(text):
            count += 1
            if section not in sections[doc]:
                dangling.append(f"{path.relative_to(ROOT)}:{line}: docs/{doc}.md §{section}")
    assert count > 100, f"only {count} citations found: is the pattern still right?"
    assert not dangling, "citations of sections that have no heading:\n" + "\n".join(dangling)


def test_nothing_points_outside_the_repository():
    hits = []
    for path in repo_files():
        data = path.read_bytes()
        for word in FORBIDDEN:
            if word.encode() in data:
                rel = path.relative_to(ROOT)
                line = data[: data.index(word.encode())].count(b"\n") + 1
                hits.append(f"{rel}:{line}: {word}")
    assert not hits, "references to documents outside the repository:\n" + "\n".join(hits)
