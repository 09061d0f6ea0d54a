"""The DEO paper's own numbers, to print beside ours (docs/method.md §3.2).

Transcribed from the result-table images of the project page (docs/method.md §1, [PAGE]); values in
percent, as the paper prints them. Only DEO's row is kept: the baselines were re-run by the
authors under the same protocol and are in docs/method.md §3.2 for whoever needs them.

Keys are ``(dataset, partition)``: GEO-Bench v1 task names as on disk (``m-cashew-plant``, not
the paper's ``GB-cas.``), ``oscd``, and the non-GEO-Bench sets the paper also reports
(``spacenet-v1``, ``sen1floods11``, ``pastis``, ``levir-cd``) for completeness.
"""

from __future__ import annotations

from dataclasses import dataclass

from deo_cli.data.geobench import task_key

__all__ = ["PAPER_RESULTS", "PaperResult", "paper_result"]


@dataclass(frozen=True)
class PaperResult:
    """One number of the paper: ``value`` in percent, its metric and where it is printed."""

    dataset: str
    partition: str
    metric: str
    value: float
    table: str
    note: str = ""


_SEG = "docs/method.md §3.2 Semantic segmentation (frozen encoder + UPerNet)"
_CD = "docs/method.md §3.2 Change detection"
_CLS = "docs/method.md §3.2 Classification (frozen encoder + linear head)"
_LOW = "docs/method.md §3.2 Low-data (10 % of train labels)"
_CD_NOTE = (
    "the paper fine-tunes the encoder for change detection; its head is not public (docs/method.md §3.1)"
)

_ROWS = (
    PaperResult("spacenet-v1", "default", "miou", 80.83, _SEG),
    PaperResult("m-nz-cattle", "default", "miou", 80.21, _SEG),
    PaperResult("m-pv4ger-seg", "default", "miou", 94.41, _SEG),
    PaperResult("m-chesapeake", "default", "miou", 72.47, _SEG),
    PaperResult("m-SA-crop-type", "default", "miou", 37.96, _SEG),
    PaperResult("m-cashew-plant", "default", "miou", 68.56, _SEG),
    PaperResult("sen1floods11", "default", "iou", 94.32, _SEG),
    PaperResult("pastis", "default", "miou", 28.96, _SEG),
    PaperResult("levir-cd", "default", "f1", 91.3, _CD, _CD_NOTE),
    PaperResult("oscd", "default", "f1", 60.4, _CD, _CD_NOTE),
    PaperResult("m-bigearthnet", "default", "micro_f1", 58.43, _CLS),
    PaperResult("m-so2sat", "default", "overall_accuracy", 52.23, _CLS),
    PaperResult("m-eurosat", "default", "overall_accuracy", 97.0, _CLS),
    PaperResult("m-SA-crop-type", "0.10x_train", "miou", 28.98, _LOW),
    PaperResult("m-bigearthnet", "0.10x_train", "micro_f1", 51.89, _LOW),
    PaperResult("spacenet-v1", "0.10x_train", "miou", 76.46, _LOW),
)

#: ``(dataset key, partition) -> PaperResult`` (dataset keys as :func:`task_key` gives them).
PAPER_RESULTS: dict[tuple[str, str], PaperResult] = {(task_key(r.dataset), r.partition): r for r in _ROWS}


def paper_result(dataset: str, partition: str = "default") -> PaperResult | None:
    """DEO's number for ``dataset`` (any spelling :func:`task_key` knows) and ``partition``."""
    return PAPER_RESULTS.get((task_key(dataset), partition))
