"""deo: georeferenced features, maps and benchmarks from multispectral EO rasters with DEO.

DEO is the dual-teacher distillation method of Wolf, Rolih and Čehovin Zajc (CVPR 2026,
arXiv 2602.19863). This package holds one shared core (models, losses, raster I/O, tiling)
behind the ``deo`` command line and a small Python API over xarray (:mod:`deo_cli.api`)::

    import deo_cli as deo
    model = deo.load_model("deo_swin_b", weights="default", device="auto")
    emb = model.embed(da)  # an xr.DataArray (band, y, x) with .rio CRS and transform

The API's names are loaded on first use (``import deo_cli`` stays cheap: no torch).
"""

__version__ = "0.1.0.dev0"

#: The Python API (deo_cli/api.py), imported when one of these names is first used.
_API = (
    "DeoError",
    "Model",
    "detect_change",
    "embed",
    "load_model",
    "open_embedding",
    "open_input",
    "segment",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from deo_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'deo_cli' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
