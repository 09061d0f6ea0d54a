"""Every dependency pyproject.toml declares is imported somewhere in deo_cli/ (none is dead weight)."""

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def declared() -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in deps]


def imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "deo_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_every_declared_dependency_is_imported():
    dists = importlib.metadata.packages_distributions()  # import name -> distributions
    used = {dist.lower().replace("_", "-") for mod in imported_modules() for dist in dists.get(mod, [])}
    missing = [d for d in declared() if d.lower().replace("_", "-") not in used]
    assert not missing, f"declared in pyproject.toml but imported nowhere in deo_cli/: {missing}"
