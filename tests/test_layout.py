"""The import direction of docs/design.md §3, enforced on the source tree.

cli -> train|infer|tasks|bench -> models|losses|data -> io|sensors|recipes|errors.
io/ imports no torch; models/ and losses/ import no rasterio; only cli/ imports typer or rich;
no core module imports cli/; cli/ modules import torch & co. only inside function bodies.
"""

import ast
from pathlib import Path

import deo_cli

PKG = Path(deo_cli.__file__).parent
HEAVY = {
    "torch",
    "torchvision",
    "timm",
    "rasterio",
    "geopandas",
    "xarray",
    "rioxarray",
    "numpy",
    "h5py",
    "pyarrow",
    "zarr",
}


def _imports(path: Path, top_level_only: bool = False):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        area = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        yield path, area


def test_import_direction():
    rank = {
        "cli": 4,
        "train": 3,
        "infer": 3,
        "tasks": 3,
        "bench": 3,
        "models": 2,
        "losses": 2,
        "data": 2,
        "io": 1,
        "sensors": 1,
        "recipes": 1,
        "errors": 0,
        "__init__": 0,
        "__main__": 5,
        "samples": 5,
    }
    problems = []
    for path, area in _modules():
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top in ("typer", "rich", "click") and area not in ("cli",):
                problems.append(f"{path.relative_to(PKG)} imports {mod} (only cli/ may)")
            if area in ("io", "sensors", "recipes", "errors") and top in ("torch", "torchvision", "timm"):
                problems.append(f"{path.relative_to(PKG)} imports {mod} (io/ imports no torch)")
            if area in ("models", "losses") and top in ("rasterio", "geopandas", "rioxarray"):
                problems.append(f"{path.relative_to(PKG)} imports {mod} (models/losses import no rasterio)")
            if mod.startswith("deo_cli."):
                target = mod.split(".")[1]
                if target in rank and area in rank and rank[target] > rank[area] and area != target:
                    problems.append(f"{path.relative_to(PKG)} imports {mod} (against the import direction)")
    assert not problems, "\n".join(problems)


def test_cli_imports_heavy_libraries_only_inside_functions():
    problems = []
    for path in sorted((PKG / "cli").glob("*.py")):
        for mod in _imports(path, top_level_only=True):
            if mod.split(".")[0] in HEAVY:
                problems.append(f"cli/{path.name} imports {mod} at module level")
            if (
                mod.startswith("deo_cli.")
                and mod.split(".")[1] not in ("cli", "errors", "recipes", "__init__")
                and mod != "deo_cli"
            ):
                problems.append(f"cli/{path.name} imports core module {mod} at module level")
    assert not problems, "\n".join(problems)
