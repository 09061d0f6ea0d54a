"""deo in Python: DEO features, class maps and change as georeferenced xarray objects.

``import deo_cli as deo`` gives (lazily: importing deo does not import torch)::

    model = deo.load_model("deo_swin_b", weights="default", device="auto")
    emb = model.embed(da)                       # xr.DataArray (band, y, x): emb_0000 ...
    emb = deo.embed("sample:paris", model=model)  # a path, STAC item, DataArray or NumPy array
    classes = deo.segment(da, "runs/seg/head.pt")
    change = deo.detect_change("sample:paris", "sample:paris-2017")  # xr.Dataset: score, mask
    emb = deo.open_embedding("emb.tif")         # what deo embed wrote (COG or Zarr)

This is a thin layer like ``deo_cli/cli/``: every function calls the core the command line
calls (:func:`deo_cli.tasks.embed.scene.embed_to_array`, ``segment``'s and ``detect-change``'s
predictors), with the same words (``layer``, ``chip_size``, ``overlap``, ``weights``, ``head``,
``polygons``) and the same :class:`~deo_cli.errors.DeoError` messages. Inputs are read window by
window through the same tiling and streaming core (:mod:`deo_cli.io.arrays` puts an array
behind the file reader's interface), so a lazy (dask) 10k x 10k array embeds in bounded memory.

Outputs carry their georeference: dims ``(band, y, x)``, coordinates from the input transform
scaled by the feature stride, ``.rio.crs`` and ``.rio.transform()`` set, nodata as NaN, and in
``attrs`` the same ``DEO_*`` tags as the COG (model, weights SHA-256, layer, stride, band
manifest, normalisation, tiling). ``emb.rio.to_raster(path)`` writes the values and
georeference of ``deo embed``'s COG.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deo_cli.errors import DeoError, UsageError
from deo_cli.io.xarrays import open_embedding
from deo_cli.recipes import (
    ChangeRecipe,
    EmbedRecipe,
    InputSection,
    ModelSection,
    RuntimeSection,
    SegmentPredictRecipe,
    TilingSection,
)

__all__ = [
    "DeoError",
    "Model",
    "detect_change",
    "embed",
    "load_model",
    "open_embedding",
    "open_input",
    "segment",
]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _input_section(bands, nodata, unit, rgb_max, allow_no_crs) -> InputSection:
    names = bands if bands is None or isinstance(bands, str) else ",".join(bands)
    return InputSection(
        band_names=names, nodata=nodata, unit=unit, rgb_max=rgb_max, allow_no_crs=allow_no_crs
    )


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "dims") and hasattr(x, "coords"))


def open_input(
    x,
    *,
    bands: Sequence[str] | str | None = None,
    transform=None,
    crs=None,
    nodata: float | None = None,
    allow_no_crs: bool = False,
):
    """A :class:`~deo_cli.io.raster.Scene` from what the API accepts: an ``xr.DataArray`` (NumPy
    or dask; band names in its ``band`` coordinate or ``bands=``), a NumPy array with ``bands=``,
    ``transform=`` and ``crs=``, a ``pystac.Item``, or a scene argument of the command line (a
    path, folder, glob, URL, ``sample:NAME``, STAC item JSON)."""
    from deo_cli.io.raster import Scene

    if isinstance(x, Scene):
        return x
    if _is_array(x):
        from deo_cli.io.arrays import array_scene

        return array_scene(
            x, bands=bands, transform=transform, crs=crs, nodata=nodata, allow_no_crs=allow_no_crs
        )
    if transform is not None or crs is not None:
        raise UsageError("transform= and crs= place a NumPy array", "a file carries its own georeference")
    if type(x).__name__ == "Item" and hasattr(x, "assets"):  # a pystac.Item
        from deo_cli.io.stac import scene_from_item

        x = scene_from_item(x)
    from deo_cli.infer.prepare import open_input as open_scene_input

    return open_scene_input(x, _input_section(bands, nodata, "auto", None, allow_no_crs))


def _coords(grid, band_names: Sequence[str]) -> dict:
    from rioxarray.rioxarray import affine_to_coords

    xy = affine_to_coords(grid.transform, grid.width, grid.height)
    return {"band": list(band_names), "y": xy["y"], "x": xy["x"]}


def _dataarray(values: np.ndarray, grid, band_names: Sequence[str], tags: dict, name: str, nodata=np.nan):
    """``values`` (bands, rows, cols) on ``grid`` as a georeferenced DataArray."""
    import rioxarray  # noqa: F401 - the .rio accessor
    import xarray as xr

    da = xr.DataArray(values, dims=("band", "y", "x"), coords=_coords(grid, band_names), name=name)
    da.attrs.update(tags)
    da.attrs["long_name"] = tuple(band_names)  # band descriptions for .rio.to_raster
    # in place: each of these copies the values otherwise (a second embedding in memory)
    if grid.crs is not None:
        da.rio.write_crs(grid.crs, inplace=True)
    da.rio.write_transform(grid.transform, inplace=True)
    return da.rio.write_nodata(nodata, encoded=False, inplace=True)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class Model:
    """A DEO encoder ready to embed (make one with :func:`load_model`).

    ``name``, ``weights`` (the URI or ``random``), ``weights_sha256``, ``layer`` (the default
    level), ``stride`` and ``channels`` (at that level), ``bands`` (what it reads, by name) and
    ``device``."""

    def __init__(self, features, recipe: EmbedRecipe):
        from deo_cli.runtime import resolve_runtime

        self.recipe = recipe
        self.runtime = resolve_runtime(recipe.runtime)
        self._features = {features.layer: features.to(self.runtime.device)}
        self.default_layer = features.layer

    def __repr__(self) -> str:
        return f"Model({self.name!r}, weights={self.weights!r}, layer={self.layer}, device={self.device})"

    @property
    def encoder(self):
        return self._features[self.default_layer].encoder

    @property
    def name(self) -> str:
        return self._features[self.default_layer].name

    @property
    def weights(self) -> str:
        return self._features[self.default_layer].weights_uri or "random"

    @property
    def weights_sha256(self) -> str | None:
        return self._features[self.default_layer].weights_sha256

    @property
    def layer(self) -> int:
        return self.default_layer

    @property
    def stride(self) -> int:
        return int(self._features[self.default_layer].stride)

    @property
    def channels(self) -> int:
        return int(self._features[self.default_layer].channels)

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self._features[self.default_layer].manifest.bands)

    @property
    def device(self) -> str:
        return str(self.runtime.device)

    def features(self, layer: str | int | None = None):
        """The :class:`~deo_cli.infer.model.EncoderFeatures` of level ``layer`` (``None`` or
        ``default``: :func:`~deo_cli.infer.model.default_embed_layer`; ``last``; an index)."""
        from deo_cli.infer.model import EncoderFeatures, resolve_layer

        level = resolve_layer(self.encoder.spec, layer)
        if level not in self._features:
            self._features[level] = EncoderFeatures(self.encoder, level).to(self.runtime.device)
        return self._features[level]

    def embed(
        self,
        x,
        *,
        layer: str | int | None = None,
        chip_size: int | None = None,
        overlap: int | None = None,
        bands: Sequence[str] | str | None = None,
        transform=None,
        crs=None,
        nodata: float | None = None,
        unit: str = "auto",
        rgb_max: float | None = None,
        allow_no_crs: bool = False,
        progress=None,
    ):
        """The dense embedding of ``x`` as an ``xr.DataArray`` ``(band, y, x)`` (see the module
        docstring); the same values as ``deo embed x -o emb.tif`` with these options.

        ``x``: see :func:`open_input`. ``layer``, ``chip_size``, ``overlap``, ``unit``,
        ``rgb_max`` and ``nodata`` mean what ``--layer``, ``--chip-size``, ``--overlap``,
        ``--unit``, ``input.rgb_max`` and ``--nodata`` mean for the command. ``progress``: a
        :class:`~deo_cli.progress.Progress` (default: none)."""
        from deo_cli.tasks.embed.scene import _capped_gdal_cache, resolve_tiling

        features = self.features(layer)
        recipe = dataclasses.replace(
            self.recipe,
            layer=str(features.layer),
            input=_input_section(bands, nodata, unit, rgb_max, allow_no_crs),
            tiling=TilingSection(chip_size=chip_size, overlap=overlap),
        )
        recipe = resolve_tiling(recipe, features)
        with _capped_gdal_cache():  # every read under the command's GDAL cache cap
            return self._embed(x, features, recipe, bands, transform, crs, nodata, unit, rgb_max, progress)

    def _embed(self, x, features, recipe, bands, transform, crs, nodata, unit, rgb_max, progress):
        from deo_cli.infer.prepare import prepare_input
        from deo_cli.tasks.embed.scene import embed_to_array

        allow_no_crs = recipe.input.allow_no_crs
        scene = open_input(
            x, bands=bands, transform=transform, crs=crs, nodata=nodata, allow_no_crs=allow_no_crs
        )
        with scene:
            inp = prepare_input(scene, features.manifest, features.rgb_manifest, unit, rgb_max)
        values, grid, tags = embed_to_array(scene, features, inp, recipe, self.runtime, progress)
        names = [f"emb_{i:04d}" for i in range(values.shape[0])]
        return _dataarray(values, grid, names, tags, "embedding")


def load_model(
    name: str = "deo_swin_b",
    weights: str = "default",
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    num_workers: int | str = "auto",
    micro_batch: int = 0,
    seed: int = 0,
) -> Model:
    """A DEO encoder (``--model``) with its ``weights`` (``default``: the official release,
    ``random``, a local file, ``hf://REPO/FILE[@REV]``, an https URL or a ``deo pretrain``
    checkpoint) on ``device`` (``auto``: a GPU when there is one). ``precision``, ``batch_size``,
    ``num_workers`` and ``micro_batch`` are the command line's runtime options; ``seed`` makes
    random weights reproducible (the command line's seed 0 by default)."""
    from deo_cli.tasks.embed.scene import build_model

    runtime = RuntimeSection(
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
        micro_batch=micro_batch,
        seed=seed,
    )
    recipe = EmbedRecipe(model=ModelSection(name=name, weights=weights), runtime=runtime)
    return Model(build_model(recipe), recipe)


def _model(model: Model | str, weights: str, device: str) -> Model:
    if isinstance(model, Model):
        return model
    return load_model(model, weights, device=device)


def embed(
    x,
    model: Model | str = "deo_swin_b",
    *,
    weights: str = "default",
    device: str = "auto",
    layer: str | int | None = None,
    chip_size: int | None = None,
    overlap: int | None = None,
    **options,
):
    """``deo embed`` for one scene, in memory: ``model`` is a :class:`Model` or a model name
    (loaded with ``weights`` on ``device``); the other options as :meth:`Model.embed`."""
    return _model(model, weights, device).embed(
        x, layer=layer, chip_size=chip_size, overlap=overlap, **options
    )


# ---------------------------------------------------------------------------------------------
# Class maps and change
# ---------------------------------------------------------------------------------------------


def _runtime_section(device: str, batch_size: int, num_workers) -> RuntimeSection:
    return RuntimeSection(device=device, batch_size=batch_size, num_workers=num_workers)


def _read_band(path: Path):
    """Band 1 of a COG deo wrote, in memory: values, grid and tags."""
    import rasterio

    from deo_cli.io.grid import Grid

    with rasterio.open(path) as ds:
        return ds.read(1), Grid(ds.crs, ds.transform, ds.width, ds.height), ds.tags(), ds.nodata


def segment(
    x,
    head: str | os.PathLike,
    *,
    weights: str | None = None,
    chip_size: int | None = None,
    overlap: int | None = None,
    bands: Sequence[str] | str | None = None,
    transform=None,
    crs=None,
    nodata: float | None = None,
    device: str = "auto",
    batch_size: int = 16,
    num_workers: int | str = "auto",
    progress=None,
):
    """``deo segment predict``: the class map of ``x`` by a head file from ``deo segment
    train`` (``head``) as an ``xr.DataArray`` ``(band, y, x)`` with one band ``class`` on the
    input grid (the class table's nodata value where the input is nodata; class names and
    values in ``attrs["DEO_CLASSES"]``)."""
    from deo_cli.data.segdata import ClassTable
    from deo_cli.infer.headfile import head_input_stem, head_manifests, load_head
    from deo_cli.infer.prepare import prepare_input
    from deo_cli.runtime import resolve_runtime
    from deo_cli.tasks.segment.predict import SegmentResult, _predict_scene, build_segment_model

    hf = load_head(head, "segment")
    table = ClassTable.from_dict(hf.classes)
    recipe = SegmentPredictRecipe(
        input=_input_section(bands, nodata, "auto", None, False),
        tiling=TilingSection(chip_size=chip_size, overlap=overlap),
        runtime=_runtime_section(device, batch_size, num_workers),
    )
    scene = open_input(x, bands=bands, transform=transform, crs=crs, nodata=nodata)
    with scene:
        inp = prepare_input(scene, *head_manifests(hf), "auto", None, stem=head_input_stem(hf, scene))
    model, _ = build_segment_model(hf, weights)
    rt = resolve_runtime(recipe.runtime)
    model = model.to(rt.device)
    with tempfile.TemporaryDirectory(prefix="deo-segment-") as tmp:
        res = SegmentResult(source=scene.name, output=Path(tmp) / "classes.tif")
        _predict_scene(res, scene, inp, None, None, hf, table, model, recipe, rt, False, progress)
        values, grid, tags, fill = _read_band(res.output)
    return _dataarray(values[None], grid, ["class"], tags, "classes", nodata=fill)


def detect_change(
    before,
    after,
    *,
    model: Model | str = "deo_swin_b",
    weights: str = "default",
    head: str | os.PathLike | None = None,
    method: str = "zero-shot",
    layer: str | int | None = None,
    threshold: float | None = None,
    percentile: float | None = None,
    threshold_method: str = "auto",
    polygons: str | os.PathLike | None = None,
    min_area: float = 0.0,
    min_pixels: int = 2,
    output_grid: str = "embedding",
    chip_size: int | None = None,
    overlap: int | None = None,
    bands: Sequence[str] | str | None = None,
    device: str = "auto",
    batch_size: int = 16,
    num_workers: int | str = "auto",
    overwrite: bool = False,
    progress=None,
):
    """``deo detect-change BEFORE AFTER``: an ``xr.Dataset`` with ``score`` (float32, NaN nodata)
    and ``mask`` (uint8: 1 change, 0 no change, 255 nodata) on one grid, ``.rio`` CRS and
    transform set; ``attrs`` hold the mode, the threshold (``threshold``, ``threshold_rule``),
    the flagged share (``changed_fraction``) and the score's ``DEO_*`` tags.

    ``before``/``after``: what :func:`open_input` accepts; two arrays must be on one grid
    (``after.rio.reproject_match(before)``), files are put on the first date's grid as by the
    command. ``model``: a :class:`Model` (its encoder and weights) or a model name; ``head``:
    a change head file (supervised; ``model`` is then the head's). ``polygons``: also write the
    change polygons there (GeoParquet ``.parquet`` or ``.gpkg``; read them with
    ``geopandas.read_file``). The other options are the command's (``--method``, ``--layer``,
    ``--threshold``, ``--percentile``, ``--threshold-method``, ``--min-area``,
    ``--min-pixels``, ``output_grid``)."""
    from deo_cli.tasks.change.predict import run_detect_change

    encoder, name, w = None, model, weights
    if isinstance(model, Model):
        encoder, name, w = model.encoder, model.name, model.weights
    recipe = ChangeRecipe(
        model=ModelSection(name=name, weights=w),
        method=method,
        layer="default" if layer is None else str(layer),
        input=_input_section(None if _is_array(before) else bands, None, "auto", None, False),
        tiling=TilingSection(chip_size=chip_size, overlap=overlap),
        threshold_method=threshold_method,
        threshold=threshold,
        percentile=percentile,
        min_area=min_area,
        min_pixels=min_pixels,
        runtime=_runtime_section(device, batch_size, num_workers),
        output_grid=output_grid,
    )
    dates = [open_input(d, bands=bands) if _is_array(d) else d for d in (before, after)]
    with tempfile.TemporaryDirectory(prefix="deo-change-") as tmp:
        result = run_detect_change(
            dates[0],
            dates[1],
            Path(tmp) / "score.tif",
            recipe,
            head=head,
            polygons=polygons,
            overwrite=overwrite,
            progress=progress,
            encoder=encoder,
        )
        score, grid, tags, _ = _read_band(result.output)
        mask, _, _, _ = _read_band(result.mask)
    return _change_dataset(score, mask, grid, tags, result)


def _change_dataset(score, mask, grid, tags, result):
    import xarray as xr

    s = _dataarray(score[None].astype(np.float32), grid, ["change_score"], tags, "score").squeeze(
        "band", drop=True
    )
    m = _dataarray(mask[None], grid, ["change"], {}, "mask", nodata=255).squeeze("band", drop=True)
    ds = xr.Dataset({"score": s, "mask": m})
    if grid.crs is not None:
        ds = ds.rio.write_crs(grid.crs)
    ds = ds.rio.write_transform(grid.transform)
    ds.attrs.update(
        {
            "mode": result.mode,
            "threshold": float(result.threshold.value),
            "threshold_rule": result.threshold.rule,
            "changed_fraction": float(result.changed_fraction),
            "polygons": str(result.polygons) if result.polygons is not None else "",
            "polygon_count": int(result.polygon_count or 0),
        }
    )
    return ds
