"""A restricted unpickler for GEO-Bench metadata, and inert stand-ins for its classes.

GEO-Bench v1 keeps its metadata as pickles: ``task_specs.pkl`` holds a
``geobench.task.TaskSpecifications`` and every sample's HDF5 file carries, as the string
attribute ``pickle``, the ``repr`` of a pickled dict with each band's ``BandInfo``, date,
transform and CRS (and the label of classification samples). Unpickling runs whatever code
the file names, so a plain ``pickle.load`` on downloaded data hands the file control of the
interpreter. :class:`SafeUnpickler` resolves only an explicit set of ``(module, name)`` pairs:

- GEO-Bench's own classes, under every module name they were ever pickled from
  (``geobench.*``, ``geobench.io.*``, the early ``ccb.io.*``), each mapped to a small local
  stand-in class here (a plain attribute holder; nothing from ``geobench`` is imported);
- ``affine.Affine`` and ``rasterio.crs.CRS`` (band transforms and CRSs), also as stand-ins;
- ``datetime`` values, ``collections.OrderedDict``, ``builtins.set``/``frozenset``;
- numpy's array and scalar reconstructors, wrapped so that object dtypes (which would let a
  pickle smuggle arbitrary objects back in) and ndarray subclasses are refused.

Anything else raises :class:`~deo_cli.errors.DataError` naming the refused class. This is
the same set GEO-Bench's own restricted loader accepts (its ``geobench/_safe_pickle.py``),
minus every geobench class deo does not need.

This module imports neither torch nor geobench.
"""

from __future__ import annotations

import collections
import datetime
import io
import pickle
from typing import Any, ClassVar

import numpy as np

from deo_cli.errors import DataError

# ---------------------------------------------------------------------------------------------
# Stand-ins for GEO-Bench classes
# ---------------------------------------------------------------------------------------------


class GeoBenchObject:
    """An inert holder for the attributes of one pickled GEO-Bench object.

    Unpickling creates it without calling ``__init__`` and fills ``__dict__`` from the pickled
    state; dunder keys are dropped, so a state cannot reach Python's object machinery.
    """

    #: GEO-Bench's class name for this stand-in (what the pickle says).
    geobench_name: ClassVar[str] = ""

    def __init__(self, **attrs: Any):
        for key, value in attrs.items():
            setattr(self, key, value)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: dict = {}
            for part in state:
                if part is not None:
                    if not isinstance(part, dict):
                        raise DataError(f"malformed GEO-Bench {self.geobench_name} in pickle")
                    merged.update(part)
            state = merged
        if state is None:
            return
        if not isinstance(state, dict):
            raise DataError(
                f"malformed GEO-Bench {self.geobench_name} in pickle (state is {type(state).__name__})"
            )
        for key, value in state.items():
            if isinstance(key, str) and not key.startswith("__"):
                self.__dict__[key] = value

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not isinstance(v, (list, dict)))
        return f"{self.geobench_name or type(self).__name__}({fields})"


class BandInfo(GeoBenchObject):
    """``geobench.dataset.BandInfo``: ``name``, ``alt_names``, ``spatial_resolution``."""

    geobench_name = "BandInfo"


class SpectralBand(BandInfo):
    """``SpectralBand``: a band with a ``wavelength`` (micrometres)."""

    geobench_name = "SpectralBand"


class Sentinel1(SpectralBand):
    geobench_name = "Sentinel1"


class Sentinel2(SpectralBand):
    geobench_name = "Sentinel2"


class Landsat8(SpectralBand):
    geobench_name = "Landsat8"


class Mask(BandInfo):
    geobench_name = "Mask"


class CloudProbability(Mask):
    geobench_name = "CloudProbability"


class ElevationBand(BandInfo):
    geobench_name = "ElevationBand"


class MultiBand(BandInfo):
    """A 3-D band (``n_bands`` channels in one array), e.g. hyperspectral."""

    geobench_name = "MultiBand"


class HyperSpectralBands(MultiBand):
    geobench_name = "HyperSpectralBands"


