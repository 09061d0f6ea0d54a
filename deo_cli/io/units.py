"""Infer the unit of pixel values, and convert between units a model understands.

deo never guesses silently: the unit it infers is printed by ``deo inspect``, written into
output tags, and checked against the model's band manifest before any feature is computed
(wrong units and statistics are the most common complaint about EO model tools).

Rules, applied to a sample of valid pixels of the bands in question:

- ``byte`` (0-255): the file's data type is 8-bit, or every value is an integer <= 255 and the
  99th percentile is above 1.5;
- ``reflectance`` (0-1): the 99th percentile is <= 1.5 and nothing is below -0.5;
- ``dn`` (Sentinel-2 digital numbers = reflectance x 10^4): values above 255 (Sentinel-2 L1C/L2A
  products, BigEarthNet, fMoW-Sentinel, GEO-Bench S2);
- ``unknown`` otherwise (e.g. no valid pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deo_cli.errors import UnitError
from deo_cli.sensors import TO_DN_FACTOR, UNITS


@dataclass(frozen=True)
class UnitGuess:
    unit: str
    reason: str
    p01: float
    p99: float
    vmin: float
    vmax: float

    @property
    def label(self) -> str:
        return UNITS[self.unit]


def infer_unit(values: np.ndarray, dtype: str | None = None) -> UnitGuess:
    """Infer the unit from sampled valid values (any shape) and the file's data type."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return UnitGuess("unknown", "no valid pixels to look at", np.nan, np.nan, np.nan, np.nan)
    p01, p99 = (float(x) for x in np.percentile(v, [1, 99]))
    vmin, vmax = float(v.min()), float(v.max())
    if dtype in ("uint8", "int8"):
        return UnitGuess("byte", f"8-bit data type ({dtype})", p01, p99, vmin, vmax)
    if vmax <= 255 and p99 > 1.5 and np.all(np.equal(np.mod(v, 1), 0)) and vmin >= 0:
        return UnitGuess("byte", "integer values within 0-255", p01, p99, vmin, vmax)
    if p99 <= 1.5 and vmin >= -0.5:
        return UnitGuess("reflectance", "values within 0-1.5 (reflectance)", p01, p99, vmin, vmax)
    if vmax > 255:
        return UnitGuess("dn", "values above 255 (Sentinel-2 DN = reflectance x 10^4)", p01, p99, vmin, vmax)
    return UnitGuess("unknown", "values fit no known unit", p01, p99, vmin, vmax)


def conversion_factor(found: str, expected: str, what: str = "the scene") -> float:
    """Factor that converts values in unit ``found`` to unit ``expected``, or a clear error.

    ``expected == "any"`` (bands scaled per image, e.g. DEO's max-scaled RGB) accepts any unit.
    """
    if expected in ("any", found):
        return 1.0
    if found in TO_DN_FACTOR and expected in TO_DN_FACTOR:
        return TO_DN_FACTOR[found] / TO_DN_FACTOR[expected]
    raise UnitError(
        f"{what} looks like {UNITS.get(found, found)} but the model expects {UNITS[expected]}",
        "give Sentinel-2 DN or 0-1 reflectance, or pass --unit to state the unit if deo misread it",
    )


#: Share of valid sampled pixels that are 0 in every band above which deo says they look like
#: unmarked nodata (no land or water surface is 0 in every Sentinel-2 band).
ZERO_WARN_FRACTION = 0.01


def zero_fraction(data: np.ndarray, valid: np.ndarray) -> float:
    """Share of the ``valid`` pixels of ``data`` (bands, H, W) that are 0 in every band: pixels
    outside a swath or mosaic padding that no nodata value marks."""
    if not valid.any():
        return 0.0
    return float((data[:, valid] == 0).all(axis=0).mean())
