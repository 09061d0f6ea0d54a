"""``deo segment predict``: class maps from a frozen DEO encoder and a trained head.

**Prediction** (:func:`run_segment_predict`): the streaming machinery of ``deo embed``
(:func:`~deo_cli.infer.runner.run_dense`) with the encoder + head as the model. The head's
logits are bilinearly upsampled to the chip's full input resolution inside each chip (as in
training and in the paper's protocol), so the stitcher works at **stride 1**: chip logits are
blended across overlaps with the runner's cosine weights and the class is the argmax of the
blended logits. Chips and overlaps are multiples of the encoder's coarsest stride (32 for
Swin), so overlapping chips see the same patch grid. Each scene goes through the stem the head
was trained on (:func:`~deo_cli.infer.headfile.head_input_stem`, shared with
``detect-change --head``): a head trained on the multispectral bands refuses a scene without
them (one line), a head trained on RGB takes a multispectral scene's red, green and blue.
Outputs, on exactly the input's grid and CRS:

- class COG: ``uint8`` (``uint16`` when a class value exceeds 254), the original label
  values, a reserved nodata value (255 / 65535 unless the class file says otherwise) wherever
  the input is nodata, a GDAL colour table with the class colours (nodata transparent),
  ``mode`` overviews, band description ``class``, tags ``DEO_CLASSES`` (values, names,
  colours), ``DEO_HEAD``, model, weights, band manifest, normalisation, tiling and recipe hash;
- ``--probabilities``: float32 COG, one band per class (softmax of the blended logits, band
  descriptions = class names), NaN nodata, average overviews;
- ``--preview``: the class map in its colours as a PNG.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deo_cli import __version__
from deo_cli.data.segdata import ClassTable
from deo_cli.errors import DeoError, UsageError
from deo_cli.infer.chips import ChipReader
from deo_cli.infer.dense import CogSink, DenseHeadModel, aligned_plan, gdal_tags, with_used_overlap
from deo_cli.infer.headfile import (
    HeadFile,
    build_head_module,
    head_input_stem,
    head_manifests,
    load_head,
    load_head_encoder,
)
from deo_cli.infer.prepare import InputPlan, open_input, prepare_input
from deo_cli.infer.runner import block_rows_for, run_dense, stream_options
from deo_cli.infer.tiling import check_chip_memory
from deo_cli.io.atomic import check_output, outputs_locked
from deo_cli.io.writers import RasterLayout
from deo_cli.progress import Progress
from deo_cli.recipes import SegmentPredictRecipe, recipe_hash, recipe_path_for, save_recipe
from deo_cli.runtime import resolve_runtime
from deo_cli.train.supervised import FrozenEncoderSegmenter

log = logging.getLogger(__name__)


def _scene_inputs(recipe_input, image: str, manifest, rgb_manifest, head=None) -> tuple[object, InputPlan]:
    """Open and prepare ``image``; with a trained ``head``, through the stem it was trained on
    (:func:`~deo_cli.infer.headfile.head_input_stem`: a scene without its bands is refused)."""
    i = recipe_input
    scene = open_input(image, i)
    with scene:
        stem = head_input_stem(head, scene) if head is not None else "auto"
        inp = prepare_input(scene, manifest, rgb_manifest, i.unit, i.rgb_max, stem=stem)
    return scene, inp


class ClassSink:
    """Blended logits -> classes (and probabilities): a runner sink.

    ``write_rows(row0, logits)`` takes ``(K, rows, width)`` float32 with NaN where nothing was
    computed or the input is nodata; writes the label values of the argmax (nodata value where
    NaN) to ``classes`` and, when given, the softmax to ``probabilities``.
    """

    def __init__(self, table: ClassTable, classes: CogSink, probabilities: CogSink | None = None):
        self.table = table
        self.classes = classes
        self.probabilities = probabilities
        self.block_rows = classes.block_rows
        self.counts = np.zeros(table.num_classes, np.int64)
        self.nodata_pixels = 0

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        valid = np.isfinite(data).all(axis=0)
        logits = np.where(valid[None], data, 0.0)
        idx = logits.argmax(axis=0)
        values = self.table.decode(idx).astype(np.float32)
        values[~valid] = self.table.nodata
        self.classes.write_rows(row0, values[None])
        self.counts += np.bincount(idx[valid].ravel(), minlength=self.table.num_classes)
        self.nodata_pixels += int((~valid).sum())
        if self.probabilities is not None:
            z = logits - logits.max(axis=0, keepdims=True)
            e = np.exp(z)
            p = (e / e.sum(axis=0, keepdims=True)).astype(np.float32)
            p[:, ~valid] = np.nan
            self.probabilities.write_rows(row0, p)


@dataclass
class SegmentResult:
    source: str
    output: Path | None = None
    status: str = "failed"
    error: DeoError | None = None
    probabilities: Path | None = None
    preview: Path | None = None
    recipe: Path | None = None
    crs: str | None = None
    grid: tuple[int, int] | None = None
    seconds: float = 0.0
    chips: int = 0
    class_pixels: dict = field(default_factory=dict)
    nodata_pixels: int = 0


def _crs_text(crs) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def build_segment_model(head: HeadFile, weights: str | None = None) -> tuple[DenseHeadModel, object]:
    """The encoder + head of a segment head file, as a stride-1 model for the runner."""
    encoder = load_head_encoder(head, weights)
    module = FrozenEncoderSegmenter(encoder, build_head_module(head), freeze=True).eval()
    return DenseHeadModel(module, encoder, int(head.head["num_classes"])), encoder


def _suffixed(path: Path | None, out: Path, many: bool, default_suffix: str) -> Path | None:
    if path is None or not many:
        return path
    if path.suffix:
        return path.with_name(f"{path.stem}_{out.stem}{path.suffix}")
    return path / f"{out.stem}{default_suffix}"


def run_segment_predict(
    scenes: list[str],
    output: str | os.PathLike,
    head: str | os.PathLike,
    recipe: SegmentPredictRecipe,
    *,
    probabilities: str | os.PathLike | None = None,
    preview: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    weights: str | None = None,
) -> list[SegmentResult]:
    """Write a class COG per scene (see the module docstring). With one scene, errors raise;
    with several, each failure is recorded in its result and the other scenes still run."""
    from deo_cli.infer.outputs import check_output_suffix, plan_outputs

    if not scenes:
        raise UsageError("no scene given", "pass one or more scenes")
    output = Path(output)
    probabilities = Path(probabilities) if probabilities is not None else None
    preview = Path(preview) if preview is not None else None
    if preview is not None and preview.suffix.lower() not in (".png", ""):
        raise UsageError(f"--preview {preview.name} must be a .png file", "name it e.g. preview.png")
    hf = load_head(head, "segment")
    table = ClassTable.from_dict(hf.classes)
    many = len(scenes) > 1
    outs = plan_outputs(list(scenes), output, "cog")
    if probabilities is not None and probabilities.suffix and not probabilities.is_dir():
        check_output_suffix(probabilities, "cog", "--probabilities")
    manifests = head_manifests(hf)
    results: list[SegmentResult] = []
    jobs = []
    for source, out in zip(scenes, outs):
        res = SegmentResult(source=str(source), output=out)
        try:
            if out is None:
                raise UsageError(f"cannot name an output for {source}", "give one scene per run")
            prob = _suffixed(probabilities, out, many, "_probabilities.tif")
            prev = _suffixed(preview, out, many, ".png")
            for p in (out, prob, prev, recipe_path_for(out)):
                if p is not None:
                    check_output(p, overwrite)
            scene, inp = _scene_inputs(recipe.input, source, *manifests, head=hf)
            jobs.append((res, scene, inp, prob, prev))
        except DeoError as e:
            if not many:
                raise
            res.error = e
        results.append(res)
    if not jobs:
        return results
    # one run per output; temporaries of killed runs of these outputs go
    with outputs_locked([j[0].output for j in jobs] + [j[3] for j in jobs], [j[4] for j in jobs]):
        _predict_jobs(jobs, hf, table, recipe, weights, overwrite, progress, many)
    return results


def _predict_jobs(jobs, hf, table, recipe, weights, overwrite, progress, many) -> None:
    model, encoder = build_segment_model(hf, weights)
    rt = resolve_runtime(recipe.runtime)
    model = model.to(rt.device)
    log.info(
        "%s + %s head (%d classes) on %s, %s",
        encoder.name,
        hf.head["kind"],
        table.num_classes,
        rt.device,
        rt.precision_name,
    )
    for res, scene, inp, prob, prev in jobs:
        try:
            _predict_scene(res, scene, inp, prob, prev, hf, table, model, recipe, rt, overwrite, progress)
        except DeoError as e:
            if not many:
                raise
            res.error = e


def _predict_scene(res, scene, inp, prob, prev, hf, table, model, recipe, rt, overwrite, progress):
    t0 = time.perf_counter()
    t = recipe.tiling
    chip = t.chip_size or hf.chip_size
    check_chip_memory(chip, rt.batch_size, len(inp.bands), model.align, hf.chip_size)
    plan = aligned_plan(scene.height, scene.width, chip, 1, model.align, t.overlap)
    recipe = with_used_overlap(recipe, plan)
    assert (plan.out_height, plan.out_width) == (scene.height, scene.width)
    reader = ChipReader(scene, inp.bands, inp.normalizer, plan)
    meta = {
        "deo_version": __version__,
        "deo_model": model.name,
        "deo_weights": model.weights_uri or "random",
        "deo_weights_sha256": model.weights_sha256,
        "deo_head": hf.describe(),
        "deo_classes": table.to_dict(),
        "deo_band_manifest": inp.manifest.to_dict(),
        "deo_normalization": inp.describe(),
        "deo_tiling": {
            **plan.describe(),
            "blend": t.blend,
            "logits": "bilinear to the chip's input resolution, blended across overlaps, then argmax",
            "max_nodata_fraction": t.max_nodata_fraction,
        },
        "deo_recipe_hash": recipe_hash(recipe),
        "deo_source": {"scene": scene.name, "paths": list(scene.paths)},
        "deo_datetime": scene.datetime,
    }
    block_rows = block_rows_for(16)
    class_layout = RasterLayout(
        count=1,
        dtype=table.dtype,
        nodata=table.nodata,
        descriptions=("class",),
        tags=gdal_tags(meta),
        compress=recipe.output.compress,
        resampling="mode",
    )
    sinks = [CogSink(res.output, scene.grid, class_layout, block_rows, table.colormap(), overwrite)]
    if prob is not None:
        prob_layout = RasterLayout(
            count=table.num_classes,
            dtype="float32",
            nodata=None,
            descriptions=table.names,
            tags=gdal_tags({**meta, "deo_probabilities": "softmax of the blended logits"}),
            compress=recipe.output.compress,
            resampling="average",
        )
        sinks.append(CogSink(prob, scene.grid, prob_layout, block_rows, None, overwrite))
    sink = ClassSink(table, sinks[0], sinks[1] if len(sinks) > 1 else None)
    try:
        with scene:
            stats = run_dense(
                reader, model, sink, **stream_options(t, rt, progress, f"segmenting {scene.name}")
            )
        for s in sinks:
            s.finish()
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    res.probabilities = prob
    res.recipe = save_recipe(recipe, recipe_path_for(res.output), "segment predict")
    if prev is not None:
        from deo_cli.infer.mappreview import write_class_preview

        res.preview = write_class_preview(res.output, prev, overwrite=overwrite)
    res.status = "written"
    res.crs = _crs_text(scene.crs)
    res.grid = (scene.width, scene.height)
    res.chips = stats.chips
    res.seconds = time.perf_counter() - t0
    res.class_pixels = {table.classes[i].name: int(c) for i, c in enumerate(sink.counts)}
    res.nodata_pixels = sink.nodata_pixels


def summary_line(r: SegmentResult) -> str:
    total = sum(r.class_pixels.values()) or 1
    top = sorted(r.class_pixels.items(), key=lambda kv: -kv[1])[:3]
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in top)
    w, h = r.grid or (0, 0)
    return f"{r.output}  {r.crs or 'no CRS'}  {w}x{h} px  {shares}  {r.chips} chips in {r.seconds:.1f} s"


__all__ = [
    "ClassSink",
    "SegmentResult",
    "build_segment_model",
    "run_segment_predict",
    "summary_line",
]
