"""``deo segment train``: a segmentation head on a frozen DEO encoder.

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
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deo_cli.data.segdata import (
    ClassTable,
    RasterLabels,
    find_pairs,
    holdout,
    label_values,
    load_class_file,
    read_pairs_csv,
)
from deo_cli.errors import DataError, UsageError
from deo_cli.infer.chips import ChipReader
from deo_cli.infer.headfile import (
    HeadFile,
    check_run_folder,
    encoder_record,
    encoder_state_for,
    make_head,
    trainable_to_head_file,
    write_run_folder,
)
from deo_cli.infer.trainchips import (
    ChipRef,
    LabelledChips,
    cache_frozen_inputs,
    collect_chips,
    make_loader,
    training_plan,
)
from deo_cli.progress import NullProgress, Progress
from deo_cli.recipes import SegmentTrainRecipe, recipe_to_dict
from deo_cli.runtime import precision_name, resolve_runtime, seed_everything
from deo_cli.tasks.segment.predict import _scene_inputs
from deo_cli.train.supervised import FitSettings, FrozenEncoderSegmenter, evaluate_dense, fit_dense

log = logging.getLogger(__name__)


@dataclass
class SegmentTrainResult:
    out: Path
    head: Path
    metrics: dict
    seconds: float
    classes: ClassTable
    train_chips: int
    val_chips: int


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
    from deo_cli.tasks.segment.geobench_chips import GeoBenchChips, plan_geobench

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


def _load_data(recipe: SegmentTrainRecipe, manifests, chip: int | None):
    """(datasets per split, class table, description) of the recipe's data, its chips prepared
    for ``manifests``."""
    d = recipe.data
    if d.geobench_task:
        sets, table, info = _geobench_data(recipe, manifests, chip)
    else:
        sources, table, splits, info = _raster_data(recipe, manifests, chip)
        sets = _datasets_from_refs(sources, splits, d.augment)
    return sets, table, info


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
    manifests, chip = _train_inputs(recipe, encoder)
    # data first: every user mistake is reported before the model loads
    sets, table, info = _load_data(recipe, manifests, chip)
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
            sets, table, info = _load_data(recipe, own, chip)
            train_ds, val_ds, test_ds = sets["train"], sets.get("val"), sets.get("test")
    for ds in (train_ds, val_ds, test_ds):
        if isinstance(ds, LabelledChips):
            ds.preload()
    model = _segment_model(recipe, encoder, table.num_classes)
    (train_ds, val_ds, test_ds), forward_fn, train_loader, val_loader = _train_loaders(
        (train_ds, val_ds, test_ds), model, rt
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


def _segment_model(recipe: SegmentTrainRecipe, encoder, num_classes: int) -> FrozenEncoderSegmenter:
    """The frozen encoder and a head initialised from ``runtime.seed``."""
    torch.manual_seed(recipe.runtime.seed)
    head = make_head(
        recipe.head,
        encoder.feature_channels,
        encoder.feature_strides,
        num_classes,
        recipe.head_channels,
    )
    return FrozenEncoderSegmenter(encoder, head, freeze=True)


def _train_loaders(datasets, model, rt):
    """The datasets with the frozen encoder's outputs computed once
    (:func:`~deo_cli.infer.trainchips.cache_frozen_inputs`), the forward function that fits them,
    and the training and validation loaders (none without validation chips)."""
    bs = rt.batch_size
    model.to(rt.device)
    (train_ds, val_ds, test_ds), forward_fn = cache_frozen_inputs(
        datasets, model.features, bs, rt.device, rt.precision
    )
    train_loader = make_loader(train_ds, bs, rt.num_workers, shuffle=True, seed=rt.seed, drop_single=True)
    val_loader = (
        make_loader(val_ds, bs, rt.num_workers, shuffle=False) if val_ds is not None and len(val_ds) else None
    )
    return (train_ds, val_ds, test_ds), forward_fn, train_loader, val_loader


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


__all__ = [
    "SegmentTrainResult",
    "run_segment_train",
]
