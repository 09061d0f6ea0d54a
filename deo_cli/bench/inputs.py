"""GEO-Bench samples as model input, the way the paper feeds them (docs/method.md §3.1).

- Bands by name: the model's multispectral manifest when the task has all its bands (DEO:
  ``B04, B03, B02, B05, B06, B07, B08, B8A, B11, B12`` from 13- or 12-band S2 tasks, the 10 S2
  channels of m-so2sat's 18), else its RGB manifest (the first three channels of m-chesapeake's
  RGBN, and 3-band RGB tasks) through the RGB stem.
- Normalisation ``task``: per-task z-score from ``band_stats.json`` (the paper);
  ``model``: the model's manifest (:class:`~deo_cli.data.normalize.Normalizer`), the RGB bands
  max-scaled by each image's own maximum as in pretraining (docs/method.md §2.3).
- Size: resized to ``image_size`` when the task's patches differ (bilinear with antialiasing
  for images, nearest for masks); the paper's sizes equal the native ones, so by default
  nothing is resized.
- Training augmentation ``flips``: random horizontal and vertical flips, each with p = 0.5 (the
  paper's GEO-Bench training transforms; its random crop is a no-op at the native size).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deo_cli.data.geobench import GeoBenchTask
from deo_cli.data.normalize import Normalizer
from deo_cli.sensors import BandManifest

__all__ = ["GeoBenchInputs", "GeoBenchTorchDataset", "plan_inputs"]

log = logging.getLogger(__name__)

#: Label value for mask pixels outside ``0..num_classes-1`` (ignored by loss and metrics).
IGNORE = -100


@dataclass(frozen=True)
class GeoBenchInputs:
    """How one task's samples become model input (picklable, for DataLoader workers)."""

    task: GeoBenchTask
    band_indices: tuple[int, ...]
    band_names: tuple[str, ...]
    manifest: BandManifest
    stem: str  # "ms" or "rgb"
    normalization: str  # "task" or "model"
    image_size: int

    def image(self, raw: np.ndarray) -> np.ndarray:
        """``(C_task, H, W)`` raw values -> normalised ``(C_model, H, W)`` float32."""
        x = np.asarray(raw, dtype=np.float32)[list(self.band_indices)]
        if self.normalization == "task":
            x = self.task.normalize(x, self.band_indices)
        else:
            rgb = [i for i, b in enumerate(self.manifest.bands) if b in self.manifest.max_scaled]
            rgb_max = float(np.nanmax(x[rgb])) if rgb else None
            if rgb and not (rgb_max and np.isfinite(rgb_max) and rgb_max > 0):
                rgb_max = 1.0
            x = Normalizer.from_manifest(self.manifest, rgb_max=rgb_max)(x)
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    def label_name(self) -> str:
        return ",".join(self.band_names)


def plan_inputs(
    task: GeoBenchTask,
    manifest: BandManifest,
    rgb_manifest: BandManifest | None,
    image_size: int | None,
    normalization: str = "task",
) -> GeoBenchInputs:
    """Pick the stem and bands for ``task`` (multispectral when the task has every band of
    ``manifest``, else RGB) and the input size (``image_size``, else the native patch size)."""
    manifests = [manifest] + ([rgb_manifest] if rgb_manifest is not None else [])
    chosen = task.pick_manifest(manifests)
    idx = tuple(task.bands_for_model(chosen))
    size = image_size or (task.patch_size[0] if task.patch_size else None)
    if size is None:
        size = int(task.load_sample(task.split_ids("train")[0]).image.shape[-1])
    return GeoBenchInputs(
        task=task,
        band_indices=idx,
        band_names=tuple(task.band_names[i] for i in idx),
        manifest=chosen,
        stem="ms" if chosen is manifest else "rgb",
        normalization=normalization,
        image_size=int(size),
    )


class GeoBenchTorchDataset(torch.utils.data.Dataset):
    """Samples of one split: ``{"image": (C, S, S) float32, "label" or "mask", "index"}``.

    ``label`` is a long (single-label) or a float multi-hot vector; ``mask`` a long ``(S, S)``
    map with out-of-range classes set to :data:`IGNORE`. ``flips`` draws random flips from
    torch's generator (the DataLoader seeds each worker from its own generator, so a seeded
    loader gives the same flips on every run).
    """

    def __init__(self, inputs: GeoBenchInputs, sample_ids: list[str], flips: bool = False):
        self.inputs = inputs
        self.ids = list(sample_ids)
        self.flips = flips
        self.num_classes = inputs.task.label.num_classes
        self.kind = inputs.task.kind
        self.multilabel = inputs.task.label.multilabel

    def __len__(self) -> int:
        return len(self.ids)

    # DataLoader workers started with "spawn" (macOS, Windows) receive a pickled copy; the
    # task's unpickled GEO-Bench specs do not pickle again, so the worker reopens the folder.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["inputs"] = dataclasses.replace(self.inputs, task=None)
        state["_task_path"] = str(self.inputs.task.path)
        return state

    def __setstate__(self, state: dict) -> None:
        path = state.pop("_task_path")
        self.__dict__.update(state)
        self.inputs = dataclasses.replace(self.inputs, task=GeoBenchTask(path))

    def __getitem__(self, i: int) -> dict:
        sample = self.inputs.task.load_sample(self.ids[i])
        x = torch.from_numpy(self.inputs.image(sample.image))
        size = self.inputs.image_size
        out: dict = {"index": i}
        resize = tuple(x.shape[-2:]) != (size, size)
        if resize:
            shrink = x.shape[-1] > size or x.shape[-2] > size
            x = F.interpolate(
                x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
            )[0]
        if self.kind == "segmentation":
            mask = torch.from_numpy(np.asarray(sample.label, dtype=np.int64))
            if resize:
                mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
            mask = torch.where((mask >= 0) & (mask < self.num_classes), mask, torch.full_like(mask, IGNORE))
            out["mask"] = mask
        elif self.multilabel:
            out["label"] = torch.as_tensor(np.asarray(sample.label), dtype=torch.float32)
        else:
            out["label"] = torch.as_tensor(int(sample.label), dtype=torch.long)
        if self.flips:
            hflip, vflip = (torch.rand(2) < 0.5).tolist()
            dims = [d for d, on in ((-1, hflip), (-2, vflip)) if on]
            if dims:
                x = x.flip(dims)
                if "mask" in out:
                    out["mask"] = out["mask"].flip(dims)
        out["image"] = x.contiguous()
        if "mask" in out:
            out["mask"] = out["mask"].contiguous()
        return out
