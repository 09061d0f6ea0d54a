"""``--preview`` PNGs of class masks and change maps.

- :func:`write_class_preview`: the class COG decimated (nearest: no invented classes) and
  coloured with its own colour table; nodata transparent.
- :func:`write_change_preview`: three panels side by side: the first date in true colour, the
  second date (on the first date's grid) in true colour, and the second date with the change
  mask overlaid in red. True colour is red, green, blue (Sentinel-2 B04, B03, B02) stretched
  between the 2nd and 98th percentiles of each date's valid pixels.

At most ``max_size`` pixels on the longest side of each panel; reads are decimated, so memory
stays small for any scene size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from deo_cli.errors import BandError
from deo_cli.io.atomic import atomic_output

RGB_CANDIDATES = (("B04", "B03", "B02"), ("red", "green", "blue"))


def _size(height: int, width: int, max_size: int) -> tuple[int, int]:
    f = max(1.0, max(height, width) / max_size)
    return max(1, round(height / f)), max(1, round(width / f))


def true_colour(scene, height: int, width: int) -> np.ndarray:
    """``(height, width, 4)`` uint8 RGBA quick-look of ``scene`` (nodata transparent)."""
    bands = None
    for cand in RGB_CANDIDATES:
        try:
            scene.select(cand)
            bands = cand
            break
        except BandError:
            continue
    if bands is None:
        bands = (scene.band_names[0],) * 3
    ov = scene.overview(list(dict.fromkeys(bands)), max_pixels=height * width)
    data = ov.data[[list(dict.fromkeys(bands)).index(b) for b in bands]]
    valid = ov.valid
    rgba = np.zeros((*valid.shape, 4), np.uint8)
    if valid.any():
        lo, hi = np.percentile(data[:, valid], [2, 98], axis=1)
        span = np.where(hi > lo, hi - lo, 1.0)
        v = np.clip((data - lo[:, None, None]) / span[:, None, None], 0, 1)
        rgba[..., :3] = (v.transpose(1, 2, 0) * 255).astype(np.uint8)
        rgba[..., 3] = np.where(valid, 255, 0)
    return _resize(rgba, height, width)


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    if img.shape[:2] == (height, width):
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((width, height), Image.NEAREST))


def _read_band(path: str | os.PathLike, height: int, width: int) -> tuple[np.ndarray, object, dict]:
    with rasterio.open(path) as ds:
        arr = ds.read(1, out_shape=(height, width), resampling=Resampling.nearest)
        nodata = ds.nodata
        try:
            cmap = ds.colormap(1)
        except ValueError:
            cmap = {}
    return arr, nodata, cmap


def write_class_preview(
    mask_path: str | os.PathLike, png: str | os.PathLike, max_size: int = 1024, overwrite: bool = False
) -> Path:
    """The class mask coloured by its colour table (see the module docstring)."""
    from PIL import Image

    with rasterio.open(mask_path) as ds:
        h, w = _size(ds.height, ds.width, max_size)
    arr, nodata, cmap = _read_band(mask_path, h, w)
    lut = np.zeros((int(arr.max()) + 1 if arr.size else 1, 4), np.uint8)
    for v, c in cmap.items():
        if v < len(lut):
            lut[v] = c
    rgba = lut[arr]
    if nodata is not None:
        rgba[arr == nodata] = 0
    with atomic_output(png, overwrite=overwrite) as tmp:
        Image.fromarray(rgba, mode="RGBA").save(tmp, format="PNG")
    return Path(png)


def write_change_preview(
    before,
    after,
    mask_path: str | os.PathLike,
    png: str | os.PathLike,
    max_size: int = 768,
    overwrite: bool = False,
    gap: int = 8,
) -> Path:
    """Before | after | after with the change mask in red (see the module docstring)."""
    from PIL import Image

    h, w = _size(before.height, before.width, max_size)
    a = true_colour(before, h, w)
    b = true_colour(after, h, w)
    mask, nodata, _ = _read_band(mask_path, h, w)
    changed = (mask == 1) & (mask != nodata if nodata is not None else True)
    over = b.copy()
    alpha = 0.6
    over[changed, :3] = (alpha * np.array([255, 0, 0]) + (1 - alpha) * over[changed, :3]).astype(np.uint8)
    over[changed, 3] = 255
    canvas = np.zeros((h, 3 * w + 2 * gap, 4), np.uint8)
    for i, panel in enumerate((a, b, over)):
        canvas[:, i * (w + gap) : i * (w + gap) + w] = panel
    with atomic_output(png, overwrite=overwrite) as tmp:
        Image.fromarray(canvas, mode="RGBA").save(tmp, format="PNG")
    return Path(png)


__all__ = ["true_colour", "write_change_preview", "write_class_preview"]
