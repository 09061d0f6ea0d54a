"""``deo segment train`` and ``deo segment predict``: class maps from a frozen DEO encoder.

**Training** (:func:`run_segment_train`; docs/method.md §3.1): a frozen encoder (eval mode, no
gradients) and a UPerNet head (pyramid pooling 1/2/3/6, 512 channels, all four levels) or a
linear head, trained by :func:`~deo_cli.train.supervised.fit_dense` (AdamW lr 1e-4, weight decay
0.01, linear warm-up then cosine to 1e-6, cross-entropy with ignored pixels, autocast on GPU)
keeping the epoch with the best validation mIoU.

- Data: image/label raster pairs (:mod:`deo_cli.data.segdata`) cut into chips that are read
  exactly as prediction reads scenes (:mod:`deo_cli.infer.trainchips`), or a GEO-Bench
  segmentation task (its train/valid splits; images normalised by the model's band manifest,
  not the task's statistics, so the head works on scenes afterwards).
- Validation: the CSV's ``split`` column, else a deterministic hold-out
  (:func:`~deo_cli.data.segdata.holdout`, seeded by ``runtime.seed``): whole images when
  there are at least ``1 / val_fraction`` of them, else chips.
- Output folder: ``head.pt`` (:mod:`deo_cli.infer.headfile`), ``metrics.json`` (history, best
  epoch, validation mIoU/accuracy/per-class IoU, test metrics when a test split exists, class
  pixel counts) and ``recipe.yaml``; written into a temporary folder and renamed into place.

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
import torch

from deo_cli import __version__
from deo_cli.data.segdata import (
    ClassTable,
    RasterLabels,
    find_pairs,
    holdout,
    label_values,
    load_class_file,
    read_pairs_csv,
)
from deo_cli.errors import DataError, DeoError, UsageError
from deo_cli.infer.chips import ChipReader
from deo_cli.infer.dense import CogSink, DenseHeadModel, aligned_plan, gdal_tags, with_used_overlap
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
from deo_cli.infer.prepare import InputPlan, open_input, prepare_input
from deo_cli.infer.runner import block_rows_for, run_dense
from deo_cli.infer.tiling import check_chip_memory
from deo_cli.infer.trainchips import (
    ChipRef,
    LabelledChips,
    cache_frozen_inputs,
    collect_chips,
    make_loader,
    training_plan,
)
from deo_cli.io.atomic import check_output, outputs_locked
from deo_cli.io.writers import RasterLayout
from deo_cli.progress import NullProgress, Progress
from deo_cli.recipes import (
    SegmentPredictRecipe,
    SegmentTrainRecipe,
    recipe_hash,
    recipe_path_for,
    recipe_to_dict,
    save_recipe,
)
from deo_cli.runtime import precision_name, resolve_runtime, seed_everything
from deo_cli.train.supervised import (
    FitSettings,
    FrozenEncoderSegmenter,
    evaluate_dense,
    fit_dense,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class SegmentTrainResult:
    out: Path
    head: Path
    metrics: dict
    seconds: float
    classes: ClassTable
    train_chips: int
    val_chips: int


def _scene_inputs(recipe_input, image: str, manifest, rgb_manifest, head=None) -> tuple[object, InputPlan]:
    """Open and prepare ``image``; with a trained ``head``, through the stem it was trained on
    (:func:`~deo_cli.infer.headfile.head_input_stem`: a scene without its bands is refused)."""
    i = recipe_input
    scene = open_input(image, i)
    with scene:
        stem = head_input_stem(head, scene) if head is not None else "auto"
        inp = prepare_input(scene, manifest, rgb_manifest, i.unit, i.rgb_max, stem=stem)
    return scene, inp


def _class_table(recipe: SegmentTrainRecipe, label_paths: list[str]) -> ClassTable:
    d = recipe.data
    if d.classes:
        return load_class_file(d.classes, recipe.ignore_index)
    ignore = [recipe.ignore_index] if recipe.ignore_index is not None else []
    values = label_values(label_paths, d.label_nodata)
    if not values - set(ignore):
        raise DataError(
            "the label rasters hold no class values", "check their nodata value or --ignore-index"
        )
    if len(values) > 256:
        raise DataError(
            f"the label rasters hold {len(values)} distinct values; they do not look like classes",
            "pass a --classes file listing the classes",
        )
    return ClassTable.from_values(values, ignore)


def _raster_data(recipe: SegmentTrainRecipe, manifests, chip: int):
    """(sources, class table, chip refs per split, description) for image/label rasters."""
    d = recipe.data
    if d.pairs:
        pairs = read_pairs_csv(d.pairs)
    else:
        if not (d.images and d.labels):
            raise UsageError("--images needs --labels (and the other way round)", "pass both, or --pairs CSV")
        pairs = find_pairs(d.images, d.labels)
    table = _class_table(recipe, [p.label for p in pairs])
    sources = []
    inputs = []
    for p in pairs:
        scene, inp = _scene_inputs(recipe.input, p.image, *manifests)
        plan = training_plan(scene.height, scene.width, chip, d.chip_overlap)
        reader = ChipReader(scene, inp.bands, inp.normalizer, plan)
        sources.append((reader, RasterLabels(p.label, scene.grid, table, d.label_nodata)))
        inputs.append(inp)
    stems = {i.stem for i in inputs}
    if len(stems) > 1:
        raise DataError(
            "some training images have every multispectral band and others only RGB",
            "train on images with the same bands",
        )
    refs, counts = collect_chips(sources, table.num_classes)
    if not refs:
        raise DataError(
            "no training chip has a labelled pixel", "check the labels, --ignore-index and the classes"
        )
    splits = _assign_splits(pairs, refs, d.val_fraction, recipe.runtime.seed)
    info = {
        "source": "rasters",
        "pairs": len(pairs),
        "stem": inputs[0].stem,
        "normalization": inputs[0].describe()
        | {"per_image": "unit inferred and RGB scale computed per image"},
        "class_pixels": {table.classes[i].name: int(c) for i, c in enumerate(counts)},
    }
    return sources, table, splits, info


def _assign_splits(pairs, refs: list[ChipRef], val_fraction: float, seed: int) -> dict[str, list[ChipRef]]:
    out: dict[str, list[ChipRef]] = {"train": [], "val": [], "test": []}
    if any(p.split for p in pairs):
        for r in refs:
            out[pairs[r.source].split or "train"].append(r)
        how = "split column"
    elif val_fraction > 0 and len(pairs) * val_fraction >= 1:
        held = holdout(len(pairs), val_fraction, seed)
        for r in refs:
            out["val" if held[r.source] else "train"].append(r)
        how = f"{int(held.sum())} of {len(pairs)} images held out"
    else:
        held = holdout(len(refs), val_fraction, seed)
        for r, h in zip(refs, held):
            out["val" if h else "train"].append(r)
        how = f"{int(held.sum())} of {len(refs)} chips held out"
    log.info("validation: %s", how)
    if not out["train"]:
        raise DataError("no training chips left after the validation split", "add data or lower val_fraction")
    return out


def _geobench_data(recipe: SegmentTrainRecipe, manifests, chip: int | None):
    from deo_cli.data.geobench import open_task
    from deo_cli.infer.geobench_chips import GeoBenchChips, plan_geobench

    task = open_task(recipe.data.geobench_task, recipe.data.geobench_root)
    if task.kind != "segmentation":
        raise UsageError(f"GEO-Bench task {task.name} is a {task.kind} task", "choose a segmentation task")
    plan = plan_geobench(task, *manifests, recipe.input.unit)
    n = task.label.num_classes
    ignore = [recipe.ignore_index] if recipe.ignore_index is not None else []
    if recipe.data.classes:
        table = load_class_file(recipe.data.classes, recipe.ignore_index)
    else:
        table = ClassTable.from_values(range(n), ignore, names=task.label.class_names)
    sets = {}
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        try:
            ids = task.split_ids(key)
        except DataError:
            ids = []
        sets[split] = GeoBenchChips(
            plan, ids, table, chip, augment=recipe.data.augment if split == "train" else "none"
        )
    info = {
        "source": f"geobench:{task.name}",
        "stem": plan.stem,
        "normalization": plan.describe(),
    }
    return sets, table, info


def _datasets_from_refs(sources, splits, augment):
    return {
        k: LabelledChips(sources, refs, augment if k == "train" else "none") if refs else None
        for k, refs in splits.items()
    }


def run_segment_train(
    recipe: SegmentTrainRecipe,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    encoder=None,
) -> SegmentTrainResult:
    """Train a segmentation head (see the module docstring); writes ``out/`` and returns the result."""
    from deo_cli.models import build_encoder

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    out = check_run_folder(Path(out), overwrite)
    d = recipe.data
    manifests, chip = _train_inputs(recipe, encoder)

    def load_data(mans):
        if d.geobench_task:
            sets, table, info = _geobench_data(recipe, mans, chip)
        else:
            sources, table, splits, info = _raster_data(recipe, mans, chip)
            sets = _datasets_from_refs(sources, splits, d.augment)
        return sets, table, info

    # data first: every user mistake is reported before the model loads
    sets, table, info = load_data(manifests)
    if recipe.class_weights and len(recipe.class_weights) != table.num_classes:
        raise UsageError(
            f"{len(recipe.class_weights)} class weights for {table.num_classes} classes",
            "give one weight per class, in class-table order",
        )
    train_ds, val_ds, test_ds = sets["train"], sets.get("val"), sets.get("test")
    if train_ds is None or len(train_ds) < 2:
        raise DataError("fewer than 2 training chips", "add data, lower --chip-size or val_fraction")

    seed_everything(recipe.runtime.seed)
    rt = resolve_runtime(recipe.runtime)
    device, dtype = rt.device, rt.precision
    if encoder is None:
        encoder = build_encoder(recipe.model.name, weights=recipe.model.weights)
        own = (encoder.manifest, encoder.rgb_manifest if encoder.has_rgb_stem else None)
        if [m.to_dict() if m else None for m in own] != [m.to_dict() if m else None for m in manifests]:
            log.info(
                "%s carries its own band manifest: preparing the training chips for it", recipe.model.weights
            )
            sets, table, info = load_data(own)
            train_ds, val_ds, test_ds = sets["train"], sets.get("val"), sets.get("test")
    for ds in (train_ds, val_ds, test_ds):
        if isinstance(ds, LabelledChips):
            ds.preload()
    torch.manual_seed(recipe.runtime.seed)
    head = make_head(
        recipe.head,
        encoder.feature_channels,
        encoder.feature_strides,
        table.num_classes,
        recipe.head_channels,
    )
    model = FrozenEncoderSegmenter(encoder, head, freeze=True)
    bs = rt.batch_size
    model.to(device)
    (train_ds, val_ds, test_ds), forward_fn = cache_frozen_inputs(
        (train_ds, val_ds, test_ds), model.features, bs, device, dtype
    )
    train_loader = make_loader(train_ds, bs, rt.num_workers, shuffle=True, seed=rt.seed, drop_single=True)
    val_loader = (
        make_loader(val_ds, bs, rt.num_workers, shuffle=False) if val_ds is not None and len(val_ds) else None
    )
    settings = FitSettings(
        epochs=recipe.epochs,
        warmup_epochs=recipe.warmup_epochs,
        lr=recipe.lr,
        min_lr=recipe.min_lr,
        weight_decay=recipe.weight_decay,
        num_classes=table.num_classes,
        ignore_index=None,  # ignored pixels carry IGNORE (-100), cross-entropy's default
        class_weights=list(recipe.class_weights) or None,
        select="miou",
    )
    log.info(
        "training a %s head (%d classes) on frozen %s: %d training, %d validation chips of %s px, %s, %s",
        recipe.head,
        table.num_classes,
        encoder.name,
        len(train_ds),
        len(val_ds) if val_ds is not None else 0,
        chip or "native",
        device,
        precision_name(dtype),
    )
    fit = fit_dense(model, train_loader, val_loader, settings, device, dtype, forward_fn, progress=progress)
    head_state, _ = trainable_to_head_file(fit.best_state, frozen=True)
    model.head.load_state_dict(head_state)
    metrics: dict = {
        "best_epoch": fit.best_epoch,
        "select": "val_miou" if val_loader is not None else "last epoch (no validation chips)",
        "history": fit.history,
        "train_chips": len(train_ds),
        "val_chips": len(val_ds) if val_ds is not None else 0,
        "classes": table.to_dict(),
        "data": info,
        "seconds": round(fit.seconds, 3),
    }
    for split, loader_ds in (("val", val_ds), ("test", test_ds)):
        if loader_ds is not None and len(loader_ds):
            metrics[split] = _split_metrics(model, loader_ds, table, rt, forward_fn)
    head_file = _segment_head_file(
        recipe, encoder, table, head_state, chip or train_ds[0]["image"].shape[-1], info, metrics
    )
    head_path = write_run_folder(out, overwrite, head_file, metrics, recipe, "segment train")
    return SegmentTrainResult(
        out=out,
        head=head_path,
        metrics=metrics,
        seconds=time.perf_counter() - t0,
        classes=table,
        train_chips=len(train_ds),
        val_chips=len(val_ds) if val_ds is not None else 0,
    )


def _train_inputs(recipe: SegmentTrainRecipe, encoder) -> tuple[tuple, int | None]:
    """The band manifests the chips are prepared for and the chip size, checked before any data
    is read (one way of giving the data; a chip size the coarsest stride divides)."""
    from deo_cli.models import get_model_spec

    d = recipe.data
    given = [bool(d.images or d.labels), bool(d.pairs), bool(d.geobench_task)]
    if sum(given) != 1:
        raise UsageError(
            "give the training data one way",
            "pass --images and --labels, or --pairs CSV, or --geobench-task NAME",
        )
    spec = get_model_spec(recipe.model.name) if encoder is None else encoder.spec
    manifests = (
        (spec.manifest, spec.rgb_manifest)
        if encoder is None
        else (encoder.manifest, encoder.rgb_manifest if encoder.has_rgb_stem else None)
    )
    align = max(spec.feature_strides)
    chip = recipe.chip_size or (None if d.geobench_task else spec.input_size)
    if chip is not None and chip % align:
        raise UsageError(
            f"--chip-size {chip} is not a multiple of the encoder's coarsest stride {align}",
            f"use {-(-chip // align) * align}",
        )
    return manifests, chip


def _split_metrics(model, dataset, table: ClassTable, rt, forward_fn) -> dict:
    """mIoU, accuracy, per-class IoU and the confusion matrix of ``model`` on ``dataset``."""
    m = evaluate_dense(
        model,
        make_loader(dataset, rt.batch_size, rt.num_workers, shuffle=False),
        table.num_classes,
        rt.device,
        rt.precision,
        forward_fn=forward_fn,
    )
    return {
        "miou": m["miou"],
        "accuracy": m["accuracy"],
        "iou": dict(zip(list(table.names), m["iou"])),
        "confusion": m["confusion"],
    }


def _segment_head_file(recipe, encoder, table: ClassTable, head_state, chip: int, info: dict, metrics: dict):
    """The head file of a trained segmentation head (frozen encoder)."""
    record = encoder_record(encoder, frozen=True)
    head_file = HeadFile(
        task="segment",
        head={
            "kind": recipe.head,
            "channels": recipe.head_channels,
            "num_classes": table.num_classes,
            "in_channels": list(encoder.feature_channels),
            "in_strides": list(encoder.feature_strides),
            "fusion": None,
        },
        head_state=head_state,
        encoder=record,
        encoder_state=encoder_state_for(encoder, record, None),
        classes=table.to_dict(),
        chip_size=int(chip),
        normalization=info.get("normalization", {}),
        metrics={k: v for k, v in metrics.items() if k != "history"},
        recipe=recipe_to_dict(recipe),
    )
    return head_file


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


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
    from deo_cli.infer.embed import check_output_suffix, plan_outputs

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
                reader,
                model,
                sink,
                blend=t.blend,
                max_nodata_fraction=t.max_nodata_fraction,
                batch_size=rt.batch_size,
                num_workers=rt.num_workers,
                micro_batch=rt.micro_batch,
                device=rt.device,
                precision=rt.precision,
                progress=progress,
                description=f"segmenting {scene.name}",
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
    "SegmentTrainResult",
    "build_segment_model",
    "run_segment_predict",
    "run_segment_train",
    "summary_line",
]
