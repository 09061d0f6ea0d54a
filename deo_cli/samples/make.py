"""Rebuild the sample scenes shipped in this folder from ../shared/data (not needed at run time).

    python deo_cli/samples/make.py /path/to/shared/data

Each OSCD date of Paris (13 single-band Sentinel-2 L1C files at 10/20/60 m) becomes one
13-band uint16 COG on the 10 m grid: coarser bands bilinearly resampled with deo's own reader,
band descriptions B01..B12/B8A, the acquisition time and the source in the tags.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.shutil import copy as rio_copy

from deo_cli.io.raster import open_scene
from deo_cli.io.sources import SAMPLES
from deo_cli.sensors import BAND_SETS

HERE = Path(__file__).resolve().parent
SOURCES = {
    "paris-2016": "oscd_subset/images/paris/imgs_1",
    "paris-2017": "oscd_subset/images/paris/imgs_2",
}


def build(shared_data: Path) -> None:
    bands = BAND_SETS["S2_L1C"].bands
    for key, rel in SOURCES.items():
        scene = open_scene(shared_data / rel)
        sample = scene.read(bands)
        profile = {
            "driver": "GTiff",
            "dtype": "uint16",
            "count": len(bands),
            "width": scene.width,
            "height": scene.height,
            "crs": scene.crs,
            "transform": scene.transform,
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
        }
        tmp = HERE / (SAMPLES[key] + ".tmp.tif")
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(np.round(sample.data).astype("uint16"))
            for i, b in enumerate(bands, start=1):
                dst.set_band_description(i, b)
            dst.update_tags(
                TIFFTAG_DATETIME=scene.datetime.replace("-", ":").replace("T", " ").rstrip("Z"),
                SOURCE=f"OSCD (Caye Daudt et al. 2018), city paris, {rel.rsplit('/', 1)[-1]}; "
                "contains modified Copernicus Sentinel data",
                PRODUCT="Sentinel-2 L1C TOA DN (reflectance x 10^4); 20/60 m bands bilinear to 10 m",
            )
        rio_copy(
            tmp,
            HERE / SAMPLES[key],
            driver="COG",
            compress="DEFLATE",
            predictor=2,
            overview_resampling="average",
        )
        tmp.unlink()
        print(HERE / SAMPLES[key], (HERE / SAMPLES[key]).stat().st_size // 1024, "KiB")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data")
