"""GEO-Bench v1 tasks read from their on-disk format, without the ``geobench`` package.

A GEO-Bench v1 task is one folder (``$GEO_BENCH_DIR/classification_v1.0/m-eurosat``,
``$GEO_BENCH_DIR/segmentation_v1.0/m-cashew-plant``...) holding

- ``task_specs.pkl``: a pickled ``geobench.task.TaskSpecifications`` (band infos in band
  order, label type, patch size), read with the restricted unpickler of
  :mod:`deo_cli.data.geobench_pickle`, never with plain ``pickle.load``;
- ``band_stats.json``: per band name (and ``label``) ``mean``, ``std``, ``min``, ``max``,
  ``median`` and percentiles over the task;
- ``<partition>_partition.json``: ``{"train": [...], "valid": [...], "test": [...]}`` sample
  ids; ``default`` plus the low-data partitions ``0.01x_train`` ... ``1.00x_train``;
- one ``<sample id>.hdf5`` per sample: one 2-D dataset per band, named by the band name,
  suffixed ``_<YYYY-MM-DD>`` when the band has a date, a ``label`` dataset for segmentation
  masks, and a root attribute ``pickle`` holding ``str(pickle.dumps(attrs))``: per dataset
  its ``band_info``, date, transform and CRS, ``label`` for classification samples, and (in
  newer files) ``bands_order``.

:func:`open_task` returns a :class:`GeoBenchTask`; :meth:`GeoBenchTask.load_sample` gives a
:class:`GeoBenchSample` with the image as ``(C, H, W)`` float32 in the task's band order.
Sentinel-2 bands get deo's canonical names (``B04``, ``B8A``...); aerial RGB bands become
``red``/``green``/``blue``; other bands (Sentinel-1, NAIP near-infrared, cloud probability,
Landsat) keep GEO-Bench's name. :meth:`GeoBenchTask.bands_for_model` picks a model's bands by
name (DEO's S2 order ``B04, B03, B02, B05...B12`` from 13- or 12-band tasks, or the RGB
stem's bands) and :meth:`GeoBenchTask.normalize` applies the per-task z-score of
``band_stats.json`` (docs/method.md §3.1).

This module imports neither torch nor geobench.
"""

from __future__ import annotations

import ast
import datetime
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from deo_cli.data.geobench_pickle import (
    BandInfo,
    Classification,
    CRSInfo,
    GeoTransform,
    LabelType,
    Landsat8,
    MultiLabelClassification,
    SafeUnpickler,
    SegmentationClasses,
    SemanticSegmentation,
    Sentinel1,
    Sentinel2,
    SpectralBand,
    TaskSpecifications,
    safe_loads,
)
from deo_cli.errors import BandError, DataError
from deo_cli.sensors import BandManifest, canonical_band_name, match_bands

__all__ = [
    "BENCHMARKS",
    "GEO_BENCH_ENV",
    "GeoBenchSample",
    "GeoBenchTask",
    "LabelInfo",
    "SafeUnpickler",
    "geobench_root",
    "list_tasks",
    "open_task",
    "safe_loads",
    "select_bands",
    "task_key",
    "zscore",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the folder that holds ``classification_v1.0/`` and
#: ``segmentation_v1.0/`` (GEO-Bench's own convention).
GEO_BENCH_ENV = "GEO_BENCH_DIR"

#: GEO-Bench v1 benchmark folders, with the task folders each holds in the v1.0 release.
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "classification_v1.0": (
        "m-bigearthnet",
        "m-brick-kiln",
        "m-eurosat",
        "m-forestnet",
        "m-pv4ger",
        "m-so2sat",
    ),
    "segmentation_v1.0": (
        "m-cashew-plant",
        "m-chesapeake",
        "m-NeonTree",
        "m-nz-cattle",
        "m-pv4ger-seg",
        "m-SA-crop-type",
    ),
}

#: Names used in papers (and GEO-Bench's own code) for folders named otherwise on disk.
TASK_ALIASES = {
    "m-cashew-plantation": "m-cashew-plant",
    "m-cashew": "m-cashew-plant",
    "m-chesapeake-landcover": "m-chesapeake",
    "m-chesapeake-lancover": "m-chesapeake",
    "m-sa-crop": "m-SA-crop-type",
    "m-neon-tree": "m-NeonTree",
}

