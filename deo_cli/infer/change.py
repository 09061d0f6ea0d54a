"""``deo detect-change``: change scores, masks and polygons from two dates of DEO features.

:func:`run_detect_change` is what the command line calls (a notebook can too)::

    result = run_detect_change("before.tif", "after.tif", "change.tif", ChangeRecipe())

**Two dates on one grid.** The first date's grid is the output grid. The second date is
opened natively first and its footprint compared with the first's in the first date's CRS
(:func:`check_overlap`): scenes that do not overlap fail with one line before any compute.
Then it is read on the first date's grid (:func:`~deo_cli.io.raster.open_scene` with
``grid=``: a GDAL ``WarpedVRT``, ``input.resampling``, bilinear by default), so pairs in
different CRSs or resolutions work; pixels outside the second date are nodata.

**Reading in lockstep.** :class:`PairChipReader` reads each chip of one tile plan from both
dates (each with its own unit conversion and RGB scale, :mod:`deo_cli.infer.prepare`) and
concatenates them along the band axis, so the shared streaming runner
(:func:`~deo_cli.infer.runner.run_dense`) drives both dates as one input. A location is nodata
when either date's footprint there is more than ``tiling.max_nodata_fraction`` nodata.

**Zero-shot score (default)** (:class:`CosineChange`): ``1 - cos(f_before, f_after)`` per
location of the DEO features, in [0, 2], averaged over the chosen levels (coarser levels'
distances bilinearly resized to the finest level's grid). ``--layer`` picks one level or a
comma-separated list. **Default levels** (:func:`default_change_layers`): for hierarchical
encoders (Swin) every level from the first up to ``deo embed``'s level
(:func:`~deo_cli.infer.model.default_embed_layer`, stage 3), i.e. stages 1-3 at strides 4, 8
and 16, scored on the stride-4 grid; for single-stride encoders (ViT) ``deo embed``'s level.
Why: OSCD's changes are often a few 10 m pixels, and a stride-16 (160 m) grid is too coarse
for them. Measured on the OSCD subset (``benchmarks/results/oscd_change*.json``,
leave-one-city-out, deo_swin_test, Otsu threshold): stage 3 alone fell below the trivial
"everything changed" F1 on paris (0.0041 against 0.0057) and matched it on bordeaux, while
stages 1-3 beat it in all four cities with random and with pretrained weights (pooled F1 0.0375
pretrained, against 0.0298 for stage 3 alone). The score is written on the finest level's grid
(``output_grid: embedding``: transform = input transform scaled by its stride, 4 for the Swin
default, so each score pixel sits over the input pixels it describes), or bilinearly upsampled
inside each chip to the input grid (``output_grid: input``). Scores of overlapping chips are
blended with the runner's weights.

**Supervised score** (``--head`` from :func:`run_change_train`, :class:`SiameseChange`): one
encoder on both dates, per level ``|f1 - f2|`` (or ``[f1, f2]``) into a UPerNet head whose
logits are upsampled to the chip and, by default, refined at full resolution by a small
convolutional branch on the normalised input's ``[|x1 - x2|, (x1 + x2) / 2]``
(:class:`PixelDiffHead`, ``pixel_channels``; changes are often a few pixels, finer than any
encoder level); blended logits -> softmax -> ``P(change)`` on the input grid.

**Threshold** (:mod:`deo_cli.infer.threshold`): Otsu on the valid scores (zero-shot default),
``--threshold`` or ``--percentile``; with a head, the threshold stored in the head file
(:func:`transfer_threshold`: the F1-best threshold on its validation chips, pulled toward 0.5
by ``threshold_shrink``, fully by default). ``score > threshold`` is change.

**Outputs** (each written atomically, none left behind on failure):

- score COG (``-o``): float32, NaN nodata, average overviews, band ``change_score``;
- mask COG (``--mask``, default ``<stem>_mask.tif``): uint8, 1 change, 0 no change, 255
  nodata, colour table (change red, no change black, nodata transparent), mode overviews;
- ``--polygons``: GeoParquet/GPKG of the mask's 8-connected change regions in the source CRS
  with ``area`` (CRS units²), ``pixels``, ``score_mean``, ``score_max``; ``--min-area`` drops
  small ones; metadata in the file (key ``deo``);
- ``--preview``: before | after | after with the change in red;
- ``<stem>.recipe.yaml``: the resolved recipe.

Tags on both COGs: mode (zero-shot/supervised), score definition, layers, stride, model,
weights and checksum, head, both dates' sources, band manifest, normalisation of each date,
tiling, threshold (value, method), recipe hash, deo version.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from torch import nn

from deo_cli import __version__
from deo_cli.data.segdata import IGNORE, ArrayLabels, ClassInfo, ClassTable
from deo_cli.errors import DataError, GeoreferenceError, UsageError, WeightsError
from deo_cli.infer.chips import ChipReader, ChipSample
from deo_cli.infer.cva import CVA_CHIP, CvaChange, same_scale
from deo_cli.infer.dense import (
    ArraySink,
    CogSink,
    DenseHeadModel,
    aligned_plan,
    gdal_tags,
    with_used_overlap,
)
from deo_cli.infer.headfile import (
    HeadFile,
    build_head_module,
    check_run_folder,
    encoder_record,
    encoder_state_for,
    head_input_stem,
    head_manifests,
    load_head,
    load_head_encoder,
    make_head,
    trainable_to_head_file,
    write_run_folder,
)
from deo_cli.infer.model import (
    copy_encoder_facts,
    default_embed_layer,
    forward_level,
    forward_levels,
    resolve_layer,
)
from deo_cli.infer.prepare import InputPlan, open_input, prepare_input
from deo_cli.infer.runner import block_rows_for, run_dense
from deo_cli.infer.threshold import (
    DEFAULT_METHOD,
    ScoreHistogram,
    Threshold,
    choose_threshold,
    implausible,
)
from deo_cli.infer.tiling import check_chip_memory, resolve_overlap
from deo_cli.infer.trainchips import (
    LabelledChips,
    cache_frozen_inputs,
    collect_chips,
    make_loader,
    training_plan,
)
from deo_cli.io.atomic import check_output, outputs_locked
from deo_cli.io.grid import Grid
from deo_cli.io.raster import Scene
from deo_cli.io.writers import RasterLayout
from deo_cli.metrics import binary_scores
from deo_cli.progress import NullProgress, Progress
from deo_cli.recipes import (
    ChangeRecipe,
    ChangeTrainRecipe,
    recipe_hash,
    recipe_path_for,
    recipe_to_dict,
    save_recipe,
)
from deo_cli.runtime import precision_name, resolve_runtime, seed_everything
from deo_cli.train.supervised import FitSettings, FrozenEncoderSegmenter, fit_dense, image_forward

log = logging.getLogger(__name__)

MASK_NODATA = 255
MASK_COLORMAP = {0: (0, 0, 0, 255), 1: (255, 0, 0, 255), MASK_NODATA: (0, 0, 0, 0)}
CHANGE_CLASSES = ClassTable(
    (ClassInfo(0, "no change", (0, 0, 0)), ClassInfo(1, "change", (255, 0, 0))), (), MASK_NODATA
)


# ---------------------------------------------------------------------------------------------
# Two dates on one grid
# ---------------------------------------------------------------------------------------------


def _fmt_bounds(b) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"


def check_overlap(
    before: Grid, after: Grid, before_name: str = "first date", after_name: str = "second date"
) -> float:
    """The share of ``before``'s footprint that ``after`` covers (footprints compared in
    ``before``'s CRS); :class:`GeoreferenceError` when they do not overlap at all."""
    if before.crs is None or after.crs is None:
        if (before.crs is None) != (after.crs is None):
            raise GeoreferenceError(
                f"only one of {before_name} and {after_name} has a CRS",
                "georeference both scenes, or neither",
            )
        if (before.width, before.height) != (after.width, after.height):
            raise GeoreferenceError(
                f"{before_name} ({before.width}x{before.height}) and {after_name} ({after.width}x{after.height}) "
                "have no CRS and differ in size, so they cannot be put on one grid",
                "georeference them (gdal_edit.py -a_srs -a_ullr)",
            )
        return 1.0
    a = before.bounds
    b = (
        after.bounds
        if after.crs == before.crs
        else transform_bounds(after.crs, before.crs, *after.bounds, densify_pts=21)
    )
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if not (w > 0 and h > 0) or not all(map(math.isfinite, b)):
        crs = before.crs.to_string()
        raise GeoreferenceError(
            f"{before_name} and {after_name} do not overlap: {before_name} covers {_fmt_bounds(a)} and "
            f"{after_name} {_fmt_bounds(b)} in {crs}",
            "pass two scenes of the same place",
        )
    return float(w * h / ((a[2] - a[0]) * (a[3] - a[1])))


