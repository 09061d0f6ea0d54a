"""Change scores streamed from two dates: :class:`ScoreSink` (scores into a COG or an array,
with the histogram the threshold is chosen from) and :func:`change_score_array` (a pair's score
in memory, by the same streaming path as ``deo detect-change``: ``detect-change train``'s test
cities, benchmarks, notebooks).
"""

from __future__ import annotations

import numpy as np
import torch

from deo_cli.infer.chips import ChipReader
from deo_cli.infer.dense import ArraySink, CogSink, aligned_plan
from deo_cli.infer.headfile import HeadFile
from deo_cli.infer.runner import block_rows_for, run_dense
from deo_cli.io.grid import Grid
from deo_cli.io.raster import Scene
from deo_cli.progress import Progress
from deo_cli.tasks.change.cva import CvaChange, same_scale
from deo_cli.tasks.change.pair import PairChipReader, prepare_dates
from deo_cli.tasks.change.threshold import ScoreHistogram


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
    from :func:`~deo_cli.tasks.change.pair.open_dates` or :func:`deo_cli.data.oscd.open_pair`),
    computed by the same streaming path as ``deo detect-change``, returned as a float32 ``(H, W)``
    array (NaN = nodata) on the model's output grid.

    ``model``: a :class:`~deo_cli.tasks.change.model.CosineChange` (zero-shot; ``out_stride=1``
    for the input grid) or the :class:`~deo_cli.infer.dense.DenseHeadModel` of
    :func:`~deo_cli.tasks.change.model.build_change_model` (the score is then ``P(change)``);
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


__all__ = [
    "ScoreSink",
    "change_score_array",
    "upsample_to",
]
