"""The OSCD change-detection data set in its published folder layout (torch-free).

OSCD (Onera Satellite Change Detection; Caye Daudt et al., IGARSS 2018) ships, per city::

    images/<city>/imgs_1/*_B01.tif ... *_B12.tif   first date, 13 single-band S2 L1C files
    images/<city>/imgs_2/*_B01.tif ...             second date
    images/<city>/dates.txt                        "date_1: YYYYMMDD" / "date_2: ..."
    images/train.txt, images/test.txt              the official split (comma-separated cities)
    train_labels/<city>/cm/<city>-cm.tif           change mask (also test_labels/ in the full set)

The label rasters carry no georeference; they are on the first date's 10 m grid. Their values
are 0/1 per the data set's README, but the files in circulation hold **1 = no change,
2 = change** (and the PNG previews 0/255): :func:`read_change_label` maps all three encodings
to 0/1 and refuses anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio

from deo_cli.errors import DataError
from deo_cli.io.raster import Scene, open_scene


@dataclass(frozen=True)
class OscdCity:
    name: str
    before: Path
    after: Path
    label: Path | None
    date_before: str | None
    date_after: str | None


def _dates(path: Path) -> tuple[str | None, str | None]:
    if not path.is_file():
        return None, None
    found = dict(re.findall(r"(date_[12])\s*:\s*(\d{8})", path.read_text()))
    fmt = lambda d: f"{d[:4]}-{d[4:6]}-{d[6:]}" if d else None  # noqa: E731
    return fmt(found.get("date_1")), fmt(found.get("date_2"))


def oscd_root(path: str | Path) -> Path:
    """The OSCD root (the folder holding ``images/``), or a clear error."""
    root = Path(path)
    if (root / "images").is_dir():
        return root
    if root.name == "images" and root.is_dir():
        return root.parent
    raise DataError(
        f"{root} is not an OSCD folder (no images/ inside)",
        "point at the folder that holds images/ and train_labels/ (rcdaudt.github.io/oscd)",
    )


def list_cities(path: str | Path) -> list[OscdCity]:
    """Every city with both dates under ``images/`` (and its label when one exists)."""
    root = oscd_root(path)
    cities = []
    for d in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        if not ((d / "imgs_1").is_dir() and (d / "imgs_2").is_dir()):
            continue
        label = None
        for labels in ("train_labels", "test_labels", "labels"):
            cand = root / labels / d.name / "cm" / f"{d.name}-cm.tif"
            if cand.is_file():
                label = cand
                break
        cities.append(OscdCity(d.name, d / "imgs_1", d / "imgs_2", label, *_dates(d / "dates.txt")))
    if not cities:
        raise DataError(
            f"no OSCD cities under {root / 'images'}", "each city needs imgs_1/ and imgs_2/ folders"
        )
    return cities


def official_split(path: str | Path) -> dict[str, list[str]]:
    """The published train/test city lists (``images/train.txt``, ``images/test.txt``)."""
    root = oscd_root(path)
    out = {}
    for split in ("train", "test"):
        f = root / "images" / f"{split}.txt"
        out[split] = (
            [c.strip() for c in f.read_text().replace("\n", ",").split(",") if c.strip()]
            if f.is_file()
            else []
        )
    return out


def select_cities(cities: list[OscdCity], names: str | list[str] | None) -> list[OscdCity]:
    """The cities named (comma-separated or a list), in that order; unknown names are an error."""
    if names is None:
        return list(cities)
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    by_name = {c.name: c for c in cities}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise DataError(f"OSCD city {', '.join(missing)} not found", f"available: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def open_pair(city: OscdCity, **scene_kw) -> tuple[Scene, Scene]:
    """Both dates as scenes on the first date's grid (the second is resampled onto it if needed)."""
    before = open_scene(city.before, **scene_kw)
    after = open_scene(city.after, grid=before.grid, **scene_kw)
    return before, after


def read_change_label(city: OscdCity, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The change mask as uint8 0 (no change) / 1 (change), checked against ``shape``."""
    if city.label is None:
        raise DataError(
            f"OSCD city {city.name} has no change label", "use a city from train_labels/ (or test_labels/)"
        )
    with rasterio.open(city.label) as ds:
        raw = ds.read(1)
    values = set(np.unique(raw).tolist())
    if values <= {1, 2}:
        lab = (raw == 2).astype(np.uint8)
    elif values <= {0, 1}:
        lab = raw.astype(np.uint8)
    elif values <= {0, 255}:
        lab = (raw == 255).astype(np.uint8)
    else:
        raise DataError(
            f"label {city.label} holds values {sorted(values)[:6]}", "expected 1/2, 0/1 or 0/255 masks"
        )
    if shape is not None and lab.shape != tuple(shape):
        raise DataError(
            f"label {city.label} is {lab.shape} but the image is {tuple(shape)}", "check the city's files"
        )
    return lab
