"""Zero-shot change between two dates of Paris (OSCD), with the changed areas as polygons.

    python examples/change_paris.py -o change.tif --polygons change.parquet

``deo.detect_change`` returns an ``xr.Dataset`` with the change ``score`` (cosine distance of
DEO features, NaN nodata) and the thresholded ``mask`` (1 change, 0 none, 255 nodata) on one
grid; ``polygons=`` also writes the mask's change regions (GeoParquet, the scene's CRS).
"""

from __future__ import annotations

import argparse

import geopandas as gpd

import deo_cli as deo


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", nargs="?", default="sample:paris")
    p.add_argument("after", nargs="?", default="sample:paris-2017")
    p.add_argument("-o", "--output", default="change.tif", help="the change score (GeoTIFF)")
    p.add_argument("--polygons", default="change.parquet", help="change polygons (.parquet or .gpkg)")
    p.add_argument("--model", default="deo_swin_b")
    p.add_argument("--weights", default="default")
    p.add_argument("--chip-size", type=int, default=None)
    args = p.parse_args(argv)

    model = deo.load_model(args.model, weights=args.weights)
    change = deo.detect_change(
        args.before, args.after, model=model, polygons=args.polygons, chip_size=args.chip_size
    )
    change.score.rio.to_raster(args.output)
    polygons = gpd.read_parquet(args.polygons)
    print(
        f"threshold {change.attrs['threshold']:.4g} ({change.attrs['threshold_rule']}): "
        f"{change.attrs['changed_fraction']:.2%} changed, {len(polygons)} polygons in {polygons.crs}"
    )
    for _, row in polygons.sort_values("area", ascending=False).head(5).iterrows():
        print(f"  {row['pixels']:6d} px  area {row['area']:.3g}  score mean {row['score_mean']:.3f}")
    return change, polygons


if __name__ == "__main__":
    main()