class LabelType(GeoBenchObject):
    """``geobench.label.LabelType`` and its subclasses: ``n_classes`` and class names."""

    geobench_name = "LabelType"

    @property
    def class_names(self) -> list[str] | None:
        # Classification keeps ``_class_names``; MultiLabelClassification ``class_name``.
        names = self.__dict__.get("_class_names", self.__dict__.get("class_name"))
        return list(names) if names is not None else None


class Classification(LabelType):
    geobench_name = "Classification"


class SemanticSegmentation(Classification):
    geobench_name = "SemanticSegmentation"


class MultiLabelClassification(LabelType):
    geobench_name = "MultiLabelClassification"


class Regression(LabelType):
    geobench_name = "Regression"


class PointAnnotation(LabelType):
    geobench_name = "PointAnnotation"


class Detection(LabelType):
    geobench_name = "Detection"


class SegmentationClasses(BandInfo, LabelType):
    """The label band of a segmentation task (``name == "label"``, ``n_classes``)."""

    geobench_name = "SegmentationClasses"


class TaskSpecifications(GeoBenchObject):
    """``geobench.task.TaskSpecifications``: ``dataset_name``, ``bands_info``, ``label_type``,
    ``patch_size``, ``spatial_resolution``, ``n_time_steps``, ``benchmark_name``."""

    geobench_name = "TaskSpecifications"


class EvalLoss(GeoBenchObject):
    """Old task specs name a loss class (``Accuracy``...) as ``eval_loss``; kept as a marker."""

    geobench_name = "Loss"


def _marker(name: str) -> type[EvalLoss]:
    return type(name, (EvalLoss,), {"geobench_name": name, "__module__": __name__})


_LOSS_MARKERS = {
    name: _marker(name)
    for name in (
        "Loss",
        "Accuracy",
        "AccuracyTop30",
        "CrossEntropy",
        "MultilabelAccuracy",
        "SegmentationAccuracy",
    )
}

#: GEO-Bench class name -> local stand-in. The name is accepted from any GEO-Bench module.
GEOBENCH_STAND_INS: dict[str, type] = {
    cls.geobench_name: cls
    for cls in (
        BandInfo,
        SpectralBand,
        Sentinel1,
        Sentinel2,
        Landsat8,
        Mask,
        CloudProbability,
        ElevationBand,
        MultiBand,
        HyperSpectralBands,
        LabelType,
        Classification,
        SemanticSegmentation,
        MultiLabelClassification,
        Regression,
        PointAnnotation,
        Detection,
        SegmentationClasses,
        TaskSpecifications,
    )
}
GEOBENCH_STAND_INS.update(_LOSS_MARKERS)

#: Module names GEO-Bench pickles were written under (``ccb`` was the project's early name).
GEOBENCH_MODULES = frozenset(
    {
        "geobench",
        "geobench.dataset",
        "geobench.label",
        "geobench.task",
        "geobench.io",
        "geobench.io.dataset",
        "geobench.io.label",
        "geobench.io.task",
        "ccb",
        "ccb.io",
        "ccb.io.dataset",
        "ccb.io.label",
        "ccb.io.task",
    }
)


# ---------------------------------------------------------------------------------------------
# Stand-ins for the georeferencing objects GEO-Bench bands carry
# ---------------------------------------------------------------------------------------------


class GeoTransform:
    """Stand-in for ``affine.Affine``: the six coefficients ``(a, b, c, d, e, f)``.

    ``x = a * col + b * row + c``, ``y = d * col + e * row + f`` (affine's order, not GDAL's).
    Pickled as ``Affine(a..f)`` (affine 2, a namedtuple) plus, with affine 3, a state dict.
    """

    __slots__ = ("coefficients",)

    def __init__(self, *coefficients: float):
        self.coefficients = tuple(float(c) for c in coefficients[:6])

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0] or state[1]
        if isinstance(state, dict) and all(k in state for k in "abcdef"):
            self.coefficients = tuple(float(state[k]) for k in "abcdef")

    def __reduce__(self):
        return (GeoTransform, self.coefficients)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeoTransform) and self.coefficients == other.coefficients

    def __hash__(self) -> int:
        return hash(self.coefficients)

    def __repr__(self) -> str:
        return f"GeoTransform{self.coefficients}"


