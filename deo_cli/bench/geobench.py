"""``deo bench --suite geobench``: the paper's frozen-encoder GEO-Bench protocols (docs/method.md §3.1).

Per task (default: the eight the paper reports), per partition and seed:

- classification (m-bigearthnet, m-so2sat, m-eurosat): frozen encoder + linear probe on the
  pooled feature (:mod:`deo_cli.bench.linear`, on features cached once per split by
  :mod:`deo_cli.bench.features`); micro F1 (multi-label) or overall accuracy; ``knn``
  (:mod:`deo_cli.bench.knn`) as an extra protocol;
- segmentation (m-cashew-plant, m-SA-crop-type, m-chesapeake, m-pv4ger-seg, m-nz-cattle):
  frozen encoder + UPerNet through ``fit_dense`` (:mod:`deo_cli.bench.segmentation`); mIoU.

Training uses the partition's ``train`` split, model selection its ``valid`` split (best
epoch), and the number reported is on its ``test`` split with a 95 % bootstrap interval over
test samples. Inputs: :mod:`deo_cli.bench.inputs`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deo_cli.bench.context import BenchContext
from deo_cli.bench.features import FeatureCache, extract_features
from deo_cli.bench.inputs import GeoBenchInputs, GeoBenchTorchDataset, plan_inputs
from deo_cli.bench.knn import knn_predict
from deo_cli.bench.linear import ProbeSettings, predict, train_linear_probe
from deo_cli.bench.paper import paper_result
from deo_cli.bench.scoring import Score, score_accuracy, score_micro_f1, score_miou
from deo_cli.bench.segmentation import run_segmentation
from deo_cli.bench.tasks import (
    PAPER_CLASSIFICATION_TASKS,
    PAPER_SEGMENTATION_TASKS,
    TaskSetting,
    is_known_task,
    task_setting,
    unknown_task_error,
)
from deo_cli.data.geobench import GeoBenchTask, geobench_root, list_tasks, open_task, task_key
from deo_cli.errors import DataError, UsageError
from deo_cli.recipes import BenchRecipe
from deo_cli.runtime import seed_everything
from deo_cli.train.supervised import FitSettings

__all__ = ["GeoBenchPlan", "plan_geobench", "run_geobench"]

log = logging.getLogger(__name__)

#: The paper's GEO-Bench tasks, the default of ``--tasks`` (docs/method.md §3.1-3.2).
DEFAULT_TASKS = tuple(t.name for t in PAPER_CLASSIFICATION_TASKS + PAPER_SEGMENTATION_TASKS)


@dataclass
class GeoBenchPlan:
    """A task opened and checked before any work: its setting and the protocols to run."""

    task: GeoBenchTask
    setting: TaskSetting
    protocols: list[str]


def _protocols(kind: str, protocol: str, seg_head: str) -> list[str]:
    seg = "upernet" if seg_head == "upernet" else "linear-seg"
    if kind == "classification":
        return {"paper": ["linear"], "linear": ["linear"], "knn": ["knn"], "all": ["linear", "knn"]}.get(
            protocol, []
        )
    return {"paper": [seg], "upernet": ["upernet"], "linear": ["linear-seg"], "all": [seg]}.get(protocol, [])


def _open_tasks(names: list[str], data: str | os.PathLike | None) -> list[GeoBenchTask]:
    if data is not None and (Path(data) / "task_specs.pkl").is_file():
        if names and not all(task_key(n) == task_key(Path(data).name) for n in names):
            raise UsageError(
                f"--data {data} is one task folder, but --tasks names {', '.join(names)}",
                "point --data at the folder holding classification_v1.0/ and segmentation_v1.0/",
            )
        return [open_task(data)]
    if not names:
        return _open_paper_tasks(data)
    tasks = []
    for name in names:
        if "/" in name or os.sep in name:
            tasks.append(open_task(name))
            continue
        base = geobench_root(data, task=name)  # a missing $GEO_BENCH_DIR: one line with the download command
        if not is_known_task(name):
            on_disk = [p.name for p in list_tasks(base)]
            if task_key(name) not in {task_key(n) for n in on_disk}:
                raise unknown_task_error(name, on_disk)
        tasks.append(open_task(name, root=base))
    return tasks


def _open_paper_tasks(data: str | os.PathLike | None) -> list[GeoBenchTask]:
    """No ``--tasks``: every GEO-Bench task on disk, the paper's first, in the paper's order
    (the paper's tasks with its protocol, others with the defaults of :mod:`deo_cli.bench.tasks`).
    The paper's tasks that are missing are named in one warning with the command that downloads
    them; no task on disk at all is one error with that command."""
    base = geobench_root(data)  # a missing $GEO_BENCH_DIR: one line with the download command
    folders = {task_key(p.name): p for p in list_tasks(base)}
    paper = [task_key(n) for n in DEFAULT_TASKS]
    keys = [k for k in paper if k in folders] + sorted(k for k in folders if k not in paper)
    missing = [n for n in DEFAULT_TASKS if task_key(n) not in folders]
    fetch = f"deo bench download --suite geobench --tasks {','.join(missing)} --dest {base}"
    if not keys:
        raise DataError(f"no GEO-Bench task is under {base}", f"download the paper's with `{fetch}`")
    tasks = [open_task(folders[k]) for k in keys]
    if missing:
        log.warning(
            "%d of the paper's %d GEO-Bench tasks are not under %s and are not run: %s (download them with `%s`)",
            len(missing),
            len(DEFAULT_TASKS),
            base,
            ", ".join(missing),
            fetch,
        )
    return tasks


def plan_geobench(recipe: BenchRecipe) -> list[GeoBenchPlan]:
    """Open every task, check its partition and pick protocols; errors before any work."""
    tasks = _open_tasks(list(recipe.tasks), recipe.data)
    plans, skipped = [], []
    for task in tasks:
        task.partition(recipe.partition)  # a missing partition: DataError naming those it has
        setting = task_setting(task.name, task.kind, task.label.multilabel)
        protocols = _protocols(task.kind, recipe.protocol, recipe.segmentation.head)
        if protocols:
            plans.append(GeoBenchPlan(task, setting, protocols))
        else:
            skipped.append(task)
    if not plans:
        raise UsageError(
            f"no task among {', '.join(t.name for t in tasks)} runs protocol {recipe.protocol!r}",
            "knn and linear suit classification tasks, upernet segmentation tasks; paper and all suit both",
        )
    for task in skipped:
        log.warning("task %s (%s) has no %s protocol: skipped", task.name, task.kind, recipe.protocol)
    return plans


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _split_ids(task: GeoBenchTask, split: str, partition: str, limit: int | None) -> list[str]:
    ids = task.split_ids(split, partition)
    ids = ids[:limit] if limit else ids
    if not ids:
        raise DataError(
            f"task {task.name} partition {partition!r} has no {split} samples", "choose another partition"
        )
    return ids


def _loader(ds: GeoBenchTorchDataset, batch_size: int, workers: int, shuffle=False, seed=0, drop_last=False):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=gen,
        drop_last=drop_last,
        persistent_workers=False,
        pin_memory=False,
    )


def _normalization_name(inputs: GeoBenchInputs) -> str:
    return "band_stats-zscore" if inputs.normalization == "task" else f"manifest:{inputs.manifest.name}"


def _paper_value(task: GeoBenchTask, partition: str, protocol: str, metric: str) -> float | None:
    if protocol not in ("linear", "upernet"):
        return None
    hit = paper_result(task.name, partition)
    return hit.value / 100.0 if hit is not None and hit.metric == metric else None


def _row(score: Score, **fields) -> dict:
    return {
        "metric": score.metric,
        "value": score.value,
        "ci_low": score.ci_low,
        "ci_high": score.ci_high,
        **fields,
    }


class _Caches:
    """Feature caches of one task, computed on first use and shared by seeds and protocols."""

    def __init__(self, ctx: BenchContext, inputs: GeoBenchInputs, ids: dict[str, list[str]]):
        self.ctx, self.inputs, self.ids = ctx, inputs, ids
        self._cache: dict[tuple[str, bool], FeatureCache] = {}

    def get(self, split: str, flips: bool = False) -> FeatureCache:
        if (split, flips) not in self._cache and (split, True) in self._cache and not flips:
            full = self._cache[(split, True)]
            self._cache[(split, False)] = FeatureCache(full.features[:1], full.targets)
        if (split, flips) not in self._cache:
            r = self.ctx.recipe
            ds = GeoBenchTorchDataset(self.inputs, self.ids[split])
            loader = _loader(ds, self.ctx.rt.batch_size, self.ctx.rt.num_workers)
            start = time.perf_counter()
            cache = extract_features(
                self.ctx.encoder,
                loader,
                self.ctx.device,
                self.ctx.dtype,
                pool=r.linear.pool,
                flips=flips,
                progress=self.ctx.progress,
                total=len(ds),
            )
            log.info(
                "%s %s: %d x %d-d features%s in %.1f s",
                self.inputs.task.name,
                split,
                cache.num_samples,
                cache.dim,
                " (4 flips)" if flips else "",
                time.perf_counter() - start,
            )
            self._cache[(split, flips)] = cache
        return self._cache[(split, flips)]


def _score_classification(pred, target, multilabel: bool, n_boot: int, seed: int) -> Score:
    t = target.numpy()
    if multilabel:
        return score_micro_f1(pred, t, n_boot, seed)
    return score_accuracy(pred, t, n_boot, seed)


def _run_classification(
    ctx: BenchContext, plan: GeoBenchPlan, inputs: GeoBenchInputs, ids, base: dict
) -> None:
    r = ctx.recipe
    task = plan.task
    multilabel = task.label.multilabel
    caches = _Caches(ctx, inputs, ids)
    for protocol in plan.protocols:
        seeds = r.seeds if protocol == "linear" else r.seeds[:1]  # kNN is deterministic: one row
        for seed in seeds:
            unit = {**base, "protocol": protocol, "seed": seed}
            if ctx.is_done(**unit):
                continue
            seed_everything(seed)
            start = time.perf_counter()
            if protocol == "linear":
                lr = r.linear.lr if r.linear.lr is not None else plan.setting.lr
                settings = ProbeSettings(
                    epochs=r.linear.epochs,
                    warmup_epochs=r.linear.warmup_epochs,
                    batch_size=r.linear.batch_size,
                    lr=lr,
                    min_lr=r.linear.min_lr,
                    weight_decay=r.linear.weight_decay,
                )
                train = caches.get("train", flips=r.linear.augment == "flips")
                val = caches.get("valid")
                test = caches.get("test")
                fit = train_linear_probe(
                    train, val, task.label.num_classes, multilabel, settings, ctx.device, seed, ctx.progress
                )
                pred = predict(fit.layer, test.features[0], multilabel, ctx.device)
                extra = {
                    "best_epoch": fit.best_epoch,
                    "val_value": fit.best_val,
                    "lr": lr,
                    "epochs": settings.epochs,
                    "batch_size": settings.batch_size,
                    "weight_decay": settings.weight_decay,
                }
            else:
                train, test = caches.get("train"), caches.get("test")
                pred = knn_predict(
                    train.features[0],
                    train.targets,
                    test.features[0],
                    task.label.num_classes,
                    k=r.knn.k,
                    multilabel=multilabel,
                    device=ctx.device,
                )
                extra = {}
            score = _score_classification(pred, test.targets, multilabel, r.bootstrap, seed)
            log.info(
                "%s %s seed %d: %s %.4f [%.4f, %.4f]",
                task.name,
                protocol,
                seed,
                score.metric,
                score.value,
                score.ci_low,
                score.ci_high,
            )
            ctx.emit(
                [
                    _row(
                        score,
                        **unit,
                        **extra,
                        task="multilabel_classification" if multilabel else "classification",
                        n_train=len(ids["train"]),
                        n_val=len(ids["valid"]),
                        n_test=score.n,
                        feature_dim=test.dim,
                        seconds=round(time.perf_counter() - start, 3),
                        paper_value=_paper_value(task, r.partition, protocol, score.metric),
                    )
                ]
            )


def _run_segmentation(ctx: BenchContext, plan: GeoBenchPlan, inputs: GeoBenchInputs, ids, base: dict) -> None:
    r = ctx.recipe
    task = plan.task
    s = r.segmentation
    workers = ctx.rt.num_workers
    if len(ids["train"]) < 2:
        raise DataError(
            f"task {task.name} has {len(ids['train'])} training sample(s); the segmentation head needs 2 or more",
            "raise --limit or choose a larger partition",
        )
    for protocol in plan.protocols:
        for seed in r.seeds:
            unit = {**base, "protocol": protocol, "seed": seed}
            if ctx.is_done(**unit):
                continue
            seed_everything(seed)
            start = time.perf_counter()
            train_ds = GeoBenchTorchDataset(inputs, ids["train"], flips=s.augment == "flips")
            batch = min(s.batch_size, len(train_ds))
            train = _loader(train_ds, batch, workers, shuffle=True, seed=seed, drop_last=True)
            val = _loader(GeoBenchTorchDataset(inputs, ids["valid"]), s.batch_size, workers)
            test = _loader(GeoBenchTorchDataset(inputs, ids["test"]), s.batch_size, workers)
            settings = FitSettings(
                epochs=s.epochs,
                warmup_epochs=s.warmup_epochs,
                lr=s.lr,
                min_lr=s.min_lr,
                weight_decay=s.weight_decay,
                num_classes=task.label.num_classes,
                select="miou",
            )
            outcome = run_segmentation(
                ctx.encoder,
                train,
                val,
                test,
                task.label.num_classes,
                settings,
                ctx.device,
                ctx.dtype,
                head="upernet" if protocol == "upernet" else "linear",
                seed=seed,
                progress=ctx.progress,
            )
            score = score_miou(outcome.confusions, r.bootstrap, seed)
            log.info(
                "%s %s seed %d: mIoU %.4f [%.4f, %.4f]",
                task.name,
                protocol,
                seed,
                score.value,
                score.ci_low,
                score.ci_high,
            )
            ctx.emit(
                [
                    _row(
                        score,
                        **unit,
                        task="segmentation",
                        n_train=len(ids["train"]),
                        n_val=len(ids["valid"]),
                        n_test=score.n,
                        best_epoch=outcome.fit.best_epoch,
                        val_value=outcome.fit.best_metric,
                        feature_dim=int(sum(ctx.encoder.feature_channels)),
                        lr=s.lr,
                        epochs=s.epochs,
                        batch_size=batch,
                        weight_decay=s.weight_decay,
                        seconds=round(time.perf_counter() - start, 3),
                        paper_value=_paper_value(task, r.partition, protocol, score.metric),
                    )
                ]
            )


def run_geobench(ctx: BenchContext, plans: list[GeoBenchPlan]) -> None:
    """Run every planned task and protocol; rows go to ``ctx.store`` as each unit finishes."""
    r = ctx.recipe
    encoder = ctx.encoder
    for plan in plans:
        task = plan.task
        inputs = plan_inputs(
            task,
            encoder.manifest,
            getattr(encoder, "rgb_manifest", None) if getattr(encoder, "has_rgb_stem", True) else None,
            r.image_size or plan.setting.image_size,
            r.normalization,
        )
        ids = {split: _split_ids(task, split, r.partition, r.limit) for split in ("train", "valid", "test")}
        log.info(
            "%s (%s, %d classes%s): %s stem, bands %s, %d px, train/valid/test %d/%d/%d, partition %s",
            task.name,
            task.kind,
            task.label.num_classes,
            ", multi-label" if task.label.multilabel else "",
            inputs.stem,
            inputs.label_name(),
            inputs.image_size,
            len(ids["train"]),
            len(ids["valid"]),
            len(ids["test"]),
            r.partition,
        )
        base = {
            "dataset": task.name,
            "partition": r.partition,
            "bands": inputs.label_name(),
            "image_size": inputs.image_size,
            "normalization": _normalization_name(inputs),
        }
        if task.kind == "classification":
            _run_classification(ctx, plan, inputs, ids, base)
        else:
            _run_segmentation(ctx, plan, inputs, ids, base)
