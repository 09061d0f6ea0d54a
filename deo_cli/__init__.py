"""deo: georeferenced features, maps and benchmarks from multispectral EO rasters with DEO.

DEO is the dual-teacher distillation method of Wolf, Rolih and Čehovin Zajc (CVPR 2026,
arXiv 2602.19863). This package holds one shared core (models, losses, raster I/O, tiling)
behind the ``deo`` command line.
"""

__version__ = "0.1.0.dev0"