class _AffineClass:
    """What ``find_class("affine", "Affine")`` returns: NEWOBJ and REDUCE build a :class:`GeoTransform`."""

    def __new__(cls, *args: float) -> GeoTransform:  # type: ignore[misc]
        return GeoTransform(*args)


class CRSInfo:
    """Stand-in for ``rasterio.crs.CRS``: its WKT (rasterio pickles a CRS as its WKT)."""

    wkt: str | None = None

    def __init__(self, wkt: str | None = None):
        self.wkt = wkt

    def __setstate__(self, state: Any) -> None:
        self.wkt = state if isinstance(state, str) else None
        if isinstance(state, dict):  # very old rasterio pickled a dict of PROJ parameters
            init = state.get("init")
            self.wkt = str(init) if isinstance(init, str) else None

    def __repr__(self) -> str:
        return f"CRSInfo({(self.wkt or '')[:40]!r})"


# ---------------------------------------------------------------------------------------------
# numpy reconstructors, guarded
# ---------------------------------------------------------------------------------------------


def _np_core(module: str):
    try:
        from numpy import _core as core  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy import core  # type: ignore[no-redef]
    return getattr(core, module)


def _refuse(what: str) -> DataError:
    return DataError(
        f"refusing to unpickle {what}: it is not part of the GEO-Bench data format",
        "the file was not written by GEO-Bench and may be malicious; download the task again "
        "with `deo bench download --suite geobench`",
    )


def _safe_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _refuse("a numpy object dtype")
    return dtype


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _refuse(f"ndarray subclass {subtype!r}")
    if not isinstance(dtype, bytes | str | np.dtype) or np.dtype(dtype).hasobject:
        raise _refuse("a numpy object dtype")
    return _np_core("multiarray")._reconstruct(np.ndarray, shape, dtype)


def _safe_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _refuse("a numpy object scalar")
    if data is None:
        return _np_core("multiarray").scalar(dtype)
    return _np_core("multiarray").scalar(dtype, data)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _refuse("a numpy object array")
    return _np_core("numeric")._frombuffer(buf, dtype, shape, order)


def _safe_codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles store bytes as ``_codecs.encode(str, "latin1")``; allow only that."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _refuse("_codecs.encode with anything but a latin1 string")
    return text.encode("latin1")


_NUMPY: dict[tuple[str, str], Any] = {("numpy", "dtype"): _safe_dtype, ("numpy", "ndarray"): np.ndarray}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _NUMPY[(_mod, "_reconstruct")] = _safe_reconstruct
    _NUMPY[(_mod, "scalar")] = _safe_scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _NUMPY[(_mod, "_frombuffer")] = _safe_frombuffer

#: Every global a GEO-Bench pickle may name, besides the GEO-Bench classes themselves.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_NUMPY,
    ("affine", "Affine"): _AffineClass,
    ("rasterio.crs", "CRS"): CRSInfo,
    ("datetime", "date"): datetime.date,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _safe_codecs_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only GEO-Bench's classes (as stand-ins) and a fixed allowlist.

    Every other global, ``os.system`` included, raises :class:`DataError` naming it.
    """

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        if module in GEOBENCH_MODULES and name in GEOBENCH_STAND_INS:
            return GEOBENCH_STAND_INS[name]
        raise _refuse(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _refuse(f"persistent id {pid!r}")


def safe_loads(data: bytes, what: str = "pickle") -> Any:
    """Unpickle GEO-Bench metadata from ``data`` with :class:`SafeUnpickler`.

    ``what`` names the source (a file) in error messages. Refused globals and malformed
    pickles both raise :class:`DataError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"safe_loads needs bytes, got {type(data).__name__}")
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except DataError as err:
        raise DataError(f"{what}: {err.problem}", err.fix) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        KeyError,
    ) as err:
        raise DataError(
            f"cannot read {what}: not a valid GEO-Bench pickle ({type(err).__name__}: {err})",
            "download the task again with `deo bench download --suite geobench`",
        ) from None
