"""GEO-Bench segmentation samples as ``deo segment train`` chips.

The reader is :mod:`deo_cli.data.geobench` (shared with ``deo bench``). Unlike the benchmark's
protocol (per-task z-score from ``band_stats.json``, docs/method.md §3.1), images here are
normalised by the **model's band manifest**, exactly as ``segment predict`` normalises scenes,
so the trained head can map scenes afterwards:

- bands by name (the multispectral manifest when the task has every band, else the RGB stem);
- the unit of the non-RGB bands inferred once from a few training samples (GEO-Bench S2 is DN);
- DEO's max-scaled RGB bands divided by each image's 99.9th percentile of RGB values
  (:func:`~deo_cli.data.normalize.scene_rgb_max`; a scene uses one value for the whole scene).

Masks keep the task's class indices (out-of-range values are ignored). ``chip`` resizes
samples whose size differs (bilinear images, nearest masks); ``None`` keeps the native size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from deo_cli.data.geobench import GeoBenchTask
from deo_cli.data.normalize import Normalizer, scene_rgb_max
from deo_cli.data.segdata import ClassTable
from deo_cli.errors import UnitError
from deo_cli.infer.trainchips import random_flip_rotate
from deo_cli.io.units import conversion_factor, infer_unit
from deo_cli.sensors import UNITS, BandManifest

log = logging.getLogger(__name__)

#: Training samples looked at to infer the unit.
UNIT_SAMPLES = 4


@dataclass
class GeoBenchInput:
    task_path: str
    task_name: str
    band_indices: tuple[int, ...]
    manifest: BandManifest
    stem: str
    unit: str
    unit_factor: float

    def describe(self) -> dict:
        return {
            "stem": self.stem,
            "input_bands": list(self.manifest.bands),
            "unit": self.unit,
            "unit_factor": self.unit_factor,
            "rgb_max": "per image (99.9th percentile)" if self.manifest.max_scaled else None,
            "manifest": self.manifest.to_dict(),
        }


def plan_geobench(
    task: GeoBenchTask, manifest: BandManifest, rgb_manifest: BandManifest | None, unit: str = "auto"
) -> GeoBenchInput:
    """Bands, stem and unit conversion for ``task`` (see the module docstring)."""
    chosen = task.pick_manifest([manifest] + ([rgb_manifest] if rgb_manifest is not None else []))
    idx = tuple(task.bands_for_model(chosen))
    plain = [i for i, b in zip(idx, chosen.bands) if b not in chosen.max_scaled]
    factor, found = 1.0, "any"
    if plain and chosen.unit != "any":
        if unit and unit != "auto":
            found = unit
        else:
            ids = task.split_ids("train")[:UNIT_SAMPLES]
            vals = (
                np.concatenate([task.load_sample(s).image[plain].ravel() for s in ids])
                if ids
                else np.zeros(0)
            )
            guess = infer_unit(vals)
            if guess.unit == "unknown":
                raise UnitError(
                    f"cannot tell the unit of GEO-Bench task {task.name} ({guess.reason})",
                    "pass --unit dn or reflectance",
                )
            found = guess.unit
        factor = conversion_factor(found, chosen.unit, what=f"GEO-Bench task {task.name}")
        log.info("GEO-Bench %s: %s, x %g to %s", task.name, UNITS[found], factor, UNITS[chosen.unit])
    return GeoBenchInput(
        str(task.path), task.name, idx, chosen, "ms" if chosen is manifest else "rgb", found, factor
    )


class GeoBenchChips(torch.utils.data.Dataset):
    """``{"image", "mask", "index"}`` for GEO-Bench sample ids (see the module docstring)."""

    def __init__(
        self, inp: GeoBenchInput, ids: list[str], table: ClassTable, chip: int | None, augment: str = "none"
    ):
        self.inp = inp
        self.ids = list(ids)
        self.table = table
        self.chip = chip
        self.augment = augment
        self._task: GeoBenchTask | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_task"] = None  # GEO-Bench specs do not pickle again; each worker reopens the folder
        return state

    @property
    def task(self) -> GeoBenchTask:
        if self._task is None:
            self._task = GeoBenchTask(self.inp.task_path)
        return self._task

    def __getitem__(self, i: int) -> dict:
        sample = self.task.load_sample(self.ids[i])
        man = self.inp.manifest
        x = np.asarray(sample.image, np.float32)[list(self.inp.band_indices)]
        rgb = [k for k, b in enumerate(man.bands) if b in man.max_scaled]
        rgb_max = None
        if rgb:
            try:
                rgb_max = scene_rgb_max(x[rgb])
            except ValueError:
                rgb_max = 1.0
        x = Normalizer.from_manifest(man, unit_factor=self.inp.unit_factor, rgb_max=rgb_max)(x)
        x = torch.from_numpy(np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))
        mask = torch.from_numpy(self.table.encode(np.asarray(sample.label)))
        if self.chip is not None and tuple(x.shape[-2:]) != (self.chip, self.chip):
            shrink = x.shape[-1] > self.chip
            x = F.interpolate(
                x[None], size=(self.chip, self.chip), mode="bilinear", align_corners=False, antialias=shrink
            )[0]
            mask = F.interpolate(mask[None, None].float(), size=(self.chip, self.chip), mode="nearest")[
                0, 0
            ].long()
        if self.augment == "flips":
            x, mask = random_flip_rotate(x, mask)
        return {"image": x.contiguous(), "mask": mask.contiguous(), "index": i}


__all__ = ["GeoBenchChips", "GeoBenchInput", "plan_geobench"]
