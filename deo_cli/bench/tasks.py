"""The paper's GEO-Bench tasks and their per-task settings (docs/method.md §3.1).

Input size per task is the table "Datasets and metrics" of docs/method.md §3.1 (all equal to the
tasks' native patch size, so the paper never resizes them); the classification learning rates
are the "Classification" paragraph of §3.1. A GEO-Bench task the paper does not report (e.g.
``m-brick-kiln``) runs at its native size with the defaults below, marked ``from_paper=False``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from deo_cli.data.geobench import BENCHMARKS, TASK_ALIASES, task_key
from deo_cli.errors import UsageError

__all__ = [
    "PAPER_CLASSIFICATION_TASKS",
    "PAPER_SEGMENTATION_TASKS",
    "PAPER_TASKS",
    "TaskSetting",
    "is_known_task",
    "task_setting",
    "unknown_task_error",
]


@dataclass(frozen=True)
class TaskSetting:
    """How the paper evaluates one task.

    ``image_size``: pixels (square); ``metric``: ``micro_f1``, ``overall_accuracy`` or
    ``miou``; ``lr``: the linear probe's learning rate (classification) or ``None`` (the
    segmentation default); ``from_paper``: False for tasks the paper does not report.
    """

    name: str
    kind: str
    image_size: int | None
    metric: str
    lr: float | None = None
    from_paper: bool = True


#: docs/method.md §3.1 (classification: lr 1e-3 BigEarthNet and So2Sat, 1e-2 EuroSAT; 50 epochs, batch 64).
PAPER_CLASSIFICATION_TASKS = (
    TaskSetting("m-bigearthnet", "classification", 120, "micro_f1", 1e-3),
    TaskSetting("m-so2sat", "classification", 32, "overall_accuracy", 1e-3),
    TaskSetting("m-eurosat", "classification", 64, "overall_accuracy", 1e-2),
)
#: docs/method.md §3.1 (segmentation: UPerNet, lr 1e-4, 50 epochs, 5 warm-up; macro mIoU).
PAPER_SEGMENTATION_TASKS = (
    TaskSetting("m-cashew-plant", "segmentation", 256, "miou"),
    TaskSetting("m-SA-crop-type", "segmentation", 256, "miou"),
    TaskSetting("m-chesapeake", "segmentation", 256, "miou"),
    TaskSetting("m-pv4ger-seg", "segmentation", 320, "miou"),
    TaskSetting("m-nz-cattle", "segmentation", 500, "miou"),
)
PAPER_TASKS: dict[str, TaskSetting] = {
    task_key(t.name): t for t in PAPER_CLASSIFICATION_TASKS + PAPER_SEGMENTATION_TASKS
}

#: Linear-probe learning rate for classification tasks the paper does not report [INFERRED:
#: the paper's value for BigEarthNet and So2Sat].
DEFAULT_LINEAR_LR = 1e-3


def task_setting(name: str, kind: str, multilabel: bool = False) -> TaskSetting:
    """The paper's setting for task ``name``, or a default one for a task it does not report."""
    hit = PAPER_TASKS.get(task_key(name))
    if hit is not None and hit.kind == kind:
        return hit
    if kind == "segmentation":
        return TaskSetting(name, kind, None, "miou", None, from_paper=False)
    metric = "micro_f1" if multilabel else "overall_accuracy"
    return TaskSetting(name, kind, None, metric, DEFAULT_LINEAR_LR, from_paper=False)


def known_task_names() -> list[str]:
    """Every GEO-Bench v1 task name and alias deo knows."""
    return [t for tasks in BENCHMARKS.values() for t in tasks] + list(TASK_ALIASES)


def is_known_task(name: str) -> bool:
    """Whether ``name`` is a GEO-Bench v1 task (any spelling :func:`task_key` accepts)."""
    return task_key(name) in {task_key(k) for k in known_task_names()}


def unknown_task_error(name: str, on_disk: list[str] | None = None) -> UsageError:
    """A :class:`UsageError` for a task name that is neither a v1 task nor a folder on disk."""
    candidates = known_task_names() + list(on_disk or [])
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if not close:
        keys = {task_key(c): c for c in candidates}
        hit = difflib.get_close_matches(task_key(name), list(keys), n=1, cutoff=0.5)
        close = [keys[hit[0]]] if hit else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    tasks = [t for ts in BENCHMARKS.values() for t in ts]
    return UsageError(f"unknown GEO-Bench task {name!r}", f"{hint}GEO-Bench v1 tasks: {', '.join(tasks)}")