def open_dates(before, after, inp) -> tuple[Scene, Scene, dict]:
    """Both dates, the second on the first's grid (after the overlap check). A date may be an
    open :class:`~deo_cli.io.raster.Scene` (an array's, :mod:`deo_cli.io.arrays`); a second
    date given so must already be on the first's grid."""
    first = before if isinstance(before, Scene) else open_input(before, inp)  # the output grid
    native = after if isinstance(after, Scene) else open_input(after, inp, crop=False)
    share = check_overlap(first.grid, native.grid, f"BEFORE {first.name}", f"AFTER {native.name}")
    native.close()
    same = native.grid.same_as(first.grid)
    if share < 0.999:
        log.warning("%s covers %.0f%% of %s; the rest is nodata", native.name, 100 * share, first.name)
    if isinstance(after, Scene) and not same:
        raise GeoreferenceError(
            f"AFTER {native.name} is not on the grid of BEFORE {first.name}",
            "put it there first (after.rio.reproject_match(before))",
        )
    second = native if isinstance(after, Scene) else open_input(after, inp, grid=first.grid)
    info = {
        "after_resampled": not same,
        "after_native_crs": native.grid.crs.to_string() if native.grid.crs is not None else None,
        "overlap_fraction": round(share, 6),
        "resampling": inp.resampling,
    }
    if not same:
        log.info("%s resampled onto the grid of %s (%s)", native.name, first.name, inp.resampling)
    return first, second, info


def prepare_dates(
    before: Scene, after: Scene, manifest, rgb_manifest, inp, head=None
) -> tuple[InputPlan, InputPlan]:
    """Each date's input plan (same stem required); with a trained ``head``, the stem it was
    trained on (:func:`~deo_cli.infer.headfile.head_input_stem`: dates without its bands are
    refused)."""
    with before, after:
        stems = [head_input_stem(head, s) if head is not None else "auto" for s in (before, after)]
        a = prepare_input(before, manifest, rgb_manifest, inp.unit, inp.rgb_max, stem=stems[0])
        b = prepare_input(after, manifest, rgb_manifest, inp.unit, inp.rgb_max, stem=stems[1])
    if a.stem != b.stem:
        raise UsageError(
            f"the first date has {'all multispectral bands' if a.stem == 'ms' else 'only RGB'} but the second "
            f"{'all multispectral bands' if b.stem == 'ms' else 'only RGB'}",
            "give both dates the same bands",
        )
    return a, b


class PairChipReader:
    """Reads each chip from both dates and stacks them: ``x`` is ``(2 * bands, C, C)``.

    The invalid fraction of a location is the larger of the two dates' (a location is nodata
    when either date is). A chip is empty when either date has no valid pixel in it.
    """

    def __init__(self, before: ChipReader, after: ChipReader):
        if before.plan != after.plan:
            raise ValueError("both dates must use one tile plan")
        self.before = before
        self.after = after
        self.plan = before.plan

    def set_decode_threads(self, threads: int) -> None:
        self.before.set_decode_threads(threads)
        self.after.set_decode_threads(threads)

    def read(self, chip) -> ChipSample:
        a = self.before.read(chip)
        b = self.after.read(chip)
        invalid = np.maximum(a.invalid, b.invalid)
        if a.empty or b.empty:
            shape = (a.x.shape[0] + b.x.shape[0], *a.x.shape[1:])
            return ChipSample(chip, np.zeros(shape, np.float32), invalid, 0.0, True)
        x = np.concatenate([a.x, b.x], axis=0)
        return ChipSample(chip, x, invalid, min(a.valid_fraction, b.valid_fraction), False)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def default_change_layers(spec) -> list[int]:
    """The zero-shot levels used when ``--layer`` is ``default`` (see the module docstring).

    Hierarchical encoders (several feature strides, Swin): every level from the first up to and
    including :func:`~deo_cli.infer.model.default_embed_layer` (Swin: 0, 1, 2 at strides 4, 8,
    16, scored on the stride-4 grid). Single-stride encoders (ViT): that level alone (every
    level has the patch stride, so averaging would not make the grid finer).
    """
    top = default_embed_layer(spec)
    if len(set(spec.feature_strides)) == 1:
        return [top]
    return [lv for lv in range(top + 1) if spec.feature_strides[lv] <= spec.feature_strides[top]]


def parse_layers(spec, text: str | int | None) -> list[int]:
    """``default`` (:func:`default_change_layers`), ``last``, an index or a comma-separated list
    of indices -> levels."""
    if text is None or str(text).strip().lower() in ("", "default"):
        return default_change_layers(spec)
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    return sorted({resolve_layer(spec, p) for p in parts})


def _split_dates(x: torch.Tensor) -> torch.Tensor:
    """``(B, 2C, H, W)`` -> ``(2B, C, H, W)``: the first dates, then the second dates."""
    c = x.shape[1] // 2
    return torch.cat([x[:, :c], x[:, c:]], dim=0)


