"""Masks to polygons, written as GeoParquet or GeoPackage in the source CRS.

:func:`polygonize` vectorises the ``True`` pixels of a mask (8-connected regions, through
``rasterio.features.shapes``) with the grid's transform, so coordinates are in the raster's
CRS. Each polygon gets an ``id``, its ``area`` (CRS units squared), ``area_m2`` (square metres:
geodesic on the CRS's ellipsoid for a geographic CRS), its ``pixels`` and, given a
score raster, the mean and max score over its pixels (regions are rasterised back once to a
label image, then summed with ``np.bincount``). :func:`write_vectors` writes GeoParquet
(``.parquet``, the default) or GeoPackage (``.gpkg``) atomically; GeoJSON only in WGS84 (RFC 7946).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from rasterio import features
from shapely.geometry import shape

from deo_cli.errors import UsageError
from deo_cli.io.atomic import atomic_output
from deo_cli.io.grid import Grid

VECTOR_FORMATS = {
    ".parquet": "parquet",
    ".geoparquet": "parquet",
    ".gpkg": "GPKG",
    ".fgb": "FlatGeobuf",
    ".geojson": "GeoJSON",
}


def polygonize(
    mask: np.ndarray,
    grid: Grid,
    score: np.ndarray | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    valid: np.ndarray | None = None,
    min_pixels: int = 0,
) -> gpd.GeoDataFrame:
    """Polygons of the ``True`` pixels of ``mask`` on ``grid`` (CRS and transform of the raster).

    ``min_area`` drops polygons smaller than that (CRS units squared), ``min_pixels`` those of
    fewer pixels (8-connected regions); ``simplify`` applies a topology-preserving
    simplification with that tolerance (CRS units); ``valid`` excludes pixels (e.g. nodata)
    from the mask first.
    """
    m = np.asarray(mask, dtype=bool)
    if m.shape != grid.shape:
        raise ValueError(f"mask shape {m.shape} does not match the grid {grid.shape}")
    if valid is not None:
        m = m & np.asarray(valid, bool)
    geoms = [
        shape(g)
        for g, v in features.shapes(m.astype(np.uint8), mask=m, transform=grid.transform, connectivity=8)
        if v == 1
    ]
    columns = ["id", "area", "area_m2", "pixels", "score_mean", "score_max"]
    if not geoms:
        return gpd.GeoDataFrame({c: [] for c in columns}, geometry=[], crs=grid.crs)
    labels = features.rasterize(
        ((g, i + 1) for i, g in enumerate(geoms)),
        out_shape=grid.shape,
        transform=grid.transform,
        fill=0,
        dtype="int32",
        all_touched=False,
    )
    labels[~m] = 0
    n = len(geoms) + 1
    pixels = np.bincount(labels.ravel(), minlength=n)[1:]
    if score is not None:
        s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0)
        sums = np.bincount(labels.ravel(), weights=s.ravel(), minlength=n)[1:]
        mean = np.divide(sums, pixels, out=np.full(len(geoms), np.nan), where=pixels > 0)
        maxes = np.full(n, -np.inf)
        np.maximum.at(maxes, labels.ravel(), s.ravel())
        smax = maxes[1:]
    else:
        mean = smax = np.full(len(geoms), np.nan)
    gdf = gpd.GeoDataFrame(
        {
            "id": np.arange(1, len(geoms) + 1, dtype=np.int64),
            "pixels": pixels.astype(np.int64),
            "score_mean": mean.astype(np.float32),
            "score_max": smax.astype(np.float32),
        },
        geometry=geoms,
        crs=grid.crs,
    )
    if simplify > 0:
        gdf["geometry"] = gdf.geometry.simplify(simplify, preserve_topology=True)
    gdf["area"] = shapely.area(np.asarray(gdf.geometry.values))  # CRS units (no geographic warning)
    if min_area > 0 or min_pixels > 1:
        gdf = gdf[(gdf["area"] >= min_area) & (gdf["pixels"] >= min_pixels)].reset_index(drop=True)
        gdf["id"] = np.arange(1, len(gdf) + 1, dtype=np.int64)
    gdf["area_m2"] = area_m2(gdf.geometry, grid.crs)
    return gdf[[*columns, "geometry"]]


def area_m2(geoms, crs) -> np.ndarray:
    """Areas in square metres: geodesic (pyproj ``Geod`` on the CRS's ellipsoid) for a geographic
    CRS, planar area times the squared linear unit otherwise (NaN without a CRS)."""
    import pyproj

    if crs is None:
        return np.full(len(geoms), np.nan)
    c = pyproj.CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    if c.is_geographic:
        geod = c.get_geod()
        return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in geoms], dtype=np.float64)
    factor = c.axis_info[0].unit_conversion_factor if c.axis_info else 1.0
    return shapely.area(np.asarray(geoms.values)).astype(np.float64) * factor**2


def vector_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in VECTOR_FORMATS:
        raise UsageError(
            f"cannot tell the vector format of {Path(path).name}",
            f"end the file name with one of {', '.join(VECTOR_FORMATS)}",
        )
    return VECTOR_FORMATS[suffix]


def write_vectors(
    gdf: gpd.GeoDataFrame,
    path: str | os.PathLike,
    overwrite: bool = False,
    metadata: dict | None = None,
) -> Path:
    """Write ``gdf`` atomically as GeoParquet (ZSTD, bbox covering) or GPKG/FlatGeobuf/GeoJSON.

    ``metadata`` goes into the GeoParquet file metadata under the key ``deo`` (JSON) or, for
    GPKG, into the layer description.
    """
    fmt = vector_format(path)
    if fmt == "GeoJSON" and gdf.crs is not None and gdf.crs.to_epsg() != 4326:
        raise UsageError(
            "GeoJSON must be in WGS84 (RFC 7946) but these polygons are in " + gdf.crs.to_string(),
            "write .parquet or .gpkg to keep the source CRS",
        )
    with atomic_output(path, overwrite=overwrite) as tmp:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            gdf.to_parquet(tmp, compression="zstd", write_covering_bbox=True, schema_version="1.1.0")
            if metadata:
                table = pq.read_table(tmp)
                meta = dict(table.schema.metadata or {})
                meta[b"deo"] = json.dumps(metadata, default=str).encode()
                pq.write_table(table.replace_schema_metadata(meta), tmp, compression="zstd")
        else:
            kw = (
                {"layer_options": {"DESCRIPTION": json.dumps(metadata, default=str)}}
                if metadata and fmt == "GPKG"
                else {}
            )
            layer = "".join(c if c.isalnum() or c == "_" else "_" for c in Path(path).stem) or "features"
            if fmt == "GeoJSON":
                gdf.to_file(tmp, driver=fmt)
            else:
                gdf.to_file(tmp, driver=fmt, layer=layer, **kw)
    return Path(path)
