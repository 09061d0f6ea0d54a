"""What ``segment predict`` and ``detect-change`` share on top of the streaming runner.

- :func:`aligned_plan`: chips whose size and overlap are multiples of the encoder's coarsest
  stride (32 for Swin), so every chip starts on the encoder's coarsest grid and overlapping
  chips partition the ground into the same patches and windows; the *output* stride is free
  (1 for maps at the input resolution, 16 for a stage-3 score).
- :class:`DenseHeadModel`: an encoder + head module as a
  :class:`~deo_cli.infer.model.FeatureModel` at stride 1 (logits at the input resolution).
- :class:`CogSink`: finished rows into a COG (tiled temporary GeoTIFF, then the COG driver,
  renamed into place), optionally with a GDAL colour table; :class:`ArraySink`: rows into an
  in-memory array (notebooks, benchmarks).
- :func:`gdal_tags`: provenance metadata as GDAL tags (upper-case keys, JSON values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from deo_cli.errors import UsageError
from deo_cli.infer.model import copy_encoder_facts
from deo_cli.infer.tiling import TilePlan, resolve_overlap, round_up
from deo_cli.io.grid import Grid
from deo_cli.io.writers import RasterLayout, StreamingRasterWriter

log = logging.getLogger(__name__)


def aligned_plan(
    height: int, width: int, chip_size: int, out_stride: int, align: int, overlap: int | None = None
) -> TilePlan:
    """A dense plan (``pad_start=True``) with chip size and overlap multiples of ``align``.

    ``overlap`` defaults to a quarter of the chip, rounded up to ``align`` (and down below half
    the chip); a given one is rounded up to ``align`` with a warning, and refused when that
    reaches half the chip (:func:`~deo_cli.infer.tiling.resolve_overlap`). Raises
    :class:`UsageError` for a chip that is not a multiple of ``align``.
    """
    if chip_size % align:
        raise UsageError(
            f"--chip-size {chip_size} is not a multiple of the encoder's coarsest stride {align}",
            f"use {round_up(chip_size, align)}",
        )
    if chip_size % out_stride:
        raise UsageError(
            f"--chip-size {chip_size} is not a multiple of the output stride {out_stride}",
            f"use {round_up(chip_size, max(align, out_stride))}",
        )
    o = resolve_overlap(chip_size, align, overlap)
    if overlap is not None and o != overlap:
        _warn_rounded_overlap(int(overlap), o, align)
    return TilePlan(height, width, chip_size, o, out_stride, pad_start=True)


def with_used_overlap(recipe, plan: TilePlan):
    """``recipe`` with ``tiling.overlap`` set to ``plan``'s where an asked overlap was rounded
    (:func:`aligned_plan` warned): the saved recipe and its hash record what was used."""
    t = recipe.tiling
    if t.overlap is None or t.overlap == plan.overlap:
        return recipe
    return dataclasses.replace(recipe, tiling=dataclasses.replace(t, overlap=plan.overlap))


@functools.cache
def _warn_rounded_overlap(asked: int, used: int, align: int) -> None:
    """Once per run and value (a command plans each scene)."""
    log.warning(
        "--overlap %d rounded up to %d px, a multiple of the encoder's coarsest stride %d", asked, used, align
    )


class DenseHeadModel(nn.Module):
    """A module mapping ``(B, bands, C, C)`` to logits ``(B, K, C, C)``, as a FeatureModel."""

    def __init__(self, module: nn.Module, encoder, channels: int, name: str = ""):
        super().__init__()
        self.module = module.eval()
        self.name = name or getattr(encoder, "name", "deo")
        self.stride = 1
        self.channels = int(channels)
        self.align = int(max(encoder.feature_strides))
        copy_encoder_facts(self, encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def gdal_tags(meta: Mapping) -> dict[str, str]:
    """``{"deo_model": ...}`` -> ``{"DEO_MODEL": "..."}`` (JSON for anything but strings)."""
    out = {}
    for k, v in meta.items():
        if v is None:
            continue
        out[str(k).upper()] = v if isinstance(v, str) else json.dumps(v, default=str)
    return out


class CogSink(StreamingRasterWriter):
    """Rows into a COG at ``path``; ``finish()`` writes it (with ``colormap`` on band 1).

    Checks ``path`` (exists without ``overwrite`` -> :class:`OutputExistsError`) on creation.
    ``abort()`` removes the temporary file (class maps and change scores do not resume).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        grid: Grid,
        layout: RasterLayout,
        block_rows: int = 16,
        colormap: Mapping[int, tuple] | None = None,
        overwrite: bool = False,
    ):
        super().__init__(path, grid, layout, block_rows, overwrite=overwrite, colormap=colormap)

    def abort(self, keep: bool = False) -> None:
        with contextlib.suppress(Exception):  # never hide the error that made the caller abort
            super().abort(keep=keep)


class ArraySink:
    """Rows into an in-memory ``(channels, height, width)`` float32 array (NaN = nodata)."""

    def __init__(self, channels: int, height: int, width: int, block_rows: int = 16):
        self.block_rows = block_rows
        self.array = np.full((channels, height, width), np.nan, np.float32)

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        self.array[:, row0 : row0 + data.shape[1]] = data


__all__ = ["ArraySink", "CogSink", "DenseHeadModel", "aligned_plan", "gdal_tags", "with_used_overlap"]
