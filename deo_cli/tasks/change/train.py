"""``deo detect-change train``: a siamese change head trained on OSCD-format pairs
(:func:`run_change_train`), its P(change) threshold taken from the validation chips
(:func:`transfer_threshold`), test cities scored through the streaming prediction path.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deo_cli.data.segdata import IGNORE, ArrayLabels
from deo_cli.errors import DataError, UsageError
from deo_cli.infer.chips import ChipReader
from deo_cli.infer.dense import DenseHeadModel
from deo_cli.infer.headfile import (
    HeadFile,
    check_run_folder,
    encoder_record,
    encoder_state_for,
    trainable_to_head_file,
    write_run_folder,
)
from deo_cli.infer.trainchips import (
    LabelledChips,
    cache_frozen_inputs,
    collect_chips,
    make_loader,
    training_plan,
)
from deo_cli.metrics import binary_scores
from deo_cli.progress import NullProgress, Progress
from deo_cli.recipes import ChangeTrainRecipe, recipe_to_dict
from deo_cli.runtime import precision_name, resolve_runtime, seed_everything
from deo_cli.tasks.change.model import CHANGE_CLASSES, SiameseChange, make_change_head
from deo_cli.tasks.change.pair import PairChipReader, open_dates, prepare_dates
from deo_cli.tasks.change.score import change_score_array
from deo_cli.train.supervised import FitSettings, fit_dense, image_forward

log = logging.getLogger(__name__)


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
    from deo_cli.models import build_encoder

    t0 = time.perf_counter()
    progress = progress or NullProgress()
    if recipe.input.bounds:
        raise UsageError(
            "input.bounds cuts one scene; detect-change train reads whole OSCD cities",
            "remove input.bounds (choose cities with train_cities/test_cities)",
        )
    out = check_run_folder(Path(out), overwrite)
    train, test = _train_cities(recipe)
    chip, manifests = _train_inputs(recipe, encoder)
    sources, stem, train_refs, val_refs, counts = _train_chips(recipe, train, chip, manifests)
    weights = list(recipe.class_weights) or [1.0, float(np.sqrt(counts[0] / counts[1]))]
    if len(weights) != 2:
        raise UsageError("--class-weights needs two values (no change, change)", "e.g. --class-weights 1,10")

    seed_everything(recipe.runtime.seed)
    rt = resolve_runtime(recipe.runtime)
    device, dtype = rt.device, rt.precision
    if encoder is None:
        encoder = build_encoder(recipe.model.name, weights=recipe.model.weights)
    frozen = not recipe.finetune
    pixel_bands = len(sources[0][0].before.bands)
    model = _siamese_model(recipe, encoder, pixel_bands, frozen)
    train_ds, val_ds, train_loader, val_loader, forward_fn = _train_loaders(
        sources, train_refs, val_refs, recipe, model, frozen, rt
    )
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
    threshold, val_f1, val_best, val_best_f1 = _validation_threshold(
        model, val_loader, rt, forward_fn, recipe
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
    hf = _change_head_file(recipe, encoder, frozen, head_state, enc_state, chip, stem, pixel_bands, metrics)
    if test:
        metrics["test"], metrics["test_overall"] = _test_metrics(test, model, encoder, hf, chip, recipe, rt)
        hf.metrics["test"] = metrics["test"]
    head_path = write_run_folder(out, overwrite, hf, metrics, recipe, "detect-change train")
    return ChangeTrainResult(out=out, head=head_path, metrics=metrics, seconds=time.perf_counter() - t0)


def _train_cities(recipe: ChangeTrainRecipe) -> tuple[list, list]:
    """The training and test cities of ``recipe.data`` (default training cities: every labelled
    city that is not a test city), apart and labelled."""
    from deo_cli.data.oscd import list_cities, select_cities

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
    return train, test


def _train_inputs(recipe: ChangeTrainRecipe, encoder) -> tuple[int, tuple]:
    """The chip size (a multiple of the encoder's coarsest stride) and the band manifests the
    chips are prepared for, checked before any data is read."""
    from deo_cli.models import get_model_spec

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
    return chip, manifests


def _train_chips(recipe: ChangeTrainRecipe, train: list, chip: int, manifests):
    """The training cities' pair readers and labels, their stem, the chips split into training
    and validation (a seeded hold-out) and the pixel counts per class."""
    from deo_cli.data.segdata import holdout

    sources, stem = _oscd_sources(train, recipe.input, chip, recipe.chip_overlap, manifests)
    refs, counts = collect_chips(sources, 2)
    if counts[1] == 0:
        raise DataError("the training cities hold no change pixel", "add cities with change")
    held = holdout(len(refs), recipe.val_fraction, recipe.runtime.seed)
    train_refs = [r for r, h in zip(refs, held) if not h]
    val_refs = [r for r, h in zip(refs, held) if h]
    return sources, stem, train_refs, val_refs, counts


def _siamese_model(recipe: ChangeTrainRecipe, encoder, pixel_bands: int, frozen: bool) -> SiameseChange:
    """The encoder and a change head initialised from ``runtime.seed``, fused per level as the
    recipe says (with the pixel-difference branch when ``pixel_channels`` > 0)."""
    torch.manual_seed(recipe.runtime.seed)
    head = make_change_head(
        recipe.head,
        SiameseChange.head_channels(encoder.feature_channels, recipe.fusion),
        encoder.feature_strides,
        recipe.head_channels,
        pixel_bands,
        recipe.pixel_channels,
    )
    return SiameseChange(encoder, head, freeze=frozen, fusion=recipe.fusion)


def _train_loaders(sources, train_refs, val_refs, recipe: ChangeTrainRecipe, model, frozen: bool, rt):
    """The training and validation chips, read once (with a frozen encoder, the head's inputs
    computed once, :func:`~deo_cli.infer.trainchips.cache_frozen_inputs`), their loaders (none
    for validation without chips) and the forward function that fits them."""
    train_ds = LabelledChips(sources, train_refs, recipe.augment)
    val_ds = LabelledChips(sources, val_refs, "none")
    if len(train_ds) < 2:
        raise DataError("fewer than 2 training chips", "add cities or lower --chip-size")
    for ds in (train_ds, val_ds):
        ds.preload()
    forward_fn = image_forward
    if frozen:
        model.to(rt.device)
        (train_ds, val_ds), forward_fn = cache_frozen_inputs(
            (train_ds, val_ds), model.head_inputs, rt.batch_size, rt.device, rt.precision
        )
    train_loader = make_loader(
        train_ds, rt.batch_size, rt.num_workers, shuffle=True, seed=rt.seed, drop_single=True
    )
    val_loader = make_loader(val_ds, rt.batch_size, rt.num_workers, shuffle=False) if len(val_ds) else None
    return train_ds, val_ds, train_loader, val_loader, forward_fn


def _validation_threshold(model, val_loader, rt, forward_fn, recipe: ChangeTrainRecipe):
    """The P(change) threshold the head keeps (:func:`transfer_threshold` of the validation
    F1-best one; 0.5 without validation chips), the validation F1 at it, and the validation
    optimum with its F1."""
    threshold, val_f1 = 0.5, float("nan")
    val_best, val_best_f1 = None, float("nan")
    if val_loader is not None:
        probs, targets = _val_probabilities(model, val_loader, rt.device, rt.precision, forward_fn)
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
    return threshold, val_f1, val_best, val_best_f1


def _change_head_file(
    recipe: ChangeTrainRecipe,
    encoder,
    frozen: bool,
    head_state,
    enc_state,
    chip: int,
    stem,
    pixel_bands,
    metrics,
) -> HeadFile:
    """The head file of a trained change head (its encoder embedded when fine-tuned)."""
    record = encoder_record(encoder, frozen=frozen)
    return HeadFile(
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
        threshold=metrics["threshold"],
        metrics={k: v for k, v in metrics.items() if k != "history"},
        recipe=recipe_to_dict(recipe),
    )


def _test_metrics(test: list, model, encoder, hf: HeadFile, chip: int, recipe: ChangeTrainRecipe, rt):
    """F1 and IoU of each test city, scored through the streaming prediction path
    (:func:`~deo_cli.tasks.change.score.change_score_array`) at the head's threshold, and pooled
    over their pixels."""
    from deo_cli.data.oscd import read_change_label

    dense = DenseHeadModel(model.eval(), encoder, 2)
    per_city = {}
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
            device=rt.device,
            precision=rt.precision,
            head=hf,
        )
        label = read_change_label(city, score.shape)
        valid = np.isfinite(score)
        pred = np.nan_to_num(score, nan=0.0) > hf.threshold
        s = binary_scores(pred, label, valid)
        p, tt = pred[valid], label[valid].astype(bool)
        totals += [int(np.sum(p & tt)), int(np.sum(p & ~tt)), int(np.sum(~p & tt))]
        per_city[city.name] = {**s, "change_fraction": float(label[valid].mean())}
        log.info("test %s: F1 %.4f, IoU %.4f", city.name, s["f1"], s["iou"])
    tp, fp, fn = totals
    overall = {
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan"),
        "iou": tp / (tp + fp + fn) if (tp + fp + fn) else float("nan"),
    }
    return per_city, overall


__all__ = [
    "ChangeTrainResult",
    "best_f1_threshold",
    "f1_at",
    "run_change_train",
    "transfer_threshold",
]