_ALIAS_KEYS = {
    alias.lower().removeprefix("m-"): target.lower().removeprefix("m-")
    for alias, target in TASK_ALIASES.items()
}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid", "valid": "valid", "train": "train", "test": "test"}
_DOWNLOAD_HINT = "download it with `deo bench download --suite geobench{tasks}`"


# ---------------------------------------------------------------------------------------------
# Locating tasks
# ---------------------------------------------------------------------------------------------


def task_key(name: str) -> str:
    """A task name reduced for matching: ``m-cashew-plantation``, ``Cashew_Plant`` -> ``cashew-plant``."""
    key = name.strip().lower().replace("_", "-")
    key = key[2:] if key.startswith("m-") else key
    return _ALIAS_KEYS.get(key, key)


def geobench_root(root: str | os.PathLike | None = None, task: str | None = None) -> Path:
    """The GEO-Bench folder: ``root`` if given, else ``$GEO_BENCH_DIR``; one-line error if absent."""
    tasks = f" --tasks {task}" if task else ""
    if root is None:
        env = os.environ.get(GEO_BENCH_ENV)
        if not env:
            what = f"GEO-Bench task {task!r}" if task else "GEO-Bench"
            raise DataError(
                f"{GEO_BENCH_ENV} is not set, so deo cannot find {what}",
                f"{_DOWNLOAD_HINT.format(tasks=tasks)} (it saves into $GEO_BENCH_DIR), or set "
                f"{GEO_BENCH_ENV} to the folder that holds classification_v1.0/ and segmentation_v1.0/",
            )
        root = env
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"GEO-Bench folder {path} does not exist",
            f"{_DOWNLOAD_HINT.format(tasks=tasks)} --dest {path}, or point {GEO_BENCH_ENV} at the "
            "folder that holds classification_v1.0/ and segmentation_v1.0/",
        )
    return path


def list_tasks(root: str | os.PathLike | None = None) -> list[Path]:
    """Every task folder (one with a ``task_specs.pkl``) under the GEO-Bench folder, sorted."""
    base = geobench_root(root)
    found = {p.parent for p in base.glob("*/task_specs.pkl")}
    found |= {p.parent for p in base.glob("*/*/task_specs.pkl")}
    return sorted(found, key=lambda p: (p.parent.name, p.name.lower()))


def _find_task_dir(name: str, root: str | os.PathLike | None) -> Path:
    base = geobench_root(root, task=name)
    wanted = task_key(name)
    folders = list_tasks(base)
    hits = [p for p in folders if task_key(p.name) == wanted]
    if len(hits) > 1:
        # The same task name in two benchmarks (never in v1.0): prefer the v1.0 folders.
        preferred = [p for p in hits if p.parent.name in BENCHMARKS]
        hits = preferred or hits
    if not hits:
        have = ", ".join(p.name for p in folders) or "none"
        canonical = next(
            (t for tasks in BENCHMARKS.values() for t in tasks if task_key(t) == wanted),
            name,
        )
        raise DataError(
            f"GEO-Bench task {name!r} not found under {base} (tasks there: {have})",
            _DOWNLOAD_HINT.format(tasks=f" --tasks {canonical}") + f" --dest {base}",
        )
    return hits[0]


def open_task(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None) -> GeoBenchTask:
    """Open a GEO-Bench task by name (``m-eurosat``, ``eurosat``, ``m-cashew-plantation``...),
    looked up under ``root`` or ``$GEO_BENCH_DIR``, or by the path of its folder."""
    path = Path(name_or_path).expanduser()
    if (path / "task_specs.pkl").is_file():
        return GeoBenchTask(path)
    text = str(name_or_path)
    if path.is_absolute() or os.sep in text or "/" in text:
        if path.is_dir():
            raise DataError(
                f"{path} is not a GEO-Bench task folder (it has no task_specs.pkl)",
                "give the folder of one task, e.g. $GEO_BENCH_DIR/classification_v1.0/m-eurosat",
            )
        raise DataError(f"GEO-Bench task folder {path} does not exist", _DOWNLOAD_HINT.format(tasks=""))
    return GeoBenchTask(_find_task_dir(text, root))


# ---------------------------------------------------------------------------------------------
# Samples and label information
# ---------------------------------------------------------------------------------------------


