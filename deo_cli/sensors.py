"""Band sets and band manifests: which band is which, and how a model wants it normalised.

Bands are always chosen **by name**. Every band has one canonical name (``B04``, ``B8A``,
``red``...) and aliases (``B4``, ``4``, ``04 - Red``, ``red``...). Names from rasters (band
descriptions, file names such as ``T31UDQ_20171107T105229_B8A.tif`` or ``B04.jp2``) and names
typed by users go through :func:`canonical_band_name`.

A :class:`BandManifest` is what a model expects: band names in input order, the unit the
statistics were computed in, and the per-band mean/std. It travels inside every checkpoint and
every output file's tags (:meth:`BandManifest.to_dict`).

Numbers: Sentinel-2 central wavelengths are the S2A values of the ESA Sentinel-2 User Handbook;
DEO's input order and statistics are docs/method.md §2.2-2.3 (SatMAE fMoW-Sentinel
statistics for B5..B12, max-scaled statistics for RGB).

This module imports neither torch nor rasterio.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from deo_cli.errors import BandError

# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------

#: Units deo recognises for pixel values, with the label ``deo inspect`` prints.
UNITS: dict[str, str] = {
    "dn": "DN (reflectance x 10^4)",
    "reflectance": "reflectance 0-1",
    "byte": "0-255",
    "any": "any (scaled per image)",
    "unknown": "unknown",
}

#: Multiply values in the key unit by this to get S2 DN (reflectance x 10^4).
TO_DN_FACTOR: dict[str, float] = {"dn": 1.0, "reflectance": 10000.0}


@dataclass(frozen=True)
class Band:
    """One spectral band: canonical name, aliases, central wavelength (nm), native GSD (m)."""

    name: str
    description: str
    wavelength_nm: float
    gsd_m: float
    common_name: str | None = None
    aliases: tuple[str, ...] = ()


def _s2(name: str, desc: str, wl: float, gsd: float, common: str | None, *extra: str) -> Band:
    num = name[1:]  # "04", "8A"
    short = num.lstrip("0") or "0"  # "4", "8A"
    # Bare numbers ("4", "04") are not aliases: as band descriptions they are usually indices.
    aliases = {f"B{short}", f"B{num}"}
    if common:
        aliases.add(common)
    aliases.update(extra)
    aliases.discard(name)
    return Band(name, desc, wl, gsd, common, tuple(sorted(aliases)))


#: Sentinel-2 MSI bands (S2A central wavelengths, native resolution).
S2_BANDS: dict[str, Band] = {
    b.name: b
    for b in (
        _s2("B01", "Coastal aerosol", 442.7, 60, "coastal"),
        _s2("B02", "Blue", 492.4, 10, "blue"),
        _s2("B03", "Green", 559.8, 10, "green"),
        _s2("B04", "Red", 664.6, 10, "red"),
        _s2("B05", "Vegetation red edge 1", 704.1, 20, "rededge1", "rededge"),
        _s2("B06", "Vegetation red edge 2", 740.5, 20, "rededge2"),
        _s2("B07", "Vegetation red edge 3", 782.8, 20, "rededge3"),
        _s2("B08", "NIR", 832.8, 10, "nir"),
        _s2("B8A", "Narrow NIR", 864.7, 20, "nir08", "narrow_nir", "B08A"),
        _s2("B09", "Water vapour", 945.1, 60, "nir09", "water_vapour"),
        _s2("B10", "SWIR cirrus", 1373.5, 60, "cirrus"),
        _s2("B11", "SWIR 1", 1613.7, 20, "swir16", "swir1"),
        _s2("B12", "SWIR 2", 2202.4, 20, "swir22", "swir2"),
    )
}

#: Bands of an RGB image (aerial, VHR, PNG/JPEG-like). They match S2 B04/B03/B02 by common name.
RGB_BANDS: dict[str, Band] = {
    "red": Band("red", "Red", 650.0, 0.0, "red", ("R",)),
    "green": Band("green", "Green", 550.0, 0.0, "green", ("G",)),
    "blue": Band("blue", "Blue", 470.0, 0.0, "blue", ("B",)),
}

_ALIASES: dict[str, str] = {}
for _band in S2_BANDS.values():
    _ALIASES[_band.name.lower()] = _band.name
    for _a in _band.aliases:
        _ALIASES[_a.lower()] = _band.name
for _band in RGB_BANDS.values():
    for _a in (_band.name, *_band.aliases):
        _ALIASES.setdefault(_a.lower(), _band.name)
# "red"/"green"/"blue" resolve to the S2 bands (common names); "R"/"G"/"B" to the RGB bands.

_TOKEN = re.compile(r"(?:^|[^a-z0-9])(b0?(?:1[0-2]|[1-9])a?)(?=$|[^a-z0-9])", re.IGNORECASE)
_GEOBENCH = re.compile(r"^\s*(0?\d{1,2}a?)\s*-\s*", re.IGNORECASE)
_S2_WORDS = re.compile(r"coastal|aerosol|blue|green|red|edge|nir|vapou?r|swir|cirrus", re.IGNORECASE)


def band_info(name: str) -> Band | None:
    """The :class:`Band` for a canonical name, or ``None`` for bands deo does not know."""
    return S2_BANDS.get(name) or RGB_BANDS.get(name)


def canonical_band_name(text: str | None) -> str | None:
    """Canonical name for a band label, or ``None`` when the label names no known band.

    Understands ``B4``/``B04``, common names (``red``, ``nir08``, ``swir16``),
    GEO-Bench descriptions (``04 - Red``, ``08A - Vegetation Red Edge``) and S2 file names
    (``T31UDQ_20171107T105229_B8A.tif``, ``B04_10m.jp2``).
    """
    if not text:
        return None
    t = text.strip()
    hit = _ALIASES.get(t.lower())
    if hit:
        return hit
    m = _GEOBENCH.match(t)
    if m and _S2_WORDS.search(t[m.end() :]):  # "04 - Red" yes, "01 - VH.Real" (Sentinel-1) no
        return _ALIASES.get("b" + m.group(1).lower())
    return None


def band_name_from_filename(filename: str) -> str | None:
    """Canonical S2 band name found in a file name, e.g. ``..._B8A.tif`` -> ``B8A``."""
    stem = filename.rsplit("/", 1)[-1]
    stem = re.sub(r"\.(tif{1,2}|jp2|vrt|img|png|jpe?g)$", "", stem, flags=re.IGNORECASE)
    direct = canonical_band_name(stem)
    if direct:
        return direct
    hits = _TOKEN.findall(stem)
    if not hits:
        return None
    return canonical_band_name(hits[-1])


def same_band(a: str, b: str) -> bool:
    """Whether two canonical names denote the same band (``B04`` and ``red`` do)."""
    if a == b:
        return True
    ia, ib = band_info(a), band_info(b)
    return bool(ia and ib and ia.common_name and ia.common_name == ib.common_name)


# ---------------------------------------------------------------------------------------------
# Band sets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandSet:
    """An ordered, named list of bands (a sensor product or a model input)."""

    name: str
    bands: tuple[str, ...]
    description: str
    unit: str = "dn"

    def __len__(self) -> int:
        return len(self.bands)


DEO_S2_BANDS = ("B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

BAND_SETS: dict[str, BandSet] = {
    s.name: s
    for s in (
        BandSet(
            "S2",
            DEO_S2_BANDS,
            "DEO's 10-band Sentinel-2 input [R, G, B, B5, B6, B7, B8, B8A, B11, B12] (docs/method.md §2.2)",
        ),
        BandSet(
            "S2_L1C",
            ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"),
            "Sentinel-2 Level-1C, 13 bands in product order",
        ),
        BandSet(
            "S2_L2A",
            ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"),
            "Sentinel-2 Level-2A, 12 bands in product order (no B10)",
        ),
        BandSet("RGB", ("red", "green", "blue"), "Red, green, blue (aerial or S2 B04/B03/B02)", "any"),
    )
}
BAND_SET_ALIASES = {"DEO": "S2", "S2_DEO": "S2", "L1C": "S2_L1C", "L2A": "S2_L2A"}


def resolve_bands(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Band names for a ``--bands`` value: a set name (``S2``, ``S2_L1C``, ``RGB``) or a list.

    ``S2`` is DEO's 10-band input. A comma-separated list (``B04,B03,B02``) keeps its order.
    Unknown names raise :class:`BandError` with a did-you-mean.
    """
    if isinstance(spec, str):
        key = spec.strip()
        upper = BAND_SET_ALIASES.get(key.upper(), key.upper())
        if upper in BAND_SETS:
            return BAND_SETS[upper].bands
        items = [s for s in re.split(r"[,\s]+", key) if s]
    else:
        items = list(spec)
    out = []
    for item in items:
        name = canonical_band_name(item)
        if name is None:
            known = sorted(set(BAND_SETS) | set(S2_BANDS) | set(RGB_BANDS))
            close = difflib.get_close_matches(item.upper(), known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise BandError(
                f"unknown band or band set {item!r}",
                f"{hint}use a band set ({', '.join(BAND_SETS)}) or band names such as B04,B8A,red",
            )
        out.append(name)
    if len(set(out)) != len(out):
        raise BandError(f"band list {spec!r} names a band twice", "give each band once")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Model band manifests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BandManifest:
    """What a model expects as input: band names in order, unit and per-band statistics.

    Normalisation is ``(x - mean) / std`` per band, after two optional steps:
    values are first converted to ``unit`` (e.g. reflectance 0-1 times 10^4 to DN), then the
    bands named in ``max_scaled`` are divided by their maximum and clamped to [0, 1]
    (DEO max-scales the RGB channels of every crop, docs/method.md §2.3), so their ``mean``/``std``
    are in that 0-1 space.
    """

    name: str
    bands: tuple[str, ...]
    unit: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_scaled: tuple[str, ...] = ()
    source: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        n = len(self.bands)
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(
                f"manifest {self.name}: {n} bands but {len(self.mean)} means, {len(self.std)} stds"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"manifest {self.name}: std must be positive")
        if self.unit not in UNITS:
            raise ValueError(f"manifest {self.name}: unknown unit {self.unit!r}")
        missing = [b for b in self.max_scaled if b not in self.bands]
        if missing:
            raise ValueError(f"manifest {self.name}: max_scaled bands {missing} not in bands")

    @property
    def num_bands(self) -> int:
        return len(self.bands)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "bands": list(self.bands),
            "unit": self.unit,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "max_scaled": list(self.max_scaled),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BandManifest:
        return cls(
            name=str(d["name"]),
            bands=tuple(d["bands"]),
            unit=str(d["unit"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            max_scaled=tuple(d.get("max_scaled", ())),
            source=str(d.get("source", "")),
        )


#: DEO multispectral input (docs/method.md §2.2-2.3): RGB max-scaled then z-scored with the
#: fMoW-RGB statistics; B5..B12 z-scored in DN with the SatMAE fMoW-Sentinel statistics.
DEO_S2_MANIFEST = BandManifest(
    name="deo-s2-10",
    bands=DEO_S2_BANDS,
    unit="dn",
    mean=(0.41820, 0.42148, 0.39913, 1263.739, 1645.403, 1846.870, 1762.595, 1972.624, 1732.164, 1247.919),
    std=(0.28774, 0.27542, 0.27640, 948.982, 1108.067, 1258.364, 1233.149, 1364.387, 1310.370, 1087.602),
    max_scaled=("B04", "B03", "B02"),
    source="DEO-FM pretraining statistics (docs/method.md §2.3)",
)

#: DEO RGB-stem input (docs/method.md §2.3): max-scaled RGB, z-scored with the same RGB statistics.
DEO_RGB_MANIFEST = BandManifest(
    name="deo-rgb",
    bands=("red", "green", "blue"),
    unit="any",
    mean=(0.41820, 0.42148, 0.39913),
    std=(0.28774, 0.27542, 0.27640),
    max_scaled=("red", "green", "blue"),
    source="DEO-FM pretraining statistics (docs/method.md §2.3)",
)

MANIFESTS: dict[str, BandManifest] = {m.name: m for m in (DEO_S2_MANIFEST, DEO_RGB_MANIFEST)}


def match_bands(
    requested: tuple[str, ...] | list[str], available: tuple[str, ...] | list[str]
) -> tuple[list[int], list[str]]:
    """Indices into ``available`` for each requested band, and the requested bands not found.

    Matching is by canonical name, then by common name (``red`` matches ``B04``).
    """
    idx, missing = [], []
    for req in requested:
        exact = [i for i, a in enumerate(available) if a == req]
        hits = exact or [i for i, a in enumerate(available) if same_band(req, a)]
        if hits:
            idx.append(hits[0])
        else:
            missing.append(req)
    return idx, missing
