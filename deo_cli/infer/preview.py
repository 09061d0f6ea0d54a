"""``--preview``: a PCA-to-RGB quick-look of a dense embedding (COG or Zarr), as a PNG.

The first three principal components are fitted on a random sample of valid pixels of a
decimated read (the COG's overviews do the averaging), mapped to red, green and blue and
stretched between their 2nd and 98th percentiles. Nodata pixels are transparent. The image is
at most ``max_size`` pixels on its longest side and is read in strips, so memory stays small
even for hundreds of bands.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deo_cli.io.atomic import atomic_output

#: Bytes of embedding values read at once while rendering.
STRIP_BYTES = 64 * 1024 * 1024


class _Source:
    """Decimated, masked float reads of a COG or a Zarr embedding store."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.zarr = self.path.suffix.lower() == ".zarr"
        if self.zarr:
            from deo_cli.io.writers import import_zarr

            arr = import_zarr().open_group(str(self.path), mode="r")["embedding"]
            self.arr = arr
            self.count, self.height, self.width = arr.shape
            attrs = dict(arr.attrs)
            self.scale = attrs.get("scale_factor")
            self.offset = attrs.get("add_offset", 0.0)
            self.nodata = arr.fill_value
        else:
            import rasterio

            self.ds = rasterio.open(self.path)
            self.count, self.height, self.width = self.ds.count, self.ds.height, self.ds.width
            s, o = self.ds.scales[0], self.ds.offsets[0]
            self.scale = s if (s != 1.0 or o != 0.0) else None
            self.offset = o
            self.nodata = self.ds.nodata

    def close(self) -> None:
        if not self.zarr:
            self.ds.close()

    def read(self, out_h: int, out_w: int, row0: int = 0, rows: int | None = None) -> np.ndarray:
        """Rows ``[row0, row0 + rows)`` of the image decimated to ``out_h`` x ``out_w``:
        float32 (bands, rows, out_w) with NaN for nodata."""
        rows = out_h - row0 if rows is None else rows
        if self.zarr:
            ys = np.minimum(
                (np.arange(row0, row0 + rows) + 0.5) * self.height / out_h, self.height - 1
            ).astype(int)
            xs = np.minimum((np.arange(out_w) + 0.5) * self.width / out_w, self.width - 1).astype(int)
            raw = np.asarray(self.arr.oindex[:, ys, xs])
        else:
            from rasterio.enums import Resampling
            from rasterio.windows import Window

            fy = self.height / out_h
            win = Window(0, row0 * fy, self.width, rows * fy)
            raw = self.ds.read(out_shape=(self.count, rows, out_w), window=win, resampling=Resampling.average)
        data = raw.astype(np.float32)
        if self.nodata is not None and not (isinstance(self.nodata, float) and np.isnan(self.nodata)):
            data[raw == self.nodata] = np.nan
        if self.scale is not None:
            data = data * np.float32(self.scale) + np.float32(self.offset)
        return data


def pca_rgb_basis(samples: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C,) and the top-``k`` principal directions (C, k) of ``samples`` (N, C)."""
    mean = samples.mean(axis=0)
    _, _, vt = np.linalg.svd(samples - mean, full_matrices=False)
    basis = vt[:k].T
    if basis.shape[1] < k:  # fewer than 3 channels: repeat
        basis = np.concatenate([basis] + [basis[:, :1]] * (k - basis.shape[1]), axis=1)
    return mean, basis


def write_preview(
    path: str | os.PathLike,
    png: str | os.PathLike,
    max_size: int = 1024,
    min_size: int = 256,
    sample: int = 20000,
    seed: int = 0,
    overwrite: bool = True,
) -> Path:
    """Write the PCA-to-RGB PNG of the embedding at ``path`` (a COG or ``.zarr``) to ``png``.

    An embedding smaller than ``min_size`` on its longest side (a small scene at stride 16) is
    enlarged by a whole factor with square pixels, so each feature pixel stays visible."""
    from PIL import Image

    src = _Source(Path(path))
    try:
        f = max(1.0, max(src.height, src.width) / max_size)
        out_h, out_w = max(1, round(src.height / f)), max(1, round(src.width / f))
        # fit on a small decimated read
        g = max(1.0, max(out_h, out_w) / 256)
        fit = src.read(max(1, round(out_h / g)), max(1, round(out_w / g)))
        px = fit.reshape(src.count, -1).T
        px = px[np.isfinite(px).all(axis=1)]
        rgba = np.zeros((out_h, out_w, 4), np.uint8)
        if len(px) >= 2:
            rng = np.random.default_rng(seed)
            if len(px) > sample:
                px = px[rng.choice(len(px), sample, replace=False)]
            mean, basis = pca_rgb_basis(px.astype(np.float64))
            proj = (px - mean) @ basis
            lo, hi = np.percentile(proj, 2, axis=0), np.percentile(proj, 98, axis=0)
            span = np.where(hi > lo, hi - lo, 1.0)
            strip = max(1, int(STRIP_BYTES // max(1, src.count * out_w * 4)))
            for r0 in range(0, out_h, strip):
                k = min(strip, out_h - r0)
                block = src.read(out_h, out_w, r0, k)  # (C, k, out_w)
                v = block.reshape(src.count, -1).T
                ok = np.isfinite(v).all(axis=1)
                rgb = np.zeros((v.shape[0], 3))
                rgb[ok] = ((v[ok] - mean) @ basis - lo) / span
                rgba[r0 : r0 + k, :, :3] = (np.clip(rgb, 0, 1) * 255).astype(np.uint8).reshape(k, out_w, 3)
                rgba[r0 : r0 + k, :, 3] = np.where(ok, 255, 0).reshape(k, out_w)
    finally:
        src.close()
    up = max(1, min_size // max(out_h, out_w))
    if up > 1:
        rgba = np.repeat(np.repeat(rgba, up, axis=0), up, axis=1)
    with atomic_output(png, overwrite=overwrite) as tmp:
        Image.fromarray(rgba, mode="RGBA").save(tmp, format="PNG")
    return Path(png)
