"""Training chips read exactly as prediction reads them.

``deo segment train`` and ``deo detect-change train`` cut their training chips with the same
:class:`~deo_cli.infer.tiling.TilePlan` and read them with the same
:class:`~deo_cli.infer.chips.ChipReader` (or its two-date
:class:`~deo_cli.tasks.change.pair.PairChipReader`) as ``segment predict`` / ``detect-change``: the
same bands by name, unit conversion, scene-level RGB scale, edge replication and nodata fill.
A head therefore never sees input at prediction time that was prepared differently in training.

- Chips: a plan with ``pad_start=False`` and stride 1 (chips start at the scene origin and
  step by ``chip_size - overlap``; the last one reaches past the scene edge, which is
  replicated for the image and *ignored* in the labels).
- Targets: training indices from a label source (``read(y, x, size)``, see
  :mod:`deo_cli.data.segdata`); pixels that are nodata in the image (either date for change)
  are ignored too.
- Chips without any labelled pixel are left out.
- Chips are read once and kept in memory when they fit (:data:`PRELOAD_BYTES`), else read
  from disk every epoch (in DataLoader workers).
- Augmentation ``flips``: random horizontal/vertical flips and 90-degree rotations (the
  eight symmetries of the square), drawn from torch's generator (seeded loaders repeat them).
- Without augmentation and with a frozen encoder, the head's inputs (the encoder's maps, or
  the fused maps of both dates) are the same every epoch: :func:`cache_head_inputs` computes
  them once (when they fit in :data:`PRELOAD_BYTES`) and every epoch trains the head alone,
  with the same result as recomputing them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from deo_cli.data.segdata import IGNORE
from deo_cli.infer.tiling import Chip, TilePlan

log = logging.getLogger(__name__)

#: Training chips are kept in memory (read once) when they fit in this many bytes.
PRELOAD_BYTES = 2 * 1024**3


def training_plan(height: int, width: int, chip_size: int, overlap: int = 0) -> TilePlan:
    """Chips from the scene origin, stepping ``chip_size - overlap`` px, stride 1 (per-pixel
    invalid masks)."""
    overlap = min(int(overlap), (chip_size - 1) // 2)
    return TilePlan(height, width, chip_size, overlap, 1, pad_start=False)


def random_flip_rotate(x, mask):
    """The ``flips`` augmentation of training chips: a random multiple of 90 degrees and a random
    horizontal flip, the same for the image and its mask (torch's generator, in this order)."""
    k, hflip = int(torch.randint(0, 4, ())), bool(torch.rand(()) < 0.5)
    if hflip:
        x, mask = x.flip(-1), mask.flip(-1)
    if k:
        x, mask = torch.rot90(x, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
    return x, mask


@dataclass(frozen=True)
class ChipRef:
    source: int  # index into the dataset's sources
    chip: Chip
    labelled: int  # labelled pixels (for logs and class counts)


class LabelledChips(torch.utils.data.Dataset):
    """``{"image": (C, S, S) float32, "mask": (S, S) int64, "index"}`` for chips of sources.

    ``sources`` is a list of ``(reader, labels)``: a chip reader on a stride-1 plan and a label
    source on the same grid.
    """

    def __init__(self, sources: Sequence[tuple], refs: Sequence[ChipRef], augment: str = "none"):
        self.sources = list(sources)
        self.refs = list(refs)
        self.augment = augment
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def preloaded(self) -> bool:
        return self._cache is not None

    def preload(self, max_bytes: int = PRELOAD_BYTES) -> bool:
        """Read every chip once and keep it in memory when all of them fit in ``max_bytes``
        (epochs then cost only the model). Returns whether they were preloaded."""
        if not self.refs or self._cache is not None:
            return self._cache is not None
        first = self._load(self.refs[0])
        per_chip = first[0].nbytes + first[1].nbytes
        if per_chip * len(self.refs) > max_bytes:
            log.info(
                "%d chips need %.1f GB: read from disk every epoch",
                len(self.refs),
                per_chip * len(self.refs) / 1e9,
            )
            return False
        self._cache = [first] + [self._load(r) for r in self.refs[1:]]
        return True

    def _load(self, ref: ChipRef) -> tuple[np.ndarray, np.ndarray]:
        reader, _ = self.sources[ref.source]
        s = reader.read(ref.chip)
        return np.ascontiguousarray(s.x, dtype=np.float32), self.target(ref, s.invalid)

    def target(self, ref: ChipRef, invalid: np.ndarray | None = None) -> np.ndarray:
        reader, labels = self.sources[ref.source]
        size = reader.plan.chip_size
        mask = labels.read(ref.chip.y, ref.chip.x, size)
        if invalid is not None:
            mask[invalid > 0.5] = IGNORE
        return mask

    def __getitem__(self, i: int) -> dict:
        x, mask = self._cache[i] if self._cache is not None else self._load(self.refs[i])
        x, mask = torch.from_numpy(x), torch.from_numpy(mask)
        if self.augment == "flips":
            x, mask = random_flip_rotate(x, mask)
        return {"image": x.contiguous(), "mask": mask.contiguous(), "index": i}


def collect_chips(sources: Sequence[tuple], num_classes: int) -> tuple[list[ChipRef], np.ndarray]:
    """Every chip of every source that has a labelled pixel, and the label counts per class.

    Reads each chip's labels once (labels are small next to images); image nodata is not
    known yet here, so the counts include labelled pixels under image nodata.
    """
    refs: list[ChipRef] = []
    counts = np.zeros(num_classes, np.int64)
    for k, (reader, labels) in enumerate(sources):
        size = reader.plan.chip_size
        for chip in reader.plan.chips():
            lab = labels.read(chip.y, chip.x, size)
            ok = lab != IGNORE
            n = int(ok.sum())
            if n == 0:
                continue
            counts += np.bincount(lab[ok], minlength=num_classes)[:num_classes]
            refs.append(ChipRef(k, chip, n))
    return refs, counts


def make_loader(
    dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int = 0, drop_single: bool = False
):
    """A DataLoader; ``drop_single`` drops a last batch of one chip (BatchNorm in the heads
    cannot train on a batch of one 1x1 pooled map). Preloaded chips need no worker processes."""
    if getattr(dataset, "preloaded", False):
        num_workers = 0
    g = torch.Generator().manual_seed(int(seed))
    bs = max(1, min(batch_size, len(dataset)))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=bs,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=g,
        drop_last=drop_single and len(dataset) % bs == 1,
        persistent_workers=num_workers > 0,
    )


class CachedHeadInputs(torch.utils.data.Dataset):
    """``{"feats": [per-level maps], "mask", "index"}``: head inputs computed once."""

    def __init__(self, feats: list[list[torch.Tensor]], masks: list[torch.Tensor]):
        self.feats = feats
        self.masks = masks
        self.preloaded = True

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict:
        return {"feats": self.feats[i], "mask": self.masks[i], "index": i}


@torch.no_grad()
def cache_head_inputs(
    dataset: LabelledChips,
    inputs_fn,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    max_bytes: int = PRELOAD_BYTES,
) -> CachedHeadInputs | None:
    """``inputs_fn(x) -> [maps]`` of every chip of ``dataset`` (not augmented), kept on the CPU;
    ``None`` when they would need more than ``max_bytes``."""
    from deo_cli.runtime import autocast

    if dataset.augment != "none" or not len(dataset):
        return None
    feats: list[list[torch.Tensor]] = []
    masks: list[torch.Tensor] = []
    total = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in loader:
        with autocast(device, dtype):
            maps = inputs_fn(batch["image"].to(device))
        maps = [m.float().cpu() for m in maps]
        for j in range(batch["image"].shape[0]):
            item = [m[j].clone() for m in maps]
            total += sum(t.numel() * 4 for t in item)
            if total > max_bytes:
                log.info("head inputs need more than %.1f GB: computed every epoch", max_bytes / 1e9)
                return None
            feats.append(item)
            masks.append(batch["mask"][j])
    log.info("head inputs of %d chips cached (%.0f MB): epochs train the head alone", len(masks), total / 1e6)
    return CachedHeadInputs(feats, masks)


def cache_frozen_inputs(datasets: Sequence, inputs_fn, batch_size: int, device: torch.device, dtype=None):
    """``(datasets, forward_fn)`` for training a head on a frozen encoder: every non-empty
    :class:`LabelledChips` set with its head inputs cached (:func:`cache_head_inputs`) and
    :func:`cached_forward`, or, when any of them cannot be cached (augmented, not chips, too
    large), the sets unchanged and the plain image forward."""
    from deo_cli.train.supervised import image_forward

    def cache(d):
        if not isinstance(d, LabelledChips) or not len(d):
            return None
        return cache_head_inputs(d, inputs_fn, batch_size, device, dtype)

    out = []
    for d in datasets:  # the training set first: nothing else is computed if it cannot be cached
        c = cache(d)
        if c is None and (not out or (d is not None and len(d))):
            return list(datasets), image_forward
        out.append(c if c is not None else d)
    return out, cached_forward


def cached_forward(model, batch: dict, device: torch.device):
    """The ``fit_dense`` forward for :class:`CachedHeadInputs` batches: the head alone."""
    feats = [f.to(device, non_blocking=True) for f in batch["feats"]]
    mask = batch["mask"].to(device, non_blocking=True).long()
    return model.head(feats, out_size=tuple(mask.shape[-2:])), mask


__all__ = [
    "CachedHeadInputs",
    "ChipRef",
    "LabelledChips",
    "cache_head_inputs",
    "cached_forward",
    "collect_chips",
    "make_loader",
    "training_plan",
]
