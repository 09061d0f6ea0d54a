"""Embed a scene with DEO and cluster its features into a land-cover map (k-means).

    python examples/embed_kmeans.py sample:paris -o paris_clusters.tif --k 6

The embedding is an ``xr.DataArray`` (band, y, x) on the scene's grid scaled by the feature
stride (16 for the default level), so the cluster map is georeferenced like the embedding.
Any DataArray works as the scene too, e.g. a lazy one:
``rioxarray.open_rasterio("scene.tif", chunks={"x": 2048, "y": 2048})``.
"""

from __future__ import annotations

import argparse

import numpy as np
import xarray as xr

import deo_cli as deo


def kmeans(x: np.ndarray, k: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means on the rows of ``x`` (scikit-learn's ``KMeans`` does the same)."""
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(len(x), size=k, replace=False)]
    for _ in range(iterations):
        labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
    return labels


def cluster_map(emb: xr.DataArray, k: int, seed: int = 0) -> xr.DataArray:
    """One cluster per embedding pixel (255 where the embedding is nodata), on its grid."""
    c, h, w = emb.shape
    x = emb.values.reshape(c, -1).T
    valid = np.isfinite(x).all(1)
    x = x[valid] / np.linalg.norm(x[valid], axis=1, keepdims=True)  # cosine geometry
    classes = np.full(h * w, 255, np.uint8)
    classes[valid] = kmeans(x, k, seed=seed)
    out = xr.DataArray(
        classes.reshape(h, w), dims=("y", "x"), coords={"y": emb.y, "x": emb.x}, name="cluster"
    )
    out = out.rio.write_crs(emb.rio.crs).rio.write_transform(emb.rio.transform())
    return out.rio.write_nodata(255, encoded=False)


def main(argv=None) -> xr.DataArray:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scene", nargs="?", default="sample:paris", help="a raster, sample:NAME, STAC item...")
    p.add_argument("-o", "--output", default="clusters.tif", help="the cluster map (GeoTIFF)")
    p.add_argument("--k", type=int, default=6, help="clusters")
    p.add_argument("--model", default="deo_swin_b")
    p.add_argument("--weights", default="default")
    p.add_argument("--chip-size", type=int, default=None)
    args = p.parse_args(argv)

    model = deo.load_model(args.model, weights=args.weights)
    emb = model.embed(args.scene, chip_size=args.chip_size)
    print(f"embedding {dict(emb.sizes)} at stride {emb.attrs['DEO_STRIDE']}, {emb.rio.crs}")
    clusters = cluster_map(emb, args.k)
    clusters.rio.to_raster(args.output)
    counts = np.bincount(clusters.values[clusters.values != 255].ravel(), minlength=args.k)
    print(f"{args.output}: {args.k} clusters, shares " + ", ".join(f"{c / counts.sum():.0%}" for c in counts))
    return clusters


if __name__ == "__main__":
    main()