class CosineChange(nn.Module):
    """Zero-shot change score: ``1 - cos`` of the two dates' features, averaged over ``layers``.

    Input ``(B, 2C, H, W)`` (both dates stacked); output ``(B, 1, H / stride, W / stride)``.
    ``stride`` is the finest chosen level's (``embedding`` grid) or 1 (``input`` grid).
    """

    def __init__(self, encoder, layers: Sequence[int], out_stride: int | None = None):
        super().__init__()
        self.encoder = encoder.eval()
        self.layers = [int(lv) for lv in layers]
        strides = [int(encoder.feature_strides[lv]) for lv in self.layers]
        self.stride = int(out_stride or min(strides))
        self.channels = 1
        self.name = encoder.name
        self.align = int(max(encoder.feature_strides))
        copy_encoder_facts(self, encoder, dates=2)  # both dates go through the encoder in one batch
        self.layer = self.layers[0] if len(self.layers) == 1 else ",".join(map(str, self.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = _split_dates(x)
        if len(self.layers) == 1:
            maps = [forward_level(self.encoder, both, self.layers[0])]
        else:
            maps = forward_levels(self.encoder, both, self.layers)
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        acc = None
        for f in maps:
            a, b = f.float().chunk(2, dim=0)
            d = (1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-6))[:, None]
            if tuple(d.shape[-2:]) != size:
                d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
            acc = d if acc is None else acc + d
        return acc / len(maps)

    def describe(self) -> dict:
        strides = [int(self.encoder.feature_strides[lv]) for lv in self.layers]
        return {
            "score": "1 - cosine similarity of the two dates' features"
            + (", averaged over the levels" if len(self.layers) > 1 else ""),
            "layers": self.layers,
            "level_strides": strides,
            "stride": self.stride,
            "resized": "bilinear" if any(s != self.stride for s in strides) else None,
        }


class PixelDiffHead(nn.Module):
    """A head's logits refined at full resolution with the two dates' per-pixel difference.

    ``forward([d, *levels], out_size)``: ``d`` is ``[|x1 - x2|, (x1 + x2) / 2]`` of the
    normalised input ``(B, 2 * bands, H, W)`` (symmetric in the dates: the difference, and what
    the surface is); ``head(levels)`` gives logits that are bilinearly upsampled to ``d``'s
    grid, concatenated with a small convolutional branch on ``d`` (two 3x3 conv-BN-ReLU of
    ``channels``) and mapped to the classes by a 1x1 convolution.

    Why: OSCD's changes are often a few 10 m pixels, finer than any encoder level (stride 4 at
    best), and the pixel-level spectral difference is the strongest single cue (measured on the
    OSCD subset: a per-pixel classifier on ``|x1 - x2|`` alone beats the trivial F1 in every
    held-out city, the stride-4 head alone does not).
    """

    def __init__(self, head: nn.Module, bands: int, num_classes: int, channels: int = 32):
        super().__init__()
        from deo_cli.models.upernet import conv_bn_relu

        self.head = head
        self.bands = int(bands)
        self.pixel = nn.Sequential(
            conv_bn_relu(2 * self.bands, channels, 3), conv_bn_relu(channels, channels, 3)
        )
        self.classifier = nn.Conv2d(channels + num_classes, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], out_size: tuple[int, int] | None = None) -> torch.Tensor:
        d, levels = feats[0], list(feats[1:])
        size = tuple(d.shape[-2:])
        logits = self.head(levels, out_size=size)
        out = self.classifier(torch.cat([logits, self.pixel(d)], dim=1))
        if out_size is not None and tuple(out_size) != size:
            out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)
        return out


class SiameseChange(FrozenEncoderSegmenter):
    """One encoder on both dates, fused per level, into a segmentation head (2 classes).

    ``fusion``: ``diff`` = ``|f1 - f2|`` (symmetric in the dates) or ``concat`` = ``[f1, f2]``.
    A :class:`PixelDiffHead` head also takes ``|x1 - x2|`` of the input (first in the list).
    Input ``(B, 2C, H, W)``; output logits ``(B, 2, H, W)``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, freeze: bool = True, fusion: str = "diff"):
        super().__init__(encoder, head, freeze)
        if fusion not in ("diff", "concat"):
            raise UsageError(f"unknown fusion {fusion!r}", "use diff or concat")
        self.fusion = fusion

    @staticmethod
    def head_channels(channels: Sequence[int], fusion: str) -> list[int]:
        return [int(c) * (2 if fusion == "concat" else 1) for c in channels]

    def head_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The fused per-level maps the head takes (cacheable when the encoder is frozen)."""
        feats = self.features(_split_dates(x))
        fused = []
        for f in feats:
            a, b = f.chunk(2, dim=0)
            fused.append((a - b).abs() if self.fusion == "diff" else torch.cat([a, b], dim=1))
        if isinstance(self.head, PixelDiffHead):
            c = x.shape[1] // 2
            if c != self.head.bands:
                raise UsageError(
                    f"the change head was trained on {self.head.bands} bands per date, the input has {c}",
                    "give both dates the bands the head was trained on",
                )
            a, b = x[:, :c].float(), x[:, c:].float()
            fused.insert(0, torch.cat([(a - b).abs(), (a + b) / 2], dim=1))
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_inputs(x), out_size=tuple(x.shape[-2:]))


def make_change_head(
    kind: str,
    in_channels: Sequence[int],
    in_strides: Sequence[int],
    channels: int,
    pixel_bands: int = 0,
    pixel_channels: int = 0,
) -> nn.Module:
    """The change head: ``kind`` on the fused levels, inside a :class:`PixelDiffHead` when
    ``pixel_channels`` > 0."""
    head = make_head(kind, in_channels, in_strides, 2, channels)
    if pixel_channels > 0:
        head = PixelDiffHead(head, pixel_bands, 2, pixel_channels)
    return head


def _change_head_module(hf: HeadFile) -> nn.Module:
    h = hf.head
    if not h.get("pixel_channels"):
        return build_head_module(hf)
    module = make_change_head(
        h["kind"],
        h["in_channels"],
        h["in_strides"],
        int(h.get("channels", 512)),
        int(h["pixel_bands"]),
        int(h["pixel_channels"]),
    )
    try:
        module.load_state_dict(hf.head_state)
    except RuntimeError as e:
        raise WeightsError(
            f"head state in {hf.path.name if hf.path else 'the head file'} does not fit a {h['kind']} change "
            f"head with a pixel-difference branch ({str(e).splitlines()[0]})",
            "the file is damaged or from another deo version; train the head again",
        ) from e
    return module.eval()


def build_change_model(head: HeadFile, weights: str | None = None) -> tuple[DenseHeadModel, object]:
    """The siamese model of a change head file, as a stride-1 model for the runner."""
    encoder = load_head_encoder(head, weights)
    module = SiameseChange(
        encoder, _change_head_module(head), freeze=True, fusion=head.head.get("fusion") or "diff"
    )
    return DenseHeadModel(module.eval(), encoder, 2), encoder


# ---------------------------------------------------------------------------------------------
# Sinks and passes
# ---------------------------------------------------------------------------------------------


class ScoreSink:
    """Stitched model rows -> scores (``1 - cos``, a CVA distance, or softmax ``P(change)`` of
    2 logits) into a COG, while filling the histogram the threshold is chosen from (over
    ``score_range``; default ``[0, 1]`` for probabilities, ``[0, 2]`` for cosine distances)."""

    def __init__(
        self, cog: CogSink | ArraySink, probability: bool, score_range: tuple[float, float] | None = None
    ):
        self.cog = cog
        self.probability = probability
        self.block_rows = cog.block_rows
        self.hist = ScoreHistogram(*(score_range or (0.0, 1.0 if probability else 2.0)))

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        if self.probability:
            valid = np.isfinite(data).all(axis=0)
            z = np.where(valid[None], data, 0.0)
            score = (1.0 / (1.0 + np.exp(z[0] - z[1]))).astype(np.float32)  # softmax of class 1
            score[~valid] = np.nan
        else:
            score = data[0].astype(np.float32)
        self.hist.add(score)
        self.cog.write_rows(row0, score[None])


