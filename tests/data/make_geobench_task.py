"""Write tiny GEO-Bench v1 tasks in the real on-disk format, for tests (not a test itself).

The files are what GEO-Bench's own writer produces: ``task_specs.pkl`` (a pickled
``TaskSpecifications`` whose classes are named ``geobench.task.TaskSpecifications``,
``geobench.dataset.Sentinel2``...), ``band_stats.json``, ``<partition>_partition.json`` and one
HDF5 file per sample whose root attribute ``pickle`` is ``str(pickle.dumps(attrs))``. Band
datasets carry a date suffix (``04 - Red_2020-06-01``) as in the v1.0 release, segmentation
masks are a ``label`` dataset, classification labels live in the pickled attributes.

The pickles are written with stand-in classes registered, only while writing, under the
GEO-Bench module names (``geobench`` is not installed and not needed); transforms and CRSs are
real ``affine.Affine`` and ``rasterio.crs.CRS`` objects, as in GEO-Bench's files.

>>> written = write_geobench_task(tmp_path, "m-tiny-seg", kind="segmentation")
>>> task = open_task(written.path)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import pickle
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import affine
import h5py
import numpy as np
from rasterio.crs import CRS

# (class, name, alt_names, resolution m, wavelength um): GEO-Bench's own band tables.
S2_13_BANDS = [
    ("Sentinel2", "01 - Coastal aerosol", ("1", "01"), 60, 0.443),
    ("Sentinel2", "02 - Blue", ("2", "02", "blue"), 10, 0.49),
    ("Sentinel2", "03 - Green", ("3", "03", "green"), 10, 0.56),
    ("Sentinel2", "04 - Red", ("4", "04", "red"), 10, 0.665),
    ("Sentinel2", "05 - Vegetation Red Edge", ("5", "05"), 20, 0.705),
    ("Sentinel2", "06 - Vegetation Red Edge", ("6", "06"), 20, 0.74),
    ("Sentinel2", "07 - Vegetation Red Edge", ("7", "07"), 20, 0.783),
    ("Sentinel2", "08 - NIR", ("8", "08", "NIR"), 10, 0.842),
    ("Sentinel2", "08A - Vegetation Red Edge", ("8A", "08A"), 20, 0.865),
    ("Sentinel2", "09 - Water vapour", ("9", "09"), 60, 0.945),
    ("Sentinel2", "10 - SWIR - Cirrus", ("10",), 60, 1.375),
    ("Sentinel2", "11 - SWIR", ("11",), 20, 1.61),
    ("Sentinel2", "12 - SWIR", ("12",), 20, 2.19),
]
#: 12 S2 bands without B10 (m-SA-crop-type, m-bigearthnet, m-cashew-plant).
S2_12_BANDS = [b for b in S2_13_BANDS if not b[1].startswith("10 ")]
#: m-cashew-plant style: 12 S2 bands plus a cloud-probability mask band.
S2_12_CLOUD_BANDS = S2_12_BANDS + [("CloudProbability", "Cloud Probability", (), 10, None)]
#: m-chesapeake style: NAIP red, green, blue, near-infrared.
RGBN_BANDS = [
    ("SpectralBand", "Red", ("red",), 1.0, 0.665),
    ("SpectralBand", "Green", ("green",), 1.0, 0.56),
    ("SpectralBand", "Blue", ("blue",), 1.0, 0.49),
    ("SpectralBand", "NearInfrared", ("nir",), 1.0, 0.876),
]
#: m-so2sat style: 8 Sentinel-1 channels, then S2 B02..B8A, B11, B12.
SO2SAT_BANDS = (
    [
        ("Sentinel1", n, (), 10, None)
        for n in (
            "01 - VH.Real",
            "02 - VH.Imaginary",
            "03 - VV.Real",
            "04 - VV.Imaginary",
            "05 - VH.LEE Filtered",
            "06 - VV.LEE Filtered",
            "07 - VH.LEE Filtered.Real",
            "08 - VV.LEE Filtered.Imaginary",
        )
    ]
    + S2_13_BANDS[1:9]
    + S2_13_BANDS[-2:]
)

_MODULES = {
    "dataset": {
        "BandInfo": (),
        "SpectralBand": ("BandInfo",),
        "Sentinel1": ("SpectralBand",),
        "Sentinel2": ("SpectralBand",),
        "Mask": ("BandInfo",),
        "CloudProbability": ("Mask",),
        "SegmentationClasses": ("BandInfo", "LabelType"),
    },
    "label": {
        "LabelType": (),
        "Classification": ("LabelType",),
        "MultiLabelClassification": ("LabelType",),
        "SemanticSegmentation": ("Classification",),
    },
    "task": {"TaskSpecifications": ()},
}
_ORDER = ["LabelType", "Classification", "MultiLabelClassification", "SemanticSegmentation", "BandInfo"]


@contextlib.contextmanager
def geobench_classes(package: str = "geobench") -> Iterator[dict[str, type]]:
    """Stand-in classes importable as ``<package>.dataset.Sentinel2`` etc. while the block runs.

    ``package`` may be ``geobench``, ``geobench.io`` or ``ccb.io`` (the names GEO-Bench pickles
    were written under over time).
    """
    names = [package, *(f"{package}.{m}" for m in _MODULES)]
    parts = package.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts) - 1)] + names
    saved = {n: sys.modules.get(n) for n in names}
    modules = {n: types.ModuleType(n) for n in names}
    classes: dict[str, type] = {}
    module_of = {cls: mod for mod, members in _MODULES.items() for cls in members}
    pending = _ORDER + [c for c in module_of if c not in _ORDER]
    for cls_name in pending:
        if cls_name in classes:
            continue
        mod_name = f"{package}.{module_of[cls_name]}"
        bases = tuple(classes[b] for b in _MODULES[module_of[cls_name]][cls_name]) or (object,)
        cls = type(cls_name, bases, {"__module__": mod_name, "__qualname__": cls_name})
        setattr(modules[mod_name], cls_name, cls)
        classes[cls_name] = cls
    try:
        sys.modules.update(modules)
        yield classes
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod


def _make(cls: type, **attrs) -> object:
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


@dataclass
class WrittenTask:
    """What :func:`write_geobench_task` wrote: the folder, and each sample's truth."""

    path: Path
    raw_band_names: list[str]
    images: dict[str, np.ndarray] = field(default_factory=dict)  # (C, H, W) as stored
    labels: dict[str, object] = field(default_factory=dict)
    partitions: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    transforms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    date: datetime.date | None = None


