"""A raster grid (CRS + transform + size) and the georeferenced sample every read returns.

Georeferencing travels with every array (docs/design.md §7.3, habit 3): a read returns a
:class:`RasterSample` with its pixels, a valid mask, the window's transform and the CRS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import transform as window_transform


@dataclass(frozen=True)
class Grid:
    """A pixel grid: CRS (or ``None`` for a raster without georeference), transform, size."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size (x, y) in CRS units (positive numbers)."""
        t = self.transform
        return (math.hypot(t.a, t.d), math.hypot(t.b, t.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        t = self.transform
        xs = [
            t.c,
            t.c + t.a * self.width,
            t.c + t.b * self.height,
            t.c + t.a * self.width + t.b * self.height,
        ]
        ys = [
            t.f,
            t.f + t.d * self.width,
            t.f + t.e * self.height,
            t.f + t.d * self.width + t.e * self.height,
        ]
        return (min(xs), min(ys), max(xs), max(ys))

    def window_transform(self, window: Window) -> Affine:
        return window_transform(window, self.transform)

    def scaled(self, factor: int) -> Grid:
        """The grid of a feature map with stride ``factor``: transform scaled, size ceil-divided.

        The feature pixel (i, j) covers input pixels [i*f, (i+1)*f) x [j*f, (j+1)*f), so its
        transform is ``transform @ Affine.scale(f)`` exactly (docs/design.md §4).
        """
        return Grid(
            self.crs,
            self.transform @ Affine.scale(factor),
            -(-self.width // factor),
            -(-self.height // factor),
        )

    def same_as(self, other: Grid, tol: float = 1e-9) -> bool:
        """Same CRS, same size and the same transform (within ``tol`` of a pixel)."""
        if (self.width, self.height) != (other.width, other.height):
            return False
        if (self.crs is None) != (other.crs is None):
            return False
        if self.crs is not None and self.crs != other.crs:
            return False
        a, b = self.transform, other.transform
        px = max(self.res) or 1.0
        return all(abs(x - y) <= tol * px for x, y in zip(a[:6], b[:6]))


@dataclass
class RasterSample:
    """Pixels of a window with everything needed to put them back on a map.

    ``data`` is float32 (bands, rows, cols) in the order of ``band_names``; ``valid`` is a
    (rows, cols) boolean mask (False where any selected band is nodata, NaN or outside the
    scene); ``transform`` maps the window's pixels to ``crs`` coordinates.
    """

    data: np.ndarray
    valid: np.ndarray
    transform: Affine
    crs: CRS | None
    band_names: tuple[str, ...]
    window: Window

    @property
    def grid(self) -> Grid:
        return Grid(self.crs, self.transform, self.data.shape[-1], self.data.shape[-2])