@dataclass
class GeoBenchSample:
    """One sample: ``image`` ``(C, H, W)`` float32 in the task's band order, and its label.

    ``label`` is an ``int`` (classification), an int64 multi-hot vector (multi-label) or an
    int64 ``(H, W)`` mask (segmentation). ``transform`` (affine order ``a, b, c, d, e, f``),
    ``crs`` (WKT) and ``date`` are those GEO-Bench stored with the first band, or ``None``.
    """

    sample_id: str
    image: np.ndarray
    label: int | np.ndarray
    band_names: tuple[str, ...]
    transform: tuple[float, ...] | None = None
    crs: str | None = None
    date: datetime.date | None = None


@dataclass(frozen=True)
class LabelInfo:
    """What a task predicts: ``kind`` (``classification``/``segmentation``), classes, multi-label."""

    kind: str
    num_classes: int
    multilabel: bool = False
    class_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _BandStat:
    mean: float
    std: float
    raw: dict = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------
# Band names
# ---------------------------------------------------------------------------------------------

_RGB_NAMES = {"red": "red", "green": "green", "blue": "blue"}


def _deo_band_name(info: Any) -> str:
    """deo's name for a GEO-Bench band: canonical S2 names, ``red/green/blue``, else the raw name."""
    raw = str(getattr(info, "name", ""))
    if isinstance(info, Sentinel2):
        alt_names = getattr(info, "alt_names", None) or ()
        for text in (raw, *alt_names):
            name = canonical_band_name(str(text))
            if name and name.startswith("B"):
                return name
        return raw
    if isinstance(info, Sentinel1 | Landsat8):
        return raw  # "01 - VH.Real" or Landsat "04 - Red" must not become an S2 band
    if isinstance(info, SpectralBand) and raw.strip().lower() in _RGB_NAMES:
        return _RGB_NAMES[raw.strip().lower()]
    return raw


#: Descriptions GEO-Bench gives Sentinel-2 bands (``"04 - Red"``); other ``"NN - ..."`` names
#: (Sentinel-1 ``"01 - VH.Real"``, Landsat ``"06 - SWIR1"``) are not S2 bands.
_S2_DESCRIPTIONS = {
    "coastal aerosol",
    "blue",
    "green",
    "red",
    "vegetation red edge",
    "nir",
    "water vapour",
    "swir - cirrus",
    "swir",
}
_NUMBERED = re.compile(r"^\s*\d{1,2}a?\s*-\s*(.+?)\s*$", re.IGNORECASE)


def _name_from_text(text: str) -> str:
    """deo's name for a band label without its GEO-Bench class: S2 names only when they are S2."""
    m = _NUMBERED.match(text)
    if m and m.group(1).lower() not in _S2_DESCRIPTIONS:
        return text
    return canonical_band_name(text) or text


