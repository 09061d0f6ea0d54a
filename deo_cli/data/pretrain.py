"""Pretraining data: find the scenes, read them band by name in DataLoader workers, make views.

``--data`` may be (docs/method.md §2.2 trains on fMoW-Sentinel chips paired with fMoW-RGB):

- **a folder**, searched recursively: every multi-band raster is one scene; single-band files whose
  names carry a band (``..._B04.tif``, as in BigEarthNet and OSCD) are grouped into one scene per
  folder and file-name prefix (the name with its band token removed); a ``*.SAFE`` folder is one
  scene. Rasters that lack the requested bands (label masks, previews) are skipped with a warning;
- **a glob** (``'chips/*.tif'``), grouped the same way;
- **a CSV or Parquet manifest** with a multispectral path column (``ms_path``: a file, a band
  folder or anything ``deo inspect`` opens) and an optional co-located RGB column (``rgb_path``;
  empty cells mean none). Relative paths are relative to the manifest's folder. Where an RGB
  image is given it replaces channels 0-2: it is assumed to cover the same extent as the
  multispectral raster (as fMoW-RGB pairs do; they are not co-registered pixel by pixel), and each
  crop's box is mapped onto it by relative position and resized with bicubic interpolation
  (antialiased) to the crop size (:mod:`deo_cli.data.multicrop`).

Scenes larger than ``window_size`` on a side are sampled by ``windows_per_scene`` random windows
per epoch; smaller ones are used whole. Windows (or chips) whose nodata fraction exceeds
``max_nodata_fraction`` are skipped: up to 10 other windows are tried, then another sample.
Before training, probed scenes are checked for valid pixels until 8 with data are found (a chip
exactly, a larger scene by its overview): scenes without a usable window are skipped with a
warning, and data where no checked scene has one stops with one line naming the files.

The main process only lists files and probes up to ``PROBE_LIMIT`` scenes (open, check bands,
read the size); rasters are read inside the DataLoader workers (each worker opens its own handles,
kept in a small per-process cache). With more scenes than ``PROBE_LIMIT`` the sizes of the
unprobed ones are unknown and each of them yields one window per epoch.

Every random choice for a sample (its window, its replacement, its crops) comes from a generator
seeded by ``(seed, epoch, index)`` (the sampler yields ``(epoch, index)`` keys), so batches do not
depend on the number of workers and a resumed run sees exactly the data an uninterrupted one does.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rasterio.windows import Window
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deo_cli.data.multicrop import MultiCrop, collate_multicrop
from deo_cli.errors import (
    BandError,
    DataError,
    GeoreferenceError,
    InputNotFoundError,
    RasterReadError,
    UnitError,
)
from deo_cli.io.env import is_remote
from deo_cli.io.raster import Scene, open_scene
from deo_cli.io.sources import RASTER_SUFFIXES
from deo_cli.io.units import conversion_factor, infer_unit
from deo_cli.sensors import band_name_from_filename

log = logging.getLogger(__name__)

#: Scenes probed in the main process (bands checked, size read); the rest are checked in workers.
PROBE_LIMIT = 1024
#: Windows tried per sample before another sample is drawn, and samples tried before giving up.
WINDOW_TRIES = 10
SAMPLE_TRIES = 50
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")

_BAND_TOKEN = re.compile(r"(?:^|[^a-z0-9])(b0?(?:1[0-2]|[1-9])a?)(?=$|[^a-z0-9])", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Finding the scenes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainSource:
    """One scene: its multispectral raster(s), an optional co-located RGB image, its probed size."""

    ms: str | tuple[str, ...]
    rgb: str | None = None
    height: int | None = None
    width: int | None = None

    @property
    def name(self) -> str:
        first = self.ms[0] if isinstance(self.ms, tuple) else self.ms
        return str(first)

    def items(self, window_size: int, windows_per_scene: int) -> int:
        """Samples per epoch: ``windows_per_scene`` for a probed scene larger than a window, else 1."""
        if self.height is None or self.width is None:
            return 1
        return windows_per_scene if max(self.height, self.width) > window_size else 1


@dataclass
class PretrainData:
    """What :func:`scan_pretrain_data` found: scenes, their unit and what was skipped."""

    sources: list[PretrainSource]
    unit: str
    unit_factor: float
    skipped: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """A short hash of the scene list (a resumed run warns when its data changed)."""
        blob = json.dumps([[s.ms, s.rgb] for s in self.sources], default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _scene_key(path: Path) -> str | None:
    """The file name without its band token (``X_B04.tif`` -> ``X_``), or None for non-band files."""
    if band_name_from_filename(path.name) is None:
        return None
    stem = path.name
    for suffix in RASTER_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    hits = list(_BAND_TOKEN.finditer(stem))
    if not hits:
        return ""  # the whole name is the band (B04.tif)
    m = hits[-1]
    return stem[: m.start(1)] + stem[m.end(1) :]


def _group_files(files: Sequence[Path]) -> list[str | tuple[str, ...]]:
    """Scenes from raster files: band files grouped by folder and prefix, others one scene each."""
    groups: dict[tuple[str, str], list[Path]] = {}
    scenes: list[str | tuple[str, ...]] = []
    for f in sorted(files):
        key = _scene_key(f)
        if key is None:
            scenes.append(str(f))
        else:
            groups.setdefault((str(f.parent), key), []).append(f)
    for (_, _), members in sorted(groups.items()):
        scenes.append(tuple(str(m) for m in members) if len(members) > 1 else str(members[0]))
    return sorted(scenes, key=lambda s: s[0] if isinstance(s, tuple) else s)


def _walk(root: Path) -> tuple[list[Path], list[str]]:
    """Raster files under ``root`` and the ``*.SAFE`` folders (each one scene)."""
    files, safes = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            if d.upper().endswith(".SAFE"):
                safes.append(str(Path(dirpath) / d))
            elif not d.startswith("."):
                keep.append(d)
        dirnames[:] = keep
        files.extend(Path(dirpath) / f for f in filenames if f.lower().endswith(RASTER_SUFFIXES))
    return files, safes


def _read_manifest(path: Path, ms_column: str, rgb_column: str) -> list[PretrainSource]:
    try:
        if path.suffix.lower() == ".csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(
            f"cannot read manifest {path}: {str(e).splitlines()[0]}",
            "give a CSV or Parquet file with one row per sample",
        ) from e
    columns = table.column_names
    if ms_column not in columns:
        raise DataError(
            f"manifest {path.name} has no column {ms_column!r} (it has {', '.join(columns) or 'none'})",
            "name the multispectral path column ms_path, or set data.ms_column",
        )
    ms = table.column(ms_column).to_pylist()
    rgb = table.column(rgb_column).to_pylist() if rgb_column in columns else [None] * len(ms)

    def resolve(p) -> str | None:
        if p is None or (isinstance(p, float) and np.isnan(p)) or str(p).strip() == "":
            return None
        p = str(p).strip()
        if is_remote(p) or Path(p).is_absolute():
            return p
        return str(path.parent / p)

    out = []
    for i, (m, r) in enumerate(zip(ms, rgb)):
        m = resolve(m)
        if m is None:
            raise DataError(
                f"manifest {path.name} row {i + 1} has no {ms_column}", "fill in every row's path"
            )
        out.append(PretrainSource(m, resolve(r)))
    return out


def list_pretrain_sources(
    data: str | os.PathLike, ms_column: str = "ms_path", rgb_column: str = "rgb_path"
) -> list[PretrainSource]:
    """The scenes named by ``--data`` (a folder, a glob or a CSV/Parquet manifest); no raster is opened."""
    text = os.fspath(data)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        sources = _read_manifest(path, ms_column, rgb_column)
    elif path.is_file():
        sources = [PretrainSource(str(path))]
    elif path.is_dir():
        if path.name.upper().endswith(".SAFE"):
            return [PretrainSource(str(path))]
        files, safes = _walk(path)
        sources = [PretrainSource(s) for s in (_group_files(files) + safes)]
        if not sources:
            raise InputNotFoundError(
                f"folder {path} holds no raster files ({', '.join(RASTER_SUFFIXES)})",
                "point --data at a folder of GeoTIFF chips, a glob or a CSV/Parquet manifest",
            )
    elif any(c in text for c in "*?["):
        hits = [Path(h) for h in sorted(globlib.glob(os.path.expanduser(text), recursive=True))]
        files = [h for h in hits if h.is_file() and h.suffix.lower() in RASTER_SUFFIXES]
        safes: list[str] = []
        for d in (h for h in hits if h.is_dir()):
            more, s = _walk(d)
            files += more
            safes += s
        sources = [PretrainSource(s) for s in (_group_files(files) + safes)]
        if not sources:
            raise InputNotFoundError(
                f"no raster files match {text!r}", "check the pattern (quote it so the shell leaves it alone)"
            )
    else:
        raise InputNotFoundError(
            f"training data {text} does not exist",
            "pass --data a folder of chips, a glob or a CSV/Parquet manifest",
        )
    if not sources:
        raise DataError(f"{text} lists no samples", "add at least one row")
    return sources


def _probe(source: PretrainSource, bands, band_names, nodata) -> tuple[PretrainSource, Scene]:
    scene = open_scene(source.ms, band_names=band_names, nodata=nodata, allow_no_crs=True)
    scene.select(bands)  # BandError when bands are missing
    return PretrainSource(source.ms, source.rgb, scene.height, scene.width), scene


def _probe_indices(n: int, limit: int) -> list[int]:
    if n <= limit:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, limit)})


def scan_pretrain_data(
    data: str | os.PathLike,
    bands: Sequence[str],
    *,
    band_names: str | None = None,
    nodata: float | None = None,
    ms_column: str = "ms_path",
    rgb_column: str = "rgb_path",
    limit: int = 0,
    seed: int = 0,
    unit: str = "auto",
    probe_limit: int = PROBE_LIMIT,
    window_size: int = 256,
    max_nodata_fraction: float = 0.5,
) -> PretrainData:
    """List the scenes, probe them and settle the unit; raise before any training on bad data.

    Raises :class:`InputNotFoundError` / :class:`RasterReadError` for a missing or unreadable path
    (including any probed file), :class:`BandError` when no probed scene has all ``bands``
    (scenes lacking them are otherwise skipped with a warning), :class:`DataError` when no probed
    scene has enough valid pixels (:func:`_too_little_data`; such scenes are otherwise skipped with
    a warning), :class:`UnitError` for values in a unit the model cannot take. ``limit`` keeps a
    random subset of that many scenes (seeded).
    """
    sources = list_pretrain_sources(data, ms_column, rgb_column)
    if limit and len(sources) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(sources), size=limit, replace=False))
        sources = [sources[i] for i in keep]
    probed = _probe_indices(len(sources), probe_limit)
    ok: dict[int, PretrainSource] = {}
    band_errors: list[tuple[int, BandError]] = []
    empty: list[tuple[int, str]] = []  # scenes without a usable window: (index, why)
    samples: list[tuple[np.ndarray, str]] = []  # valid values of bands[3:] and their dtype
    for i in probed:
        try:
            src, scene = _probe(sources[i], bands, band_names, nodata)
        except BandError as e:
            band_errors.append((i, e))
            continue
        except GeoreferenceError as e:
            raise RasterReadError(e.problem, e.fix) from e
        try:
            if len(samples) < UNIT_SCENES:  # until enough scenes with data are seen
                chip = max(scene.height, scene.width) <= window_size  # used whole: read it all
                pixels = scene.height * scene.width if chip else 64 * 64
                sample = scene.overview(list(bands), max_pixels=max(pixels, 64 * 64))
                why = _too_little_data(sample, scene, window_size, max_nodata_fraction)
                if why:
                    empty.append((i, why))
                    continue
                rest = slice(3, None) if len(bands) > 3 else slice(None)
                dtype = scene.sources[scene.select(list(bands)[rest])[0]].dtype
                samples.append((sample.data[rest][:, sample.valid].ravel(), dtype))
        finally:
            scene.close()
        ok[i] = src
    if not ok:
        if empty:
            raise _no_data_error(sources, empty, nodata, max_nodata_fraction)
        raise band_errors[0][1]
    skipped = [sources[i].name for i, _ in band_errors]
    if skipped:
        log.warning(
            "skipping %d of %d scenes that lack the bands (first: %s: %s)",
            len(skipped),
            len(probed),
            Path(skipped[0]).name,
            band_errors[0][1].problem,
        )
    if empty:
        log.warning(
            "skipping %d scene(s) without a window with at most %.0f%% nodata (first: %s: %s)",
            len(empty),
            100 * max_nodata_fraction,
            Path(sources[empty[0][0]].name).name,
            empty[0][1],
        )
        skipped += [sources[i].name for i, _ in empty]
    bad = {i for i, _ in band_errors} | {i for i, _ in empty}
    sources = [ok.get(i, s) for i, s in enumerate(sources) if i not in bad]
    found, factor = _settle_unit(unit, samples)
    log.info(
        "pretraining data: %d scenes (%d probed), unit %s%s",
        len(sources),
        len(probed),
        found,
        f" (x{factor:g} to DN)" if factor != 1 else "",
    )
    return PretrainData(sources, found, factor, skipped)


ALL_NODATA = "every pixel is nodata"
#: Scenes whose values are sampled for the unit (and checked for valid pixels before training).
UNIT_SCENES = 8


def _too_little_data(sample, scene: Scene, window_size: int, max_nodata_fraction: float) -> str | None:
    """Why no training window of ``scene`` can have at most ``max_nodata_fraction`` nodata, or None.

    ``sample`` is the scene's overview. A chip used whole (no side above ``window_size``) whose
    overview is the chip itself is judged exactly; a larger scene only when its sample holds no
    valid pixel at all (a random window would then almost never find one either).
    """
    valid = sample.valid
    if not valid.any():
        return ALL_NODATA
    chip = max(scene.height, scene.width) <= window_size
    if chip and valid.shape == (scene.height, scene.width):
        nodata = 1.0 - float(valid.mean())
        if nodata > max_nodata_fraction:
            return f"{nodata:.0%} of its pixels are nodata"
    return None


def _no_data_error(
    sources: Sequence[PretrainSource], empty: list[tuple[int, str]], nodata, max_nodata_fraction: float
) -> DataError:
    """The one line for data whose every checked scene is (mostly) nodata."""
    names = [Path(sources[i].name).name for i, _ in empty]
    what = names[0] if len(names) == 1 else f"{len(names)} scenes ({_names(names)})"
    marked = f" (data.nodata {nodata:g})" if nodata is not None else ""
    fix = (
        "check that --data names the right files and that their nodata value is right (deo inspect shows it)"
    )
    if any(why != ALL_NODATA for _, why in empty):
        fix += ", or raise data.max_nodata_fraction (--set data.max_nodata_fraction=0.8)"
    return DataError(
        f"no training window with at most {max_nodata_fraction:.0%} nodata in {what}: {empty[0][1]}{marked}",
        fix,
    )


def _names(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _settle_unit(unit: str, samples: Sequence[tuple[np.ndarray, str]]) -> tuple[str, float]:
    """DEO's statistics are in S2 DN (docs/method.md §2.3); reflectance 0-1 is scaled by 10^4.

    ``samples``: valid values of a few scenes (bands after RGB) with their data type."""
    if unit != "auto":
        return unit, conversion_factor(unit, "dn")
    values = [v for v, _ in samples]
    dtype = samples[-1][1] if samples else None
    guess = infer_unit(np.concatenate(values) if values else np.zeros(0), dtype)
    if guess.unit == "unknown":
        log.warning("could not infer the unit of the data (%s); assuming DN", guess.reason)
        return "dn", 1.0
    if guess.unit == "byte":
        raise UnitError(
            "the training data looks like 0-255 imagery but DEO's multispectral stem takes Sentinel-2 "
            "DN (reflectance x 10^4)",
            "give Sentinel-2 DN or 0-1 reflectance, or set data.unit if deo misread it",
        )
    return guess.unit, conversion_factor(guess.unit, "dn")


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (independent streams via NumPy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed) % 2**32, int(epoch), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class PretrainDataset(Dataset):
    """Multi-crop samples from :class:`PretrainSource` scenes (module docstring).

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` for epoch 0) returns
    ``{"global": [G x (C, S, S)], "local": [L x (C, s, s)], "index": index}``.

    Args:
        sources: the scenes.
        bands: band names in the model's order (DEO_S2_MANIFEST.bands).
        transform: the :class:`~deo_cli.data.multicrop.MultiCrop`.
        band_names, nodata: as for ``open_scene``.
        unit_factor: multiplies the values into the manifest's unit (10^4 for reflectance -> DN).
        window_size, windows_per_scene, max_nodata_fraction: see the module docstring.
        seed: the run's seed.
        max_open: scenes kept open per process.
    """

    def __init__(
        self,
        sources: Sequence[PretrainSource],
        bands: Sequence[str],
        transform: MultiCrop,
        *,
        band_names: str | None = None,
        nodata: float | None = None,
        unit_factor: float = 1.0,
        window_size: int = 256,
        windows_per_scene: int = 16,
        max_nodata_fraction: float = 0.5,
        seed: int = 0,
        max_open: int = 32,
    ):
        if not sources:
            raise DataError("no training scenes", "check --data")
        if window_size < 8:
            raise ValueError("window_size must be >= 8")
        self.sources = list(sources)
        self.bands = tuple(bands)
        self.transform = transform
        self.band_names = band_names
        self.nodata = nodata
        self.unit_factor = float(unit_factor)
        self.window_size = int(window_size)
        self.max_nodata_fraction = float(max_nodata_fraction)
        self.seed = int(seed)
        self.max_open = max_open
        counts = np.array([s.items(window_size, windows_per_scene) for s in self.sources], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._open: OrderedDict[int, tuple[Scene, Scene | None]] = OrderedDict()
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return int(self._ends[-1])

    def source_of(self, index: int) -> int:
        """The scene an item index belongs to."""
        return int(np.searchsorted(self._ends, index, side="right"))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # each process opens its own handles
        return state

    # -- reading ----------------------------------------------------------------------------
    def _scenes(self, si: int) -> tuple[Scene, Scene | None]:
        if si in self._open:
            self._open.move_to_end(si)
            return self._open[si]
        src = self.sources[si]
        ms = open_scene(src.ms, band_names=self.band_names, nodata=self.nodata, allow_no_crs=True)
        rgb = None
        if src.rgb is not None:
            try:
                rgb = open_scene(src.rgb, band_names="RGB", allow_no_crs=True)
            except BandError as e:
                raise BandError(
                    f"RGB image {Path(src.rgb).name} is not a 3-band image ({e.problem})",
                    "give 3-band RGB images in the rgb_path column",
                ) from e
        self._open[si] = (ms, rgb)
        while len(self._open) > self.max_open:
            _, (a, b) = self._open.popitem(last=False)
            a.close()
            if b is not None:
                b.close()
        return ms, rgb

    def _read(self, si: int, rng: np.random.Generator):
        """A window (or the whole chip) with enough valid pixels, or None."""
        ms, rgb_scene = self._scenes(si)
        h, w = ms.height, ms.width
        wh, ww = min(self.window_size, h), min(self.window_size, w)
        for _ in range(WINDOW_TRIES):
            r0 = int(rng.integers(0, h - wh + 1))
            c0 = int(rng.integers(0, w - ww + 1))
            window = Window(c0, r0, ww, wh)
            sample = ms.read(self.bands, window)
            if 1.0 - sample.valid.mean() <= self.max_nodata_fraction:
                break
            if wh == h and ww == w:
                return None  # a chip: no other window to try
        else:
            return None
        image = torch.from_numpy(sample.data)
        if self.unit_factor != 1.0:
            image = image * self.unit_factor
        valid = torch.from_numpy(sample.valid)
        rgb = None
        if rgb_scene is not None:
            rh, rw = rgb_scene.height, rgb_scene.width
            top, left = int(round(r0 / h * rh)), int(round(c0 / w * rw))
            bottom, right = int(round((r0 + wh) / h * rh)), int(round((c0 + ww) / w * rw))
            rwin = Window(left, top, max(1, right - left), max(1, bottom - top))
            rgb = torch.from_numpy(rgb_scene.read(("B04", "B03", "B02"), rwin).data)
        return image, valid, rgb

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        item = int(index)
        tried: dict[int, None] = {}  # the scenes read, in order
        for _ in range(SAMPLE_TRIES):
            si = self.source_of(item)
            tried[si] = None
            try:
                got = self._read(si, rng)
            except (InputNotFoundError, RasterReadError, BandError, GeoreferenceError) as e:
                if si not in self._warned:
                    self._warned.add(si)
                    log.warning("skipping scene %s: %s", self.sources[si].name, e.one_line())
                got = None
            if got is not None:
                break
            item = int(rng.integers(0, len(self)))  # a replacement sample
        else:
            names = [Path(self.sources[i].name).name for i in tried]
            raise DataError(
                f"found no window with at most {self.max_nodata_fraction:.0%} nodata in {SAMPLE_TRIES} "
                f"tries (in {_names(names)})",
                "check that --data names the right files and that their nodata value is right (deo inspect "
                "shows it), or raise data.max_nodata_fraction (--set data.max_nodata_fraction=0.8)",
            )
        image, valid, rgb = got
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        views = self.transform(image, gen, valid=valid, rgb_image=rgb)
        return {"global": views["global"], "local": views["local"], "index": int(index)}


# ---------------------------------------------------------------------------------------------
# Sampling and loading
# ---------------------------------------------------------------------------------------------


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)`` keys and can start mid-epoch.

    Each process gets a distinct, seeded shuffle slice of the data every epoch (``drop_last``:
    every process has the same number of samples). ``set_epoch(epoch, start)`` skips the first
    ``start`` samples of this process's slice (resuming after ``start / batch_size`` steps).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = int(start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        return iter([(self.epoch, int(i)) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def build_pretrain_loader(
    dataset: PretrainDataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader of multi-crop batches (``collate_multicrop``) over this process's shard.

    Its own generator keeps the global torch RNG untouched (exact resume); workers persist across
    epochs since the epoch travels inside the sampler's keys.
    """
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
    if sampler.num_samples < batch_size:
        raise DataError(
            f"the data gives {len(dataset)} samples, {sampler.num_samples} per process: fewer than one "
            f"batch of {batch_size}",
            "add data, raise data.windows_per_scene, or lower --batch-size",
        )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_multicrop,
        drop_last=True,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(int(seed)),
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return loader, sampler
