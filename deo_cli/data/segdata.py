"""Labelled rasters for ``deo segment train``: image/label pairs, class tables, label windows.

Torch-free. What the training chips are made of:

- **Pairs** (:func:`find_pairs`, :func:`read_pairs_csv`): an image raster and a label raster.
  From two folders (or globs) they are matched by file name: the label's stem equals the
  image's, possibly with a suffix such as ``_label``, ``_labels``, ``_mask``, ``_gt`` (and the
  image's ``_image``/``_img``) left out. From a CSV: columns ``image`` and ``label`` and an
  optional ``split`` (``train``, ``val``/``valid``/``validation``, ``test``); relative paths
  are relative to the CSV file.
- **Classes** (:class:`ClassTable`): label values, names and colours, the values to ignore,
  and the value reserved for nodata in the output mask. From a small YAML file
  (``--classes``, :func:`load_class_file`)::

      classes:
        1: {name: cultivated land, color: "#ffff00"}
        2: {name: forest, color: [0, 128, 0]}
        8: built
      ignore_index: 0        # optional: label value left out of loss and metrics
      nodata: 255            # optional: output value for nodata pixels

  ``classes`` maps each label value to a name or to ``{name, color}``, or is a list of
  ``{value, name, color}``; colours are ``"#rrggbb"`` or ``[r, g, b]`` (0-255), and a class
  without one gets the palette's. A file holding only the classes (no ``classes:`` key) works
  too. Any other entry is an error naming it. Without a file, classes come from the values
  found in the label rasters (names ``class_<value>``, colours from a fixed palette). Training
  works on contiguous indices (the order of the table); masks are written with the original
  label values, so a predicted mask reads like the labels it was trained on.
- **Label windows** (:class:`RasterLabels`, :class:`ArrayLabels`): labels read on the
  *image's* grid, with nearest resampling when the label raster's grid differs (a label raster
  without a CRS must have the image's size: it is taken to be on the image's grid, as OSCD's
  are). Pixels outside the label raster, its nodata and ignored values become :data:`IGNORE`.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from deo_cli.errors import DataError, InputNotFoundError, UsageError
from deo_cli.io.grid import Grid

log = logging.getLogger(__name__)

#: Training target for pixels that count in neither loss nor metrics (torch's default).
IGNORE = -100

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
_LABEL_SUFFIXES = ("_labels", "_label", "_mask", "_masks", "_gt", "_lbl", "-label", "-labels", "-mask", "-gt")
_IMAGE_SUFFIXES = ("_image", "_img", "-image", "-img")

#: Default class colours (a qualitative palette), assigned in table order.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)

SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# ---------------------------------------------------------------------------------------------
# Classes
# ---------------------------------------------------------------------------------------------


def parse_color(value, where: str = "colour") -> tuple[int, int, int]:
    """``"#rrggbb"``, ``"rrggbb"`` or ``[r, g, b]`` (0-255) -> an RGB tuple."""
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if re.fullmatch(r"[0-9a-fA-F]{6}", text):
            return tuple(int(text[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    elif isinstance(value, (list, tuple)) and len(value) in (3, 4):
        try:
            rgb = tuple(int(v) for v in value[:3])
        except (TypeError, ValueError):
            rgb = ()
        if len(rgb) == 3 and all(0 <= v <= 255 for v in rgb):
            return rgb  # type: ignore[return-value]
    raise DataError(f"{where} {value!r} is not a colour", 'write "#rrggbb" or [r, g, b] with values 0-255')


def color_hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in rgb[:3])


@dataclass(frozen=True)
class ClassInfo:
    value: int
    name: str
    color: tuple[int, int, int]

    def to_dict(self) -> dict:
        return {"value": self.value, "name": self.name, "color": color_hex(self.color)}


@dataclass(frozen=True)
class ClassTable:
    """Classes in training-index order, label values to ignore, and the output's nodata value."""

    classes: tuple[ClassInfo, ...]
    ignore: tuple[int, ...] = ()
    nodata: int = 255

    def __post_init__(self):
        if not self.classes:
            raise DataError("no classes to train", "check the label rasters or the --classes file")
        values = [c.value for c in self.classes]
        if len(set(values)) != len(values):
            raise DataError(f"class values repeat in {values}", "give each class one value")
        if any(v < 0 for v in values):
            raise DataError("class values must be >= 0", "relabel negative classes")
        if self.nodata in values:
            raise DataError(
                f"the output nodata value {self.nodata} is also a class",
                "set another nodata value in the --classes file",
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(c.value for c in self.classes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def dtype(self) -> str:
        return "uint8" if max(max(self.values), self.nodata) <= 255 else "uint16"

    def lookup(self, max_value: int) -> np.ndarray:
        """An int64 table: label value -> training index (:data:`IGNORE` for anything else)."""
        lut = np.full(max(int(max_value), max(self.values)) + 1, IGNORE, np.int64)
        for i, c in enumerate(self.classes):
            lut[c.value] = i
        for v in self.ignore:
            if 0 <= v < len(lut):
                lut[v] = IGNORE
        return lut

    def encode(self, labels: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Label values -> training indices (int64); unknown, ignored and invalid -> IGNORE."""
        lab = np.asarray(labels)
        out = np.full(lab.shape, IGNORE, np.int64)
        ok = np.isfinite(lab) if np.issubdtype(lab.dtype, np.floating) else np.ones(lab.shape, bool)
        if valid is not None:
            ok &= valid
        ints = np.where(ok, lab, -1).astype(np.int64)
        ok &= ints >= 0
        if ok.any():
            lut = self.lookup(int(ints[ok].max()))
            out[ok] = lut[ints[ok]]
        return out

    def decode(self, index: np.ndarray) -> np.ndarray:
        """Training indices -> label values."""
        return np.asarray(self.values, np.int64)[np.asarray(index)]

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table entries: each class opaque, nodata transparent."""
        cmap = {c.value: (*c.color, 255) for c in self.classes}
        cmap[self.nodata] = (0, 0, 0, 0)
        return cmap

    def to_dict(self) -> dict:
        return {
            "classes": [c.to_dict() for c in self.classes],
            "ignore": list(self.ignore),
            "nodata": self.nodata,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ClassTable:
        classes = tuple(
            ClassInfo(int(c["value"]), str(c["name"]), parse_color(c["color"])) for c in d["classes"]
        )
        return cls(classes, tuple(int(v) for v in d.get("ignore", ())), int(d.get("nodata", 255)))

    @classmethod
    def from_values(
        cls,
        values: Iterable[int],
        ignore: Sequence[int] = (),
        names: Sequence[str] | None = None,
        nodata: int | None = None,
    ) -> ClassTable:
        """Classes for the label ``values`` (sorted; ``ignore`` left out)."""
        vals = sorted({int(v) for v in values} - {int(v) for v in ignore})
        classes = tuple(
            ClassInfo(
                v,
                names[i] if names is not None and i < len(names) else f"class_{v}",
                PALETTE[i % len(PALETTE)],
            )
            for i, v in enumerate(vals)
        )
        return cls(
            classes, tuple(int(v) for v in ignore), _default_nodata(vals) if nodata is None else nodata
        )


def _default_nodata(values: Sequence[int]) -> int:
    if not values or max(values) < 255:
        return 255
    return 65535


#: The --classes file's format, for error messages.
CLASS_FORMS = (
    'write VALUE: NAME, VALUE: {name: NAME, color: "#rrggbb"} or a list of '
    '{value: VALUE, name: NAME, color: "#rrggbb" or [r, g, b]}'
)
_CLASS_KEYS = {"value", "name", "color", "colour"}
_FILE_KEYS = {"classes", "ignore_index", "nodata"}


def _label_value(key, where: str) -> int:
    """A class's label value: a non-negative integer (``"3"`` as written in a quoted key too)."""
    if isinstance(key, str) and re.fullmatch(r"\s*\d+\s*", key):
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise DataError(f"{where}: {key!r} is not a label value (an integer >= 0)", CLASS_FORMS)
    return key


def _class_entry(value, spec, where: str) -> tuple[int, str, object]:
    """(value, name, colour or None) from a class's ``spec``: a name or ``{name, color}``."""
    if isinstance(spec, str) and spec.strip():
        return value, spec.strip(), None
    if isinstance(spec, Mapping):
        unknown = sorted(str(k) for k in spec if k not in _CLASS_KEYS)
        if unknown:
            raise DataError(
                f"{where} has unknown key(s) {', '.join(unknown)} (it may have value, name, color)",
                CLASS_FORMS,
            )
        if "value" in spec and _label_value(spec["value"], where) != value:
            raise DataError(f"{where} says value {spec['value']!r} under key {value}", "write the value once")
        name = spec.get("name", f"class_{value}")
        if not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name).strip():
            raise DataError(f"{where}: name {name!r} is not a class name", CLASS_FORMS)
        if "color" in spec and "colour" in spec:
            raise DataError(f"{where} has both color and colour", "keep one")
        return value, str(name).strip(), spec.get("color", spec.get("colour"))
    raise DataError(f"{where}: {spec!r} is neither a class name nor {{name, color}}", CLASS_FORMS)


def _class_entries(raw, path: Path) -> list[tuple[int, str, object]]:
    """The classes of a ``--classes`` file: a mapping ``value -> name`` or ``value -> {name,
    color}``, or a list of ``{value, name, color}``."""
    items: list[tuple[int, str, object]] = []
    if isinstance(raw, Mapping):
        for key, spec in raw.items():
            where = f"class {key!r} in {path.name}"
            items.append(_class_entry(_label_value(key, where), spec, where))
    elif isinstance(raw, list):
        for i, c in enumerate(raw):
            where = f"class entry {i + 1} ({c!r}) in {path.name}"
            if not isinstance(c, Mapping) or "value" not in c:
                raise DataError(f"{where} has no value", CLASS_FORMS)
            items.append(_class_entry(_label_value(c["value"], where), c, where))
    else:
        raise DataError(f"'classes' in {path.name} is neither a mapping nor a list", CLASS_FORMS)
    if not items:
        raise DataError(f"{path.name} lists no classes", CLASS_FORMS)
    return items


def load_class_file(path: str | os.PathLike, ignore_index: int | None = None) -> ClassTable:
    """Read a ``--classes`` YAML file (see the module docstring); ``ignore_index`` (an option)
    wins over the file's. Any entry deo cannot read is a :class:`DataError` naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"classes file {path} not found", "check the --classes path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise DataError(f"classes file {path} is not valid YAML", "fix its syntax") from e
    if isinstance(data, list) or (
        isinstance(data, Mapping) and data and not (set(map(str, data)) & _FILE_KEYS)
    ):
        data = {"classes": data}  # the file is just the classes
    if not isinstance(data, Mapping) or "classes" not in data:
        raise DataError(
            f"classes file {path} has no 'classes' key", f"list the classes under classes: ({CLASS_FORMS})"
        )
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise DataError(
            f"classes file {path} has unknown key(s) {sorted(map(str, unknown))}",
            "use classes, ignore_index, nodata",
        )
    items = _class_entries(data["classes"], path)
    ignore = ignore_index if ignore_index is not None else data.get("ignore_index")
    ignore_vals = (_label_value(ignore, f"ignore_index in {path.name}"),) if ignore is not None else ()
    items = [it for it in items if it[0] not in ignore_vals]
    classes = tuple(
        ClassInfo(
            v,
            n,
            parse_color(c, f"colour of class {v} ({n}) in {path.name}")
            if c is not None
            else PALETTE[i % len(PALETTE)],
        )
        for i, (v, n, c) in enumerate(items)
    )
    nodata = data.get("nodata")
    if nodata is not None:
        nodata = _label_value(nodata, f"nodata in {path.name}")
    return ClassTable(
        classes, ignore_vals, nodata if nodata is not None else _default_nodata([v for v, _, _ in items])
    )


def label_values(paths: Sequence[str | os.PathLike], nodata: float | None = None) -> set[int]:
    """The distinct values of label rasters (read block by block; nodata left out)."""
    found: set[int] = set()
    for p in paths:
        with rasterio.open(p) as ds:
            nd = ds.nodata if nodata is None else nodata
            for _, win in ds.block_windows(1):
                a = ds.read(1, window=win)
                if nd is not None:
                    a = a[a != nd]
                if np.issubdtype(a.dtype, np.floating):
                    a = a[np.isfinite(a)]
                found.update(int(v) for v in np.unique(a))
    return found


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLabelPair:
    image: str
    label: str
    split: str | None = None  # train | val | test | None (deo holds out validation itself)

    @property
    def name(self) -> str:
        return Path(self.image).stem


def _rasters(spec: str, what: str) -> list[Path]:
    p = Path(spec)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in RASTER_SUFFIXES)
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(q) for q in glob.glob(spec) if Path(q).suffix.lower() in RASTER_SUFFIXES)
    elif p.is_file():
        files = [p]
    else:
        raise InputNotFoundError(f"{what} {spec} not found", "pass a folder, a glob or a raster file")
    if not files:
        raise DataError(f"no rasters in {what} {spec}", f"put {', '.join(RASTER_SUFFIXES)} files there")
    return files


def _key(stem: str, suffixes: Sequence[str]) -> str:
    low = stem.lower()
    for s in suffixes:
        if low.endswith(s):
            return low[: -len(s)]
    return low


def find_pairs(images: str, labels: str) -> list[ImageLabelPair]:
    """Images and labels (folders, globs or single files) matched by file name (module docs)."""
    imgs = _rasters(images, "--images")
    labs = _rasters(labels, "--labels")
    if len(imgs) == 1 and len(labs) == 1:
        return [ImageLabelPair(str(imgs[0]), str(labs[0]))]
    by_key: dict[str, Path] = {}
    for lab in labs:
        by_key.setdefault(_key(lab.stem, _LABEL_SUFFIXES), lab)
    pairs, missing = [], []
    for img in imgs:
        lab = by_key.get(img.stem.lower()) or by_key.get(_key(img.stem, _IMAGE_SUFFIXES))
        if lab is None:
            missing.append(img.name)
        else:
            pairs.append(ImageLabelPair(str(img), str(lab)))
    if missing:
        raise DataError(
            f"no label raster matches image(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}",
            "name each label like its image (optionally with _label or _mask), or pass --pairs CSV",
        )
    used = {p.label for p in pairs}
    extra = [lab.name for lab in labs if str(lab) not in used]
    if extra:
        log.warning("%d label raster(s) match no image (first: %s)", len(extra), extra[0])
    return pairs


def read_pairs_csv(path: str | os.PathLike) -> list[ImageLabelPair]:
    """Pairs from a CSV with ``image``, ``label`` and optional ``split`` columns."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"pairs file {path} not found", "check the --pairs path")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image" not in cols or "label" not in cols:
            raise DataError(
                f"{path.name} needs 'image' and 'label' columns (it has {', '.join(cols) or 'none'})",
                "write a header line: image,label,split",
            )
        pairs = []
        for n, row in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if not row.get("image") and not row.get("label"):
                continue
            split = row.get("split") or None
            if split is not None:
                if split.lower() not in SPLITS:
                    raise DataError(
                        f"{path.name} line {n}: unknown split {split!r}", "use train, val or test"
                    )
                split = SPLITS[split.lower()]
            img, lab = (path.parent / row["image"]), (path.parent / row["label"])
            for p, what in ((img, "image"), (lab, "label")):
                if not p.exists():
                    raise InputNotFoundError(f"{path.name} line {n}: {what} {p} not found", "fix the path")
            pairs.append(ImageLabelPair(str(img), str(lab), split))
    if not pairs:
        raise DataError(f"{path.name} lists no pairs", "add image,label rows")
    return pairs


def holdout(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """A deterministic validation mask over ``n`` items: ``round(n * fraction)`` of them (at least
    one when ``n >= 2`` and ``fraction > 0``), picked by a permutation seeded with ``seed``."""
    mask = np.zeros(n, bool)
    if n < 2 or fraction <= 0:
        return mask
    k = min(n - 1, max(1, int(round(n * fraction))))
    mask[np.random.default_rng(seed).permutation(n)[:k]] = True
    return mask


# ---------------------------------------------------------------------------------------------
# Label windows on an image grid
# ---------------------------------------------------------------------------------------------


def _edge_padded(
    read, y: int, x: int, size: int, height: int, width: int, fill
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` x ``size`` values at (y, x) from a ``height`` x ``width`` source; ``fill`` and
    ``inside=False`` outside it. ``read(window)`` returns the in-source part."""
    out = np.full((size, size), fill, np.float64)
    inside = np.zeros((size, size), bool)
    r0, c0 = max(0, y), max(0, x)
    r1, c1 = min(height, y + size), min(width, x + size)
    if r1 > r0 and c1 > c0:
        out[r0 - y : r1 - y, c0 - x : c1 - x] = read(Window(c0, r0, c1 - c0, r1 - r0))
        inside[r0 - y : r1 - y, c0 - x : c1 - x] = True
    return out, inside


class RasterLabels:
    """Label windows of a label raster on an image's grid (nearest resampling when it differs).

    ``read(y, x, size)`` -> int64 training indices (``table.encode``), :data:`IGNORE` outside
    the raster and where the label is nodata. Picklable (opens the file lazily per process).
    """

    def __init__(self, path: str | os.PathLike, grid: Grid, table: ClassTable, nodata: float | None = None):
        self.path = str(path)
        self.grid = grid
        self.table = table
        self.nodata = nodata
        with rasterio.open(self.path) as ds:
            self.file_nodata = ds.nodata
            own = Grid(ds.crs, ds.transform, ds.width, ds.height)
            georef = ds.crs is not None
        if not georef:
            if (own.width, own.height) != (grid.width, grid.height):
                raise DataError(
                    f"label {Path(self.path).name} has no CRS and is {own.width}x{own.height} px, "
                    f"but its image is {grid.width}x{grid.height}",
                    "georeference the label raster, or give it the image's size",
                )
            self.warp = False
        else:
            self.warp = grid.crs is not None and not own.same_as(grid)
        self._ds = None
        self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None
        return state

    def _dataset(self):
        if self._ds is None or self._pid != os.getpid():
            base = rasterio.open(self.path)
            if self.warp:
                g = self.grid
                self._ds = WarpedVRT(
                    base,
                    crs=g.crs,
                    transform=g.transform,
                    width=g.width,
                    height=g.height,
                    resampling=Resampling.nearest,
                )
            else:
                self._ds = base
            self._pid = os.getpid()
        return self._ds

    def read(self, y: int, x: int, size: int) -> np.ndarray:
        ds = self._dataset()
        nodata = self.nodata if self.nodata is not None else self.file_nodata

        def get(win):
            a = ds.read(1, window=win).astype(np.float64)
            m = ds.read_masks(1, window=win) > 0
            if nodata is not None:
                m &= a != nodata
            return np.where(m, a, np.nan)

        raw, _ = _edge_padded(get, y, x, size, self.grid.height, self.grid.width, np.nan)
        return self.table.encode(raw)

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None


class ArrayLabels:
    """Label windows of an in-memory array of training indices (e.g. OSCD's 0/1 change maps)."""

    def __init__(self, indices: np.ndarray):
        self.indices = np.asarray(indices, np.int64)

    def read(self, y: int, x: int, size: int) -> np.ndarray:
        h, w = self.indices.shape

        def get(win):
            r, c = int(win.row_off), int(win.col_off)
            return self.indices[r : r + int(win.height), c : c + int(win.width)]

        out, _ = _edge_padded(get, y, x, size, h, w, IGNORE)
        return out.astype(np.int64)


def split_name(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip().lower()
    if key not in SPLITS:
        raise UsageError(f"unknown split {value!r}", "use train, val or test")
    return SPLITS[key]


__all__ = [
    "IGNORE",
    "PALETTE",
    "ArrayLabels",
    "ClassInfo",
    "ClassTable",
    "ImageLabelPair",
    "RasterLabels",
    "find_pairs",
    "holdout",
    "label_values",
    "load_class_file",
    "read_pairs_csv",
]