def select_bands(image: np.ndarray, band_names: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """The channels of ``image`` (``(..., C, H, W)``) named ``wanted``, in that order.

    ``band_names`` may be deo names or GEO-Bench names; names match canonically (``B4`` is
    ``B04``, ``red`` matches ``B04``, ``04 - Red`` is ``B04`` but ``01 - VH.Real`` stays a
    Sentinel-1 band). A missing band raises :class:`BandError`.
    """
    names = [_name_from_text(str(n)) for n in band_names]
    idx = []
    missing = []
    for want in wanted:
        if want in band_names:
            idx.append(list(band_names).index(want))
            continue
        hit, miss = match_bands([_name_from_text(str(want))], names)
        if miss:
            missing.append(want)
        else:
            idx.append(hit[0])
    if missing:
        raise BandError(
            f"bands {missing} are not among {list(band_names)}",
            "choose bands the task has, or a model that needs fewer",
        )
    return image[..., idx, :, :]


def zscore(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(image - mean) / std`` per channel of ``(..., C, H, W)``, as float32; ``std <= 0`` counts as 1."""
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    shape = (-1, 1, 1)
    return ((np.asarray(image, dtype=np.float64) - mean.reshape(shape)) / std.reshape(shape)).astype(
        np.float32
    )


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


class GeoBenchTask:
    """One GEO-Bench v1 task folder: specs, band statistics, partitions and samples.

    Attributes: ``path``, ``name`` (folder name, as GEO-Bench itself names tasks),
    ``benchmark`` (parent folder, e.g. ``classification_v1.0``), ``kind``
    (``classification``/``segmentation``), ``band_names`` (deo names), ``raw_band_names``
    (GEO-Bench names), ``band_stats`` (raw band name -> the ``band_stats.json`` entry),
    ``band_mean``/``band_std`` (float64 arrays in band order, NaN where the task has no
    statistics), ``label`` (:class:`LabelInfo`), ``patch_size``, ``spatial_resolution``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        spec_file = self.path / "task_specs.pkl"
        if not spec_file.is_file():
            raise DataError(f"{self.path} has no task_specs.pkl", _DOWNLOAD_HINT.format(tasks=""))
        specs = safe_loads(spec_file.read_bytes(), what=str(spec_file))
        if not isinstance(specs, TaskSpecifications):
            raise DataError(
                f"{spec_file} holds a {type(specs).__name__}, not GEO-Bench task specifications",
                _DOWNLOAD_HINT.format(tasks=""),
            )
        self.specs = specs
        self.name = self.path.name
        self.benchmark = self.path.parent.name
        self.dataset_name = str(getattr(specs, "dataset_name", self.name))

        infos = [b for b in (getattr(specs, "bands_info", None) or []) if isinstance(b, BandInfo)]
        if not infos:
            raise DataError(f"{spec_file} lists no bands", _DOWNLOAD_HINT.format(tasks=""))
        self.band_infos = tuple(infos)
        self.raw_band_names = tuple(str(b.name) for b in infos)
        self.band_names = tuple(_deo_band_name(b) for b in infos)
        self.label = self._label_info(getattr(specs, "label_type", None), spec_file)
        self.kind = self.label.kind
        patch = getattr(specs, "patch_size", None)
        self.patch_size = tuple(int(v) for v in patch) if patch is not None else None
        res = getattr(specs, "spatial_resolution", None)
        self.spatial_resolution = float(res) if res is not None else None

        self.band_stats, self.band_mean, self.band_std = self._load_band_stats()
        self._partition_files = {
            p.name[: -len("_partition.json")]: p for p in self.path.glob("*_partition.json") if p.is_file()
        }
        self._partitions: dict[str, dict[str, list[str]]] = {}

    def __repr__(self) -> str:
        return (
            f"GeoBenchTask({self.benchmark}/{self.name}: {self.kind}, {len(self.band_names)} bands, "
            f"{self.label.num_classes} classes)"
        )

    # -- specs -------------------------------------------------------------------------------

    @staticmethod
    def _label_info(label_type: Any, spec_file: Path) -> LabelInfo:
        if not isinstance(label_type, LabelType):
            raise DataError(f"{spec_file} has no label type", _DOWNLOAD_HINT.format(tasks=""))
        n = int(getattr(label_type, "n_classes", 0) or 0)
        names = label_type.class_names
        names = tuple(str(c) for c in names) if names is not None else None
        if isinstance(label_type, SegmentationClasses | SemanticSegmentation):
            return LabelInfo("segmentation", n, False, names)
        if isinstance(label_type, MultiLabelClassification):
            return LabelInfo("classification", n, True, names)
        if isinstance(label_type, Classification):
            return LabelInfo("classification", n, False, names)
        raise DataError(
            f"{spec_file}: {label_type.geobench_name} tasks are not supported",
            "deo benchmarks GEO-Bench classification and segmentation tasks",
        )

    def _load_band_stats(self) -> tuple[dict[str, dict], np.ndarray, np.ndarray]:
        stats_file = self.path / "band_stats.json"
        n = len(self.raw_band_names)
        mean, std = np.full(n, np.nan), np.full(n, np.nan)
        if not stats_file.is_file():
            logger.warning("%s has no band_stats.json: per-task normalisation is unavailable", self.path)
            return {}, mean, std
        try:
            raw = json.loads(stats_file.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {stats_file}: {err}", _DOWNLOAD_HINT.format(tasks="")) from None
        if not isinstance(raw, dict):
            raise DataError(f"{stats_file} is not a JSON object", _DOWNLOAD_HINT.format(tasks=""))
        stats: dict[str, dict] = {}
        for i, name in enumerate(self.raw_band_names):
            entry = raw.get(name)
            if entry is None:  # tolerate date-suffixed keys ("04 - Red_2019-05-01")
                entry = next((v for k, v in raw.items() if k.startswith(name + "_")), None)
            if isinstance(entry, dict) and "mean" in entry and "std" in entry:
                stats[name] = entry
                mean[i], std[i] = float(entry["mean"]), float(entry["std"])
        return stats, mean, std

    # -- partitions --------------------------------------------------------------------------

    def partitions(self) -> list[str]:
        """Partition names (``default`` first, then e.g. ``0.01x_train`` ... ``1.00x_train``)."""
        return sorted(self._partition_files, key=lambda p: (p != "default", p))

    def partition(self, partition: str = "default") -> dict[str, list[str]]:
        """``{"train": [...], "valid": [...], "test": [...]}`` of one partition."""
        if partition not in self._partitions:
            path = self._partition_files.get(partition)
            if path is None:
                have = ", ".join(self.partitions()) or "none"
                raise DataError(
                    f"task {self.name} has no partition {partition!r} (it has: {have})",
                    "choose one of its partitions, e.g. default or 0.10x_train",
                )
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read {path}: {err}", _DOWNLOAD_HINT.format(tasks="")) from None
            if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
                raise DataError(f"{path} is not a GEO-Bench partition", _DOWNLOAD_HINT.format(tasks=""))
            self._partitions[partition] = {str(k): [str(s) for s in v] for k, v in data.items()}
        return self._partitions[partition]

    def split_ids(self, split: str, partition: str = "default") -> list[str]:
        """Sample ids of ``split`` (``train``, ``valid``/``val``, ``test``) in ``partition``."""
        key = _SPLIT_ALIASES.get(split.strip().lower())
        splits = self.partition(partition)
        if key is None or key not in splits:
            raise DataError(
                f"task {self.name} partition {partition!r} has no split {split!r} (it has: {', '.join(splits)})",
                "use train, valid or test",
            )
        return list(splits[key])

    # -- samples -----------------------------------------------------------------------------

    def sample_path(self, sample_id: str) -> Path:
        return self.path / f"{sample_id}.hdf5"

    def iter_samples(
        self, split: str, partition: str = "default", limit: int | None = None
    ) -> Iterator[GeoBenchSample]:
        """Samples of one split in partition order, at most ``limit`` of them."""
        ids = self.split_ids(split, partition)
        for sample_id in ids[:limit] if limit is not None else ids:
            yield self.load_sample(sample_id)

    def load_sample(self, sample_id: str) -> GeoBenchSample:
        """Read one sample's bands (in the task's band order) and label."""
        path = self.sample_path(sample_id)
        if not path.is_file():
            raise DataError(
                f"sample {sample_id} of GEO-Bench task {self.name} is missing ({path})",
                "the download is incomplete; " + _DOWNLOAD_HINT.format(tasks=f" --tasks {self.name}"),
            )
        try:
            with h5py.File(path, "r") as h5:
                attrs = _sample_attrs(h5, path)
                keys = list(h5.keys())
                band_keys = self._band_keys(keys, attrs, path)
                arrays = [np.asarray(h5[k]) for k in band_keys]
                label_key = self._label_key(keys, attrs)
                mask = np.asarray(h5[label_key]) if label_key is not None else None
        except OSError as err:
            raise DataError(
                f"cannot read GEO-Bench sample {path}: {err}",
                "the file is damaged; " + _DOWNLOAD_HINT.format(tasks=f" --tasks {self.name}"),
            ) from None
        image = _stack_bands(arrays, self.raw_band_names, path)
        label = self._label_value(attrs, mask, path)
        meta = attrs.get(band_keys[0]) if isinstance(attrs.get(band_keys[0]), dict) else {}
        transform = meta.get("transform")
        crs = meta.get("crs")
        date = meta.get("date")
        return GeoBenchSample(
            sample_id=sample_id,
            image=image,
            label=label,
            band_names=self.band_names,
            transform=transform.coefficients if isinstance(transform, GeoTransform) else None,
            crs=crs.wkt if isinstance(crs, CRSInfo) else None,
            date=date if isinstance(date, datetime.date) else None,
        )

    def _band_keys(self, keys: list[str], attrs: dict, path: Path) -> list[str]:
        keyset = set(keys)
        by_name: dict[str, list[str]] = {}
        for key, meta in attrs.items():
            if key in keyset and isinstance(meta, dict) and isinstance(meta.get("band_info"), BandInfo):
                by_name.setdefault(str(meta["band_info"].name), []).append(key)
        out, missing = [], []
        for name in self.raw_band_names:
            found = by_name.get(name) or [k for k in keys if k == name or k.startswith(name + "_")]
            if not found:
                missing.append(name)
            elif len(found) > 1:
                raise DataError(
                    f"GEO-Bench sample {path} has {len(found)} dates for band {name!r}",
                    "deo reads single-date GEO-Bench tasks (all v1.0 tasks are)",
                )
            else:
                out.append(found[0])
        if missing:
            raise DataError(
                f"GEO-Bench sample {path} lacks band(s) {missing} that task_specs.pkl lists",
                "the file is damaged; " + _DOWNLOAD_HINT.format(tasks=f" --tasks {self.name}"),
            )
        return out

    def _label_key(self, keys: list[str], attrs: dict) -> str | None:
        if self.kind != "segmentation":
            return None
        for key in keys:
            meta = attrs.get(key)
            if isinstance(meta, dict) and isinstance(meta.get("band_info"), SegmentationClasses):
                return key
        return next((k for k in keys if k.startswith("label")), None)

    def _label_value(self, attrs: dict, mask: np.ndarray | None, path: Path) -> int | np.ndarray:
        if self.kind == "segmentation":
            if mask is None:
                raise DataError(f"GEO-Bench sample {path} has no label mask", _DOWNLOAD_HINT.format(tasks=""))
            if mask.ndim == 3 and 1 in (mask.shape[0], mask.shape[-1]):
                mask = mask.squeeze(0 if mask.shape[0] == 1 else -1)
            if mask.ndim != 2:
                raise DataError(f"GEO-Bench sample {path} has a label mask of shape {mask.shape}", "")
            return np.asarray(mask, dtype=np.int64)
        if "label" not in attrs:
            raise DataError(f"GEO-Bench sample {path} has no label", _DOWNLOAD_HINT.format(tasks=""))
        value = attrs["label"]
        if self.label.multilabel:
            vec = np.asarray(value, dtype=np.int64).reshape(-1)
            if vec.size != self.label.num_classes:
                raise DataError(
                    f"GEO-Bench sample {path} has a {vec.size}-class multi-label vector; the task has "
                    f"{self.label.num_classes} classes",
                    _DOWNLOAD_HINT.format(tasks=""),
                )
            return vec
        arr = np.asarray(value)
        if arr.size != 1 or not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"GEO-Bench sample {path} has label {value!r}, not a class index", "")
        return int(arr.reshape(()))

    # -- bands for a model -------------------------------------------------------------------

    def band_indices(self, wanted: Sequence[str]) -> list[int]:
        """Indices into :attr:`band_names` of the bands named ``wanted`` (deo or GEO-Bench names)."""
        out, missing = [], []
        for want in wanted:
            if want in self.raw_band_names:
                out.append(self.raw_band_names.index(want))
                continue
            idx, miss = match_bands([_name_from_text(want)], self.band_names)
            if miss:
                missing.append(want)
            else:
                out.append(idx[0])
        if missing:
            raise BandError(
                f"GEO-Bench task {self.name} has no band(s) {missing} (it has {list(self.band_names)})",
                "choose bands the task has",
            )
        return out

    def bands_for_model(self, manifest: BandManifest | Sequence[str]) -> list[int]:
        """Indices of the model's input bands in this task's images, in the model's order.

        For DEO's 10-band manifest this is ``[B04, B03, B02, B05, B06, B07, B08, B8A, B11,
        B12]``: ``[3, 2, 1, 4, 5, 6, 7, 8, 11, 12]`` on 13-band tasks and ``[..., 10, 11]`` on
        12-band tasks without B10 (docs/method.md §3.1). For the RGB manifest it is the
        task's red, green, blue (the first three channels of m-chesapeake's RGBN).
        """
        wanted = manifest.bands if isinstance(manifest, BandManifest) else tuple(manifest)
        idx, missing = match_bands(wanted, self.band_names)
        if missing:
            label = manifest.name if isinstance(manifest, BandManifest) else "the model"
            raise BandError(
                f"GEO-Bench task {self.name} lacks band(s) {missing} that {label} needs "
                f"(the task has {list(self.band_names)})",
                "use a model input the task has (RGB tasks go through the RGB stem)",
            )
        return idx

    def pick_manifest(self, manifests: Sequence[BandManifest]) -> BandManifest:
        """The first manifest whose bands this task has all of (e.g. DEO's S2, else its RGB)."""
        for manifest in manifests:
            if not match_bands(manifest.bands, self.band_names)[1]:
                return manifest
        raise BandError(
            f"GEO-Bench task {self.name} has none of the inputs {[m.name for m in manifests]} "
            f"(its bands: {list(self.band_names)})",
            "use a model whose bands the task has",
        )

    def normalize(self, image: np.ndarray, band_indices: Sequence[int] | None = None) -> np.ndarray:
        """Per-task z-score from ``band_stats.json`` (docs/method.md §3.1).

        ``image`` is ``(..., C, H, W)``; its channels are the task's bands ``band_indices``
        (e.g. from :meth:`bands_for_model`), or all bands in task order when ``None``.
        """
        idx = list(range(len(self.band_names))) if band_indices is None else [int(i) for i in band_indices]
        image = np.asarray(image)
        if image.ndim < 3 or image.shape[-3] != len(idx):
            raise ValueError(f"image with shape {image.shape} does not have {len(idx)} channels on axis -3")
        mean, std = self.band_mean[idx], self.band_std[idx]
        bad = [
            self.raw_band_names[i]
            for i, m, s in zip(idx, mean, std, strict=True)
            if np.isnan(m) or np.isnan(s)
        ]
        if bad:
            raise DataError(
                f"band_stats.json of GEO-Bench task {self.name} has no mean/std for {bad}",
                _DOWNLOAD_HINT.format(tasks=f" --tasks {self.name}"),
            )
        return zscore(image, mean, std)

    def summary(self) -> dict[str, Any]:
        """Plain facts for logs and result rows."""
        return {
            "task": self.name,
            "benchmark": self.benchmark,
            "kind": self.kind,
            "bands": list(self.band_names),
            "num_classes": self.label.num_classes,
            "multilabel": self.label.multilabel,
            "patch_size": list(self.patch_size) if self.patch_size else None,
            "partitions": self.partitions(),
        }


# ---------------------------------------------------------------------------------------------
# HDF5 helpers
# ---------------------------------------------------------------------------------------------


def _sample_attrs(h5: h5py.File, path: Path) -> dict:
    """The sample's pickled attribute dict (``{}`` when the file has none)."""
    raw = h5.attrs.get("pickle")
    if raw is None:
        return {}
    if isinstance(raw, bytes | np.bytes_):
        raw = bytes(raw).decode("latin1")
    if isinstance(raw, np.ndarray):
        raw = raw.item()
    what = f"{path} (attribute 'pickle')"
    try:
        data = ast.literal_eval(str(raw))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(
            f"cannot read {what}: not a pickled bytes literal", _DOWNLOAD_HINT.format(tasks="")
        ) from None
    if not isinstance(data, bytes):
        raise DataError(f"cannot read {what}: not a pickled bytes literal", _DOWNLOAD_HINT.format(tasks=""))
    attrs = safe_loads(data, what=what)
    if not isinstance(attrs, dict):
        raise DataError(f"{what} holds a {type(attrs).__name__}, not a dict", _DOWNLOAD_HINT.format(tasks=""))
    return attrs


def _stack_bands(arrays: list[np.ndarray], names: Sequence[str], path: Path) -> np.ndarray:
    """Stack 2-D bands into ``(C, H, W)`` float32; coarser bands of an integer ratio are
    repeated up to the largest band (GEO-Bench v1 stores its bands resampled, so this is rare)."""
    for name, arr in zip(names, arrays, strict=True):
        if arr.ndim != 2:
            raise DataError(
                f"GEO-Bench sample {path}: band {name!r} has shape {arr.shape}, not 2-D",
                "deo reads single-date, single-channel bands (hyperspectral tasks are not supported)",
            )
    height = max(a.shape[0] for a in arrays)
    width = max(a.shape[1] for a in arrays)
    out = np.empty((len(arrays), height, width), dtype=np.float32)
    for i, (name, arr) in enumerate(zip(names, arrays, strict=True)):
        if arr.shape != (height, width):
            fy, ry = divmod(height, arr.shape[0])
            fx, rx = divmod(width, arr.shape[1])
            if ry or rx or fy != fx:
                raise DataError(
                    f"GEO-Bench sample {path}: band {name!r} is {arr.shape}, others {height}x{width}",
                    "the file is damaged or not a GEO-Bench v1 sample",
                )
            arr = np.repeat(np.repeat(arr, fy, axis=0), fx, axis=1)
        out[i] = arr
    return out