def write_geobench_task(
    root: str | Path,
    name: str = "m-tiny-seg",
    *,
    kind: str = "segmentation",
    bands: list[tuple] | None = None,
    benchmark: str | None = None,
    size: int = 16,
    n_samples: int = 6,
    num_classes: int = 3,
    multilabel: bool = False,
    dated: bool = True,
    package: str = "geobench",
    dtype: str = "int16",
    seed: int = 0,
) -> WrittenTask:
    """Write a GEO-Bench v1 task folder ``root/<benchmark>/<name>`` and return what it holds.

    ``kind`` is ``segmentation`` (an ``(H, W)`` ``label`` mask per sample) or
    ``classification`` (an int label, or a multi-hot vector with ``multilabel``). Bands default
    to 12 Sentinel-2 bands (no B10) for segmentation and 13 for classification.
    """
    if kind not in ("segmentation", "classification"):
        raise ValueError(kind)
    bands = bands or (S2_12_BANDS if kind == "segmentation" else S2_13_BANDS)
    benchmark = benchmark or f"{kind}_v1.0"
    path = Path(root) / benchmark / name
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    date = datetime.date(2020, 6, 1) if dated else None
    crs = CRS.from_epsg(32631)
    written = WrittenTask(path=path, raw_band_names=[b[1] for b in bands], date=date)

    with geobench_classes(package) as gb:
        infos = []
        for cls_name, band_name, alt, res, wl in bands:
            attrs = {"name": band_name, "alt_names": tuple(alt), "spatial_resolution": res}
            if cls_name in ("SpectralBand", "Sentinel1", "Sentinel2"):
                attrs["wavelength"] = wl
            infos.append(_make(gb[cls_name], **attrs))
        class_names = [f"class {i}" for i in range(num_classes)]
        if kind == "segmentation":
            label_type = _make(
                gb["SegmentationClasses"],
                name="label",
                alt_names=(),
                spatial_resolution=10,
                n_classes=num_classes,
                _class_names=class_names,
            )
        elif multilabel:
            label_type = _make(gb["MultiLabelClassification"], n_classes=num_classes, class_name=class_names)
        else:
            label_type = _make(gb["Classification"], n_classes=num_classes, _class_names=class_names)
        specs = _make(
            gb["TaskSpecifications"],
            dataset_name=name,
            benchmark_name=benchmark,
            patch_size=(size, size),
            n_time_steps=1,
            bands_info=infos,
            label_type=label_type,
            spatial_resolution=10,
        )
        (path / "task_specs.pkl").write_bytes(pickle.dumps(specs, protocol=4))

        ids = [f"sample_{i:03d}" for i in range(n_samples)]
        for k, sample_id in enumerate(ids):
            base = np.arange(1, len(bands) + 1, dtype=np.float64)[:, None, None] * 100.0
            image = (base + rng.integers(0, 500, size=(len(bands), size, size))).astype(dtype)
            transform = affine.Affine(10.0, 0.0, 500000.0 + 1000 * k, 0.0, -10.0, 4500000.0)
            attr_dict: dict = {}
            order = []
            with h5py.File(path / f"{sample_id}.hdf5", "w") as h5:
                for info, band in zip(infos, image, strict=True):
                    key = info.name + (f"_{date.isoformat()}" if date else "")
                    h5.create_dataset(key, data=band)
                    attr_dict[key] = {
                        "date": date,
                        "date_id": date,
                        "spatial_resolution": 10,
                        "band_info": info,
                        "meta_info": None,
                        "transform": transform,
                        "crs": crs,
                    }
                    order.append(key)
                if kind == "segmentation":
                    mask = rng.integers(0, num_classes, size=(size, size)).astype(np.int64)
                    h5.create_dataset("label", data=mask)
                    attr_dict["label"] = {
                        "date": None,
                        "date_id": None,
                        "spatial_resolution": 10,
                        "band_info": label_type,
                        "meta_info": None,
                        "transform": transform,
                        "crs": crs,
                    }
                    order.append("label")
                    label: object = mask
                elif multilabel:
                    label = (rng.random(num_classes) < 0.4).astype(np.int64)
                    attr_dict["label"] = label
                else:
                    label = int(k % num_classes)
                    attr_dict["label"] = label
                attr_dict["bands_order"] = order
                h5.attrs["pickle"] = str(pickle.dumps(attr_dict))
            written.images[sample_id] = image
            written.labels[sample_id] = label
            written.transforms[sample_id] = tuple(transform)[:6]

    # Band statistics over all samples (GEO-Bench's band_stats.json keys and fields).
    stack = np.stack(list(written.images.values())).astype(np.float64)
    stats = {}
    for i, band_name in enumerate(written.raw_band_names):
        v = stack[:, i]
        stats[band_name] = {
            "max": float(v.max()),
            "mean": float(v.mean()),
            "median": float(np.median(v)),
            "min": float(v.min()),
            "percentile_1": float(np.percentile(v, 1)),
            "percentile_99": float(np.percentile(v, 99)),
            "std": float(v.std()),
        }
    stats["label"] = {"max": float(num_classes - 1), "mean": 0.0, "min": 0.0, "std": 1.0}
    (path / "band_stats.json").write_text(json.dumps(stats, indent=4))

    n_test = max(1, n_samples // 3)
    n_valid = max(1, n_samples // 6)
    default = {
        "train": ids[: n_samples - n_test - n_valid],
        "valid": ids[n_samples - n_test - n_valid : n_samples - n_test],
        "test": ids[n_samples - n_test :],
    }
    low_data = dict(default, train=default["train"][: max(1, len(default["train"]) // 2)])
    for part_name, part in (("default", default), ("0.50x_train", low_data)):
        (path / f"{part_name}_partition.json").write_text(json.dumps(part, indent=2))
        written.partitions[part_name] = part
    return written