def write_mask(score_path: Path, mask: CogSink, threshold: float, finish: bool = True) -> tuple[int, int]:
    """Threshold the score COG block by block into ``mask``; returns (changed, valid) pixels.
    ``finish=False`` leaves ``mask.finish()`` to the caller (to tag it with the counts first)."""
    changed = valid_n = 0
    with rasterio.open(score_path) as ds:
        for r0 in range(0, ds.height, mask.block_rows):
            k = min(mask.block_rows, ds.height - r0)
            s = ds.read(1, window=Window(0, r0, ds.width, k))
            ok = np.isfinite(s)
            m = np.where(ok, (s > threshold).astype(np.float32), float(MASK_NODATA))
            changed += int((m == 1).sum())
            valid_n += int(ok.sum())
            mask.write_rows(r0, m[None].astype(np.float32))
    if finish:
        mask.finish()
    return changed, valid_n


def write_polygons(
    mask_path: Path,
    score_path: Path,
    out: Path,
    min_area: float,
    simplify: float,
    overwrite: bool,
    metadata: dict,
    min_pixels: int = 0,
    stride: int = 1,
) -> int:
    """Vectorise the mask's change pixels (whole mask in memory; it is one byte per pixel);
    regions of less than ``min_area`` (CRS units²) or covering fewer than ``min_pixels`` input
    pixels (a mask pixel on a stride-``stride`` grid covers ``stride²``) are dropped.

    Why ``min_pixels`` 2 by default (``ChangeRecipe.min_pixels``): on the four OSCD cities
    (``benchmarks/results/oscd_thresholds.json``, ``speckle``), 24-30 % of the CVA mask's
    regions were single 10 m pixels and 0-3 % of those touched a changed pixel, against 12-17 %
    of the larger regions; dropping them did not lower the pixel F1. Single 40 m cells of the
    zero-shot mask (about half its regions) touched change as often as larger regions (12-22 %
    against 0-37 %), so a stride-4 mask pixel (16 input pixels) is kept."""
    from deo_cli.io.vector import polygonize, write_vectors

    with rasterio.open(mask_path) as m, rasterio.open(score_path) as s:
        mask = m.read(1)
        score = s.read(1)
        grid = Grid(m.crs, m.transform, m.width, m.height)
    gdf = polygonize(
        mask == 1,
        grid,
        score=score,
        min_area=min_area,
        simplify=simplify,
        valid=mask != MASK_NODATA,
        min_pixels=-(-int(min_pixels) // (stride * stride)),  # input pixels -> mask pixels
    )
    write_vectors(gdf, out, overwrite=overwrite, metadata=metadata)
    return len(gdf)


# ---------------------------------------------------------------------------------------------
# detect-change
# ---------------------------------------------------------------------------------------------


@dataclass
class ChangeResult:
    before: str
    after: str
    output: Path
    mask: Path
    mode: str
    threshold: Threshold
    changed_fraction: float
    crs: str | None
    grid: tuple[int, int]
    resolution: tuple[float, float]
    polygons: Path | None = None
    polygon_count: int | None = None
    preview: Path | None = None
    recipe: Path | None = None
    seconds: float = 0.0
    chips: int = 0
    extra: dict = field(default_factory=dict)


def default_mask_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_mask{output.suffix or '.tif'}")


def _crs_text(crs) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def _threshold_method(recipe: ChangeRecipe, supervised: bool) -> str:
    """The rule: ``auto`` is ``fixed`` with a --threshold, ``percentile`` with a --percentile,
    the head's threshold when supervised, else :data:`~deo_cli.infer.threshold.DEFAULT_METHOD`."""
    m = recipe.threshold_method
    if recipe.threshold is not None and recipe.percentile is not None:
        raise UsageError("--threshold and --percentile both given", "pass one of them")
    if m == "auto":
        if recipe.threshold is not None:
            return "fixed"
        if recipe.percentile is not None:
            return "percentile"
        return "head" if supervised else DEFAULT_METHOD
    if m == "fixed" and recipe.threshold is None:
        raise UsageError("--threshold-method fixed needs a value", "pass --threshold VALUE")
    return m


def _change_mode(recipe: ChangeRecipe, head) -> str:
    """``supervised`` (a --head), ``cva`` or ``zero-shot`` (--method)."""
    if head is None:
        return recipe.method
    if recipe.method == "cva":
        raise UsageError("--method cva takes no --head", "drop --head, or --method cva")
    return "supervised"


def _check_zero_shot_settings(recipe: ChangeRecipe, spec) -> None:
    """A bad --layer, an impossible chip size or overlap fail before the weights load
    (aligned_plan checks them again)."""
    parse_layers(spec, recipe.layer)
    align, chip = max(spec.feature_strides), recipe.tiling.chip_size or spec.input_size
    check_chip_memory(chip, recipe.runtime.batch_size, 2 * len(spec.manifest.bands), align, spec.input_size)
    resolve_overlap(chip, align, recipe.tiling.overlap)


def _score_model(mode: str, recipe: ChangeRecipe, hf, encoder, weights) -> tuple[nn.Module, dict, dict]:
    """The score model, what it is (model name, weights) and its score's description."""
    from deo_cli.models import get_model_spec

    if mode == "supervised":
        model, enc = build_change_model(hf, weights)
        describe = {
            "score": "P(change): softmax of the siamese head's blended logits",
            "fusion": hf.head.get("fusion"),
            "stride": 1,
        }
    elif mode == "cva":
        spec = encoder.spec if encoder is not None else get_model_spec(recipe.model.name)
        model = CvaChange(spec, recipe.tiling.chip_size or CVA_CHIP)
        return (
            model,
            {"name": f"cva (bands of {spec.name})", "weights": "none", "sha256": None},
            model.describe(),
        )
    else:
        model = build_zero_shot_model(recipe, encoder)
        enc, describe = model.encoder, model.describe()
    who = {"name": enc.name, "weights": enc.weights_uri or "random", "sha256": enc.weights_sha256}
    return model, who, describe


def date_record(scene: Scene) -> dict:
    """A date's scene, files and acquisition time with where it came from (None: unknown, e.g.
    old-style Sentinel-2 tile names, whose time is the processing time;
    :mod:`deo_cli.io.scenedate`)."""
    from deo_cli.io.scenedate import acquisition_time

    source = "STAC item" if scene.stac else acquisition_time(scene.paths, scene.tags)[1]
    return {
        "scene": scene.name,
        "paths": list(scene.paths),
        "datetime": scene.datetime,
        "datetime_source": source,
    }


def _choose(hist: ScoreHistogram, method: str, recipe: ChangeRecipe, hf) -> Threshold:
    if method == "head":
        return Threshold(float(hf.threshold if hf.threshold is not None else 0.5), "head")
    return choose_threshold(hist, method, recipe.threshold, recipe.percentile, recipe.mad_k)


def flag_summary(thr: Threshold, changed: int, valid: int) -> dict:
    """What the mask's ``deo_threshold`` tag holds: the rule, the threshold, the flagged share
    and, where implausible for the rule, the warning (:func:`~deo_cli.infer.threshold.implausible`)."""
    fraction = changed / valid if valid else float("nan")
    return {
        **thr.describe(),
        "flagged_pixels": int(changed),
        "valid_pixels": int(valid),
        "flagged_fraction": fraction,
        "warning": implausible(thr, fraction),
    }


def build_zero_shot_model(recipe: ChangeRecipe, encoder=None) -> CosineChange:
    from deo_cli.models import build_encoder, get_model_spec

    spec = get_model_spec(recipe.model.name) if encoder is None else encoder.spec
    layers = parse_layers(spec, recipe.layer)
    if encoder is None:
        seed_everything(recipe.runtime.seed)
        encoder = build_encoder(recipe.model.name, weights=recipe.model.weights)
    return CosineChange(encoder, layers, 1 if recipe.output_grid == "input" else None)


def run_detect_change(
    before: str,
    after: str,
    output: str | os.PathLike,
    recipe: ChangeRecipe,
    *,
    head: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    polygons: str | os.PathLike | None = None,
    preview: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    encoder=None,
    weights: str | None = None,
) -> ChangeResult:
    """Score, threshold and (optionally) vectorise the change from ``before`` to ``after``.

    ``head``: a change head file (supervised); default zero-shot. ``encoder``: a ready encoder
    for zero-shot (tests, notebooks). Raises :class:`~deo_cli.errors.DeoError` for user mistakes,
    before any model is loaded when the inputs or outputs are wrong. The score and mask COGs
    are locked for the run (a second run on them stops with one line naming the first).
    """
    from deo_cli.infer.embed import check_output_suffix

    output = Path(output)
    mask_path = Path(mask) if mask is not None else default_mask_path(output)
    check_output_suffix(output, "cog", "-o")
    check_output_suffix(mask_path, "cog", "--mask")
    if mask_path.resolve() == output.resolve():
        raise UsageError("--mask and -o name the same file", "choose another --mask")
    sides = (polygons, preview, recipe_path_for(output))
    with outputs_locked([output, mask_path], sides):
        return _detect_change(
            before,
            after,
            output,
            recipe,
            head=head,
            mask=mask_path,
            polygons=polygons,
            preview=preview,
            overwrite=overwrite,
            progress=progress,
            encoder=encoder,
            weights=weights,
        )


def _detect_change(
    before: str,
    after: str,
    output: Path,
    recipe: ChangeRecipe,
    *,
    head,
    mask: Path,
    polygons,
    preview,
    overwrite: bool,
    progress: Progress | None,
    encoder,
    weights: str | None,
) -> ChangeResult:
    from deo_cli.models import get_model_spec

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    output = Path(output)
    mask_path = Path(mask) if mask is not None else default_mask_path(output)
    poly_path = Path(polygons) if polygons is not None else None
    preview = Path(preview) if preview is not None else None
    # -- checks before any compute ---------------------------------------------------------
    if poly_path is not None:
        from deo_cli.io.vector import vector_format

        if vector_format(poly_path) not in ("parquet", "GPKG", "FlatGeobuf"):
            raise UsageError(
                f"--polygons {poly_path.name}: polygons are written in the source CRS",
                "write .parquet (GeoParquet) or .gpkg",
            )
    if preview is not None and preview.suffix.lower() not in (".png", ""):
        raise UsageError(f"--preview {preview.name} must be a .png file", "name it e.g. preview.png")
    rpath = recipe_path_for(output)
    for p in (output, mask_path, poly_path, preview, rpath):
        if p is not None:
            check_output(p, overwrite)
    mode = _change_mode(recipe, head)
    supervised = mode == "supervised"
    method = _threshold_method(recipe, supervised)
    hf = load_head(head, "change") if supervised else None
    if hf is not None:
        manifests = head_manifests(hf)
    elif encoder is not None:
        manifests = (encoder.manifest, encoder.rgb_manifest if encoder.has_rgb_stem else None)
    else:
        spec = get_model_spec(recipe.model.name)
        if mode == "zero-shot":
            _check_zero_shot_settings(recipe, spec)
        manifests = (spec.manifest, spec.rgb_manifest)
    first, second, pair_info = open_dates(before, after, recipe.input)
    inp_a, inp_b = prepare_dates(first, second, *manifests, recipe.input, head=hf)
    if mode == "cva":
        inp_b = same_scale(inp_a, inp_b)

    # -- model -------------------------------------------------------------------------------
    model, who, describe = _score_model(mode, recipe, hf, encoder, weights)
    rt = resolve_runtime(recipe.runtime)
    model = model.to(rt.device)
    log.info("%s change with %s on %s, %s", mode, who["name"], rt.device, rt.precision_name)

    t = recipe.tiling
    chip = t.chip_size or (hf.chip_size if hf is not None else model.input_size)
    check_chip_memory(chip, rt.batch_size, len(inp_a.bands) + len(inp_b.bands), model.align, model.input_size)
    overlap = 0 if mode == "cva" and t.overlap is None else t.overlap  # per pixel: no overlap needed
    plan = aligned_plan(first.height, first.width, chip, model.stride, model.align, overlap)
    recipe = with_used_overlap(recipe, plan)
    out_grid = first.grid.scaled(model.stride) if model.stride > 1 else first.grid
    reader = PairChipReader(
        ChipReader(first, inp_a.bands, inp_a.normalizer, plan),
        ChipReader(second, inp_b.bands, inp_b.normalizer, plan),
    )
    meta = {
        "deo_version": __version__,
        "deo_change_mode": mode,
        "deo_change_score": describe,
        "deo_model": who["name"],
        "deo_weights": who["weights"],
        "deo_weights_sha256": who["sha256"],
        "deo_head": hf.describe() if hf is not None else None,
        "deo_band_manifest": inp_a.manifest.to_dict(),
        "deo_normalization": {"before": inp_a.describe(), "after": inp_b.describe()},
        "deo_pair": pair_info,
        "deo_tiling": {**plan.describe(), "blend": t.blend, "max_nodata_fraction": t.max_nodata_fraction},
        "deo_recipe_hash": recipe_hash(recipe),
        "deo_before": date_record(first),
        "deo_after": date_record(second),
    }
    block_rows = block_rows_for(16)
    score_layout = RasterLayout(
        count=1,
        dtype="float32",
        descriptions=("change_score",),
        tags=gdal_tags(meta),
        compress=recipe.compress,
        resampling="average",
    )
    score_sink = ScoreSink(
        CogSink(output, out_grid, score_layout, block_rows, None, overwrite),
        supervised,
        getattr(model, "score_range", None),
    )
    written: list[Path] = []
    try:
        with first, second:
            stats = run_dense(
                reader,
                model,
                score_sink,
                blend=t.blend,
                max_nodata_fraction=t.max_nodata_fraction,
                batch_size=rt.batch_size,
                num_workers=rt.num_workers,
                micro_batch=rt.micro_batch,
                device=rt.device,
                precision=rt.precision,
                progress=progress,
                description=f"change {first.name} -> {second.name}",
            )
        score_sink.cog.finish()
        written.append(output)
        hist = score_sink.hist
        if hist.total == 0:
            raise DataError(
                "the two dates share no valid pixel",
                "check their nodata values and that they show the same place",
            )
        thr = _choose(hist, method, recipe, hf)
        mask_meta = {
            **meta,
            "deo_threshold": thr.describe(),
            "deo_values": {"0": "no change", "1": "change", "255": "nodata"},
        }
        mask_layout = RasterLayout(
            count=1,
            dtype="uint8",
            nodata=MASK_NODATA,
            descriptions=("change",),
            tags=gdal_tags(mask_meta),
            compress=recipe.compress,
            resampling="mode",
        )
        mask_sink = CogSink(mask_path, out_grid, mask_layout, block_rows, MASK_COLORMAP, overwrite)
        try:
            changed, valid_n = write_mask(output, mask_sink, thr.value, finish=False)
            flags = flag_summary(thr, changed, valid_n)
            mask_meta["deo_threshold"] = flags
            mask_sink.layout = replace(mask_layout, tags=gdal_tags(mask_meta))
            mask_sink.finish()
        except BaseException:
            mask_sink.abort()
            raise
        written.append(mask_path)
        log.info(
            "threshold %.6g (%s): %.2f%% of %d valid locations flagged",
            thr.value,
            thr.rule,
            100.0 * changed / max(valid_n, 1),
            valid_n,
        )
        if flags["warning"]:
            log.warning("%s", flags["warning"])
        res = ChangeResult(
            before=str(before),
            after=str(after),
            output=output,
            mask=mask_path,
            mode=mode,
            threshold=thr,
            changed_fraction=changed / max(valid_n, 1),
            crs=_crs_text(out_grid.crs),
            grid=(out_grid.width, out_grid.height),
            resolution=out_grid.res,
            chips=stats.chips,
            extra={"pair": pair_info, "stride": model.stride, "warning": flags["warning"]},
        )
        if poly_path is not None:
            vmeta = {
                k: v
                for k, v in mask_meta.items()
                if k
                in (
                    "deo_version",
                    "deo_change_mode",
                    "deo_change_score",
                    "deo_model",
                    "deo_weights",
                    "deo_before",
                    "deo_after",
                    "deo_threshold",
                    "deo_recipe_hash",
                )
            }
            vmeta["deo_min_area"] = recipe.min_area
            vmeta["deo_min_pixels"] = recipe.min_pixels
            res.polygon_count = write_polygons(
                mask_path,
                output,
                poly_path,
                recipe.min_area,
                recipe.simplify,
                overwrite,
                vmeta,
                recipe.min_pixels,
                model.stride,
            )
            res.polygons = poly_path
            written.append(poly_path)
        if preview is not None:
            from deo_cli.infer.mappreview import write_change_preview

            with first, second:
                res.preview = write_change_preview(first, second, mask_path, preview, overwrite=overwrite)
            written.append(preview)
        res.recipe = save_recipe(recipe, rpath, "detect-change")
    except BaseException:
        score_sink.cog.abort()
        for p in written:  # all or nothing: a failed run leaves no partial set of outputs
            p.unlink(missing_ok=True)
        raise
    res.seconds = time.perf_counter() - t0
    return res


def summary_line(r: ChangeResult) -> str:
    """The command's summary: outputs, mode, grid, the rule and threshold, the flagged share
    (``implausible`` when :func:`~deo_cli.infer.threshold.implausible` warned), polygons, time."""
    w, h = r.grid
    polys = f"  {r.polygon_count} polygons -> {r.polygons}" if r.polygons is not None else ""
    t = r.threshold
    rule = t.method if t.method == "fixed" else f"{t.method}: {t.rule}"
    mark = " (implausible, see the warning)" if r.extra.get("warning") else ""
    if t.method == "percentile":
        mark = " (by construction)" + mark
    return (
        f"{r.output} + {r.mask}  {r.mode}  {r.crs or 'no CRS'}  {w}x{h} px @ {r.resolution[0]:.6g}  "
        f"threshold {r.threshold.value:.4g} ({rule})  "
        f"{100 * r.changed_fraction:.2f}% flagged{mark}{polys}  {r.seconds:.1f} s"
    )


# ---------------------------------------------------------------------------------------------
# In memory (benchmarks, notebooks)
# ---------------------------------------------------------------------------------------------


def change_score_array(
    before: Scene,
    after: Scene,
    model,
    *,
    chip_size: int | None = None,
    overlap: int | None = None,
    unit: str = "auto",
    rgb_max: float | None = None,
    blend: str = "cosine",
    max_nodata_fraction: float = 0.5,
    batch_size: int = 8,
    num_workers: int = 0,
    device: torch.device | None = None,
    precision: torch.dtype | None = None,
    progress: Progress | None = None,
    head: HeadFile | None = None,
) -> tuple[np.ndarray, Grid]:
    """The change score of two scenes on one grid (``after`` already on ``before``'s grid, e.g.
    from :func:`open_dates` or :func:`deo_cli.data.oscd.open_pair`), computed by the same
    streaming path as ``deo detect-change``, returned as a float32 ``(H, W)`` array (NaN =
    nodata) on the model's output grid.

    ``model``: a :class:`CosineChange` (zero-shot; ``out_stride=1`` for the input grid) or the
    :class:`DenseHeadModel` of :func:`build_change_model` (the score is then ``P(change)``);
    ``head``: its head file (the dates go through the stem it was trained on).
    """
    from deo_cli.recipes import InputSection

    inp = InputSection(unit=unit, rgb_max=rgb_max)
    manifests = (model.manifest, getattr(model, "rgb_manifest", None))
    a, b = prepare_dates(before, after, *manifests, inp, head=head)
    if isinstance(model, CvaChange):
        b = same_scale(a, b)
    plan = aligned_plan(
        before.height, before.width, chip_size or model.input_size, model.stride, model.align, overlap
    )
    reader = PairChipReader(
        ChipReader(before, a.bands, a.normalizer, plan), ChipReader(after, b.bands, b.normalizer, plan)
    )
    sink = ScoreSink(
        ArraySink(1, plan.out_height, plan.out_width, block_rows_for(16)),
        probability=model.channels == 2,
        score_range=getattr(model, "score_range", None),
    )
    device = device or torch.device("cpu")
    model = model.to(device)
    with before, after:
        run_dense(
            reader,
            model,
            sink,
            blend=blend,
            max_nodata_fraction=max_nodata_fraction,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            precision=precision,
            progress=progress,
            background=False,
        )
    grid = before.grid.scaled(model.stride) if model.stride > 1 else before.grid
    return sink.cog.array[0], grid


def upsample_to(score: np.ndarray, stride: int, height: int, width: int) -> np.ndarray:
    """A score on a stride-``stride`` grid repeated onto the input grid (each input pixel takes
    the score of the feature pixel it lies in), cropped to ``height`` x ``width``."""
    if stride == 1:
        return score[:height, :width]
    return np.repeat(np.repeat(score, stride, axis=0), stride, axis=1)[:height, :width]


# ---------------------------------------------------------------------------------------------
# detect-change train
# ---------------------------------------------------------------------------------------------


@dataclass
class ChangeTrainResult:
    out: Path
    head: Path
    metrics: dict
    seconds: float


def best_f1_threshold(
    prob: np.ndarray, target: np.ndarray, candidates: np.ndarray | None = None
) -> tuple[float, float]:
    """The P(change) threshold with the best F1 on (prob, target) pixels, and that F1."""
    candidates = np.round(np.arange(0.05, 0.96, 0.01), 2) if candidates is None else candidates
    p = np.asarray(prob, np.float64).ravel()
    t = np.asarray(target, bool).ravel()
    if not t.any():
        return 0.5, float("nan")
    order = np.argsort(p)
    ps, ts = p[order], t[order]
    pos_above = np.cumsum(ts[::-1])[::-1]  # positives at or above each sorted index
    n_pos = int(ts.sum())
    best = (0.5, -1.0)
    for c in candidates:
        i = int(np.searchsorted(ps, c, side="right"))  # first index with p > c
        tp = int(pos_above[i]) if i < len(ps) else 0
        pred = len(ps) - i
        fp, fn = pred - tp, n_pos - tp
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
        if f1 > best[1] + 1e-12:
            best = (float(c), f1)
    return best


def f1_at(prob: np.ndarray, target: np.ndarray, threshold: float) -> float:
    """F1 of ``prob > threshold`` against ``target`` (NaN without any positive or prediction)."""
    pred = np.asarray(prob).ravel() > threshold
    t = np.asarray(target, bool).ravel()
    denom = int(pred.sum()) + int(t.sum())
    return 2.0 * int(np.sum(pred & t)) / denom if denom else float("nan")


def transfer_threshold(val_best: float, shrink: float) -> float:
    """The P(change) threshold a head keeps: the validation F1-best ``val_best`` pulled toward
    0.5 by ``shrink`` (0 keeps it, 1 gives 0.5): ``0.5 + (1 - shrink) * (val_best - 0.5)``.

    Why not the validation optimum itself: the validation chips are a random share of the
    *training* cities' chips, neighbours of the chips the head was fitted on, so the head is
    more confident there than on a new scene, and they hold few change pixels (a few hundred
    on the OSCD subset), so the F1-best cut overfits them. 0.5 is the decision the head was
    trained for (class-weighted cross-entropy) and the one its epoch was selected at (validation
    F1 of the argmax). Measured on the OSCD subset (leave-one-city-out, 8 heads: random and
    pretrained deo_swin_test): the validation optimum (0.46-0.81) never beat 0.5 on the held-out
    city by more than 0.002 F1 and lost up to 0.016 (bordeaux, pretrained: 0.81 gave F1 0.0165,
    below the trivial 0.0198; 0.5 gave 0.0325; halfway, 0.655, still 0.0192). Hence the default
    ``threshold_shrink: 1``; lower it when the scenes to predict are like the training scenes.
    The cost: F1 pooled over all four cities' pixels falls (0.116 to 0.086 with random weights),
    because on bordeaux, where the head barely beats the trivial F1 at any threshold, 0.5 marks
    5 % of the pixels as changed against 1 % at 0.71.
    """
    if not 0.0 <= shrink <= 1.0:
        raise ValueError("shrink must be within [0, 1]")
    return round(0.5 + (1.0 - shrink) * (float(val_best) - 0.5), 4)


@torch.no_grad()
def _val_probabilities(
    model, loader, device, dtype, forward_fn=image_forward
) -> tuple[np.ndarray, np.ndarray]:
    from deo_cli.runtime import autocast

    model.eval()
    probs, targets = [], []
    for batch in loader:
        with autocast(device, dtype):
            logits, target = forward_fn(model, batch, device)
        p = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
        m = target.cpu().numpy()
        keep = m != IGNORE
        probs.append(p[keep])
        targets.append(m[keep])
    if not probs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(probs), np.concatenate(targets)


def _oscd_sources(cities, inp, chip: int, overlap: int, manifests):
    from deo_cli.data.oscd import read_change_label

    sources, stems = [], {}
    for city in cities:
        first, second, _ = open_dates(str(city.before), str(city.after), inp)
        a, b = prepare_dates(first, second, *manifests, inp)
        stems.setdefault(a.stem, city.name)
        if len(stems) > 1:
            raise DataError(
                f"city {stems.get('rgb')} has only RGB but city {stems.get('ms')} every multispectral band",
                "train on cities with the same bands",
            )
        plan = training_plan(first.height, first.width, chip, overlap)
        reader = PairChipReader(
            ChipReader(first, a.bands, a.normalizer, plan), ChipReader(second, b.bands, b.normalizer, plan)
        )
        label = read_change_label(city, (first.height, first.width)).astype(np.int64)
        sources.append((reader, ArrayLabels(label)))
    return sources, next(iter(stems), "ms")


def run_change_train(
    recipe: ChangeTrainRecipe,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    encoder=None,
) -> ChangeTrainResult:
    """Train a siamese change head on OSCD-format pairs; writes ``out/`` (head.pt, metrics.json,
    recipe.yaml). Test cities are scored through the streaming prediction path."""
    from deo_cli.data.oscd import list_cities, read_change_label, select_cities
    from deo_cli.data.segdata import holdout
    from deo_cli.models import build_encoder, get_model_spec

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    if recipe.input.bounds:
        raise UsageError(
            "input.bounds cuts one scene; detect-change train reads whole OSCD cities",
            "remove input.bounds (choose cities with train_cities/test_cities)",
        )
    out = check_run_folder(Path(out), overwrite)
    if recipe.data is None:
        raise UsageError("detect-change train needs --data, an OSCD-format folder", "pass --data PATH")
    cities = list_cities(recipe.data)
    test = select_cities(cities, list(recipe.test_cities)) if recipe.test_cities else []
    if recipe.train_cities:
        train = select_cities(cities, list(recipe.train_cities))
    else:
        names = {c.name for c in test}
        train = [c for c in cities if c.label is not None and c.name not in names]
    overlap_names = {c.name for c in train} & {c.name for c in test}
    if overlap_names:
        raise UsageError(f"cities {sorted(overlap_names)} are both train and test cities", "keep them apart")
    for c in [*train, *test]:
        if c.label is None:
            raise DataError(f"OSCD city {c.name} has no change label", "choose labelled cities")
    if not train:
        raise DataError(
            f"no labelled training city under {recipe.data}", "add train_labels/ or pass --train-cities"
        )
    spec = get_model_spec(recipe.model.name) if encoder is None else encoder.spec
    align = max(spec.feature_strides)
    chip = recipe.chip_size
    if chip % align:
        raise UsageError(
            f"--chip-size {chip} is not a multiple of the encoder's coarsest stride {align}",
            f"use {-(-chip // align) * align}",
        )
    manifests = (
        (spec.manifest, spec.rgb_manifest)
        if encoder is None
        else (encoder.manifest, encoder.rgb_manifest if encoder.has_rgb_stem else None)
    )
    sources, stem = _oscd_sources(train, recipe.input, chip, recipe.chip_overlap, manifests)
    refs, counts = collect_chips(sources, 2)
    if counts[1] == 0:
        raise DataError("the training cities hold no change pixel", "add cities with change")
    held = holdout(len(refs), recipe.val_fraction, recipe.runtime.seed)
    train_refs = [r for r, h in zip(refs, held) if not h]
    val_refs = [r for r, h in zip(refs, held) if h]
    weights = list(recipe.class_weights) or [1.0, float(np.sqrt(counts[0] / counts[1]))]
    if len(weights) != 2:
        raise UsageError("--class-weights needs two values (no change, change)", "e.g. --class-weights 1,10")

    seed_everything(recipe.runtime.seed)
    rt = resolve_runtime(recipe.runtime)
    device, dtype = rt.device, rt.precision
    if encoder is None:
        encoder = build_encoder(recipe.model.name, weights=recipe.model.weights)
    frozen = not recipe.finetune
    torch.manual_seed(recipe.runtime.seed)
    pixel_bands = len(sources[0][0].before.bands)
    head = make_change_head(
        recipe.head,
        SiameseChange.head_channels(encoder.feature_channels, recipe.fusion),
        encoder.feature_strides,
        recipe.head_channels,
        pixel_bands,
        recipe.pixel_channels,
    )
    model = SiameseChange(encoder, head, freeze=frozen, fusion=recipe.fusion)
    train_ds = LabelledChips(sources, train_refs, recipe.augment)
    val_ds = LabelledChips(sources, val_refs, "none")
    if len(train_ds) < 2:
        raise DataError("fewer than 2 training chips", "add cities or lower --chip-size")
    for ds in (train_ds, val_ds):
        ds.preload()
    forward_fn = image_forward
    if frozen:
        model.to(device)
        (train_ds, val_ds), forward_fn = cache_frozen_inputs(
            (train_ds, val_ds), model.head_inputs, rt.batch_size, device, dtype
        )
    train_loader = make_loader(
        train_ds, rt.batch_size, rt.num_workers, shuffle=True, seed=rt.seed, drop_single=True
    )
    val_loader = make_loader(val_ds, rt.batch_size, rt.num_workers, shuffle=False) if len(val_ds) else None
    settings = FitSettings(
        epochs=recipe.epochs,
        warmup_epochs=recipe.warmup_epochs,
        lr=recipe.lr,
        min_lr=recipe.min_lr,
        weight_decay=recipe.weight_decay,
        num_classes=2,
        ignore_index=None,
        class_weights=weights,
        select="f1",
    )
    log.info(
        "training a siamese %s head (%s, encoder %s) on %s: %d training, %d validation chips of %d px; "
        "change is %.2f%% of labelled pixels, class weights %s; %s, %s",
        recipe.head,
        recipe.fusion,
        "frozen" if frozen else "fine-tuned",
        ", ".join(c.name for c in train),
        len(train_ds),
        len(val_ds),
        chip,
        100.0 * counts[1] / counts.sum(),
        [round(w, 3) for w in weights],
        device,
        precision_name(dtype),
    )
    fit = fit_dense(model, train_loader, val_loader, settings, device, dtype, forward_fn, progress=progress)
    head_state, enc_state = trainable_to_head_file(fit.best_state, frozen=frozen)
    model.head.load_state_dict(head_state)
    if enc_state is not None:
        model.encoder.load_state_dict(enc_state)
    model.eval()
    threshold, val_f1 = 0.5, float("nan")
    val_best, val_best_f1 = None, float("nan")
    if val_loader is not None:
        probs, targets = _val_probabilities(model, val_loader, device, dtype, forward_fn)
        val_best, val_best_f1 = best_f1_threshold(probs, targets)
        threshold = transfer_threshold(val_best, recipe.threshold_shrink)
        val_f1 = f1_at(probs, targets, threshold)
        log.info(
            "P(change) threshold %.4g (validation F1 %.4f; validation optimum %.2f, F1 %.4f, shrink %g)",
            threshold,
            val_f1,
            val_best,
            val_best_f1,
            recipe.threshold_shrink,
        )
    metrics: dict = {
        "best_epoch": fit.best_epoch,
        "select": "val_f1" if val_loader is not None else "last epoch",
        "history": fit.history,
        "train_cities": [c.name for c in train],
        "test_cities": [c.name for c in test],
        "train_chips": len(train_ds),
        "val_chips": len(val_ds),
        "change_fraction_train": float(counts[1] / counts.sum()),
        "class_weights": weights,
        "threshold": threshold,
        "val_f1_at_threshold": val_f1,
        "val_best_threshold": val_best,
        "val_best_f1": val_best_f1,
        "threshold_shrink": recipe.threshold_shrink,
        "encoder": "frozen" if frozen else "fine-tuned",
        "fit_seconds": round(fit.seconds, 3),
    }
    record = encoder_record(encoder, frozen=frozen)
    hf = HeadFile(
        task="change",
        head={
            "kind": recipe.head,
            "channels": recipe.head_channels,
            "num_classes": 2,
            "in_channels": SiameseChange.head_channels(encoder.feature_channels, recipe.fusion),
            "in_strides": list(encoder.feature_strides),
            "fusion": recipe.fusion,
            "pixel_bands": pixel_bands if recipe.pixel_channels > 0 else 0,
            "pixel_channels": recipe.pixel_channels,
        },
        head_state=head_state,
        encoder=record,
        encoder_state=encoder_state_for(encoder, record, enc_state),
        classes=CHANGE_CLASSES.to_dict(),
        chip_size=chip,
        normalization={
            "stem": stem,
            "manifest": encoder.manifest.to_dict(),
            "per_date": "unit inferred and RGB scale computed per date",
        },
        threshold=threshold,
        metrics={k: v for k, v in metrics.items() if k != "history"},
        recipe=recipe_to_dict(recipe),
    )
    if test:
        dense = DenseHeadModel(model.eval(), encoder, 2)
        metrics["test"] = {}
        totals = np.zeros(3, np.int64)
        for city in test:
            first, second, _ = open_dates(str(city.before), str(city.after), recipe.input)
            score, _ = change_score_array(
                first,
                second,
                dense,
                chip_size=chip,
                unit=recipe.input.unit,
                rgb_max=recipe.input.rgb_max,
                batch_size=rt.batch_size,
                device=device,
                precision=dtype,
                head=hf,
            )
            label = read_change_label(city, score.shape)
            valid = np.isfinite(score)
            pred = np.nan_to_num(score, nan=0.0) > threshold
            s = binary_scores(pred, label, valid)
            p, tt = pred[valid], label[valid].astype(bool)
            totals += [int(np.sum(p & tt)), int(np.sum(p & ~tt)), int(np.sum(~p & tt))]
            metrics["test"][city.name] = {**s, "change_fraction": float(label[valid].mean())}
            log.info("test %s: F1 %.4f, IoU %.4f", city.name, s["f1"], s["iou"])
        tp, fp, fn = totals
        metrics["test_overall"] = {
            "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan"),
            "iou": tp / (tp + fp + fn) if (tp + fp + fn) else float("nan"),
        }
        hf.metrics["test"] = metrics["test"]
    head_path = write_run_folder(out, overwrite, hf, metrics, recipe, "detect-change train")
    return ChangeTrainResult(out=out, head=head_path, metrics=metrics, seconds=time.perf_counter() - t0)


__all__ = [
    "ChangeResult",
    "ChangeTrainResult",
    "CosineChange",
    "PairChipReader",
    "ScoreSink",
    "SiameseChange",
    "best_f1_threshold",
    "build_change_model",
    "build_zero_shot_model",
    "change_score_array",
    "check_overlap",
    "f1_at",
    "default_change_layers",
    "open_dates",
    "parse_layers",
    "run_change_train",
    "run_detect_change",
    "summary_line",
    "transfer_threshold",
    "upsample_to",
]
