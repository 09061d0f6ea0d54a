"""Read the chips of a tile plan from a scene, ready for a model (in DataLoader workers).

:class:`ChipReader` is picklable (a :class:`~deo_cli.io.raster.Scene` pickles without its open
files; each worker opens its own). Per chip it reads the smallest window of the scene that
holds the chip's pixels, replicates the scene edge for pixels outside the scene, fills invalid
pixels from the nearest valid pixel (:func:`~deo_cli.infer.tiling.fill_invalid`: nodata values
never reach the model), and normalises by the model's band manifest.

The fill is documented behaviour: features near a nodata area see the nearest valid values
continued into it, exactly as at a scene edge. Output pixels whose footprint is mostly nodata
are written as nodata by the stitcher, using the per-feature-pixel invalid fraction computed
here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rasterio.windows import Window

from deo_cli.infer.tiling import Chip, TilePlan, edge_index, fill_invalid, invalid_fraction


@dataclass
class ChipSample:
    """One chip read for a model.

    ``x``: normalised float32 (bands, C, C); ``invalid``: (n, n) invalid fraction per feature
    pixel; ``valid_fraction``: over the chip's in-scene pixels; ``empty``: no valid pixel at all
    (``x`` is then zeros and the model is skipped).
    """

    chip: Chip
    x: np.ndarray | None
    invalid: np.ndarray
    valid_fraction: float
    empty: bool


class _FusedNormalizer:
    """``Normalizer`` applied in place with one multiply-add per band (same values, fewer passes):
    ``x * (scale / std) - mean / std``, with the clamp to [0, 1] of max-scaled bands in between."""

    def __init__(self, normalizer):
        scale = np.asarray(normalizer.scale, np.float64)
        mean = np.asarray(normalizer.mean, np.float64)
        std = np.asarray(normalizer.std, np.float64)
        self.clamp = np.asarray(normalizer.clamp01, bool)
        self.a = np.where(self.clamp, scale, scale / std).astype(np.float32)[:, None, None]
        self.b = np.where(self.clamp, 0.0, -mean / std).astype(np.float32)[:, None, None]
        self.ca = (1.0 / std[self.clamp]).astype(np.float32)[:, None, None]
        self.cb = (-mean[self.clamp] / std[self.clamp]).astype(np.float32)[:, None, None]

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise ``x`` (bands, H, W) float32 into ``out`` (default: in place)."""
        out = x if out is None else out
        np.multiply(x, self.a, out=out)
        out += self.b
        if self.clamp.any():
            c = np.clip(out[self.clamp], 0.0, 1.0)
            c *= self.ca
            c += self.cb
            out[self.clamp] = c
        return out


class ChipReader:
    """Reads chips of ``plan`` from ``scene`` (bands by name), filled and normalised."""

    def __init__(self, scene, bands: Sequence[str], normalizer, plan: TilePlan):
        self.scene = scene
        self.bands = tuple(bands)
        self.normalizer = normalizer
        self.plan = plan
        self._norm = _FusedNormalizer(normalizer)

    def read(self, chip: Chip, out: np.ndarray | None = None) -> ChipSample:
        """Read one chip; with ``out`` (bands, C, C) float32 the pixels go there (``x`` is then
        ``None``) unless the chip is empty."""
        h, w = self.scene.height, self.scene.width
        size, stride = self.plan.chip_size, self.plan.stride
        ri = edge_index(chip.y, size, h)
        ci = edge_index(chip.x, size, w)
        r0, c0 = int(ri[0]), int(ci[0])
        win = Window(c0, r0, int(ci[-1]) - c0 + 1, int(ri[-1]) - r0 + 1)
        sample = self.scene.read(self.bands, win)
        data, valid = sample.data, sample.valid
        if data.shape[1:] != (size, size):  # an edge chip: replicate the scene edge
            data = data[:, ri - r0][:, :, ci - c0]
            valid = valid[np.ix_(ri - r0, ci - c0)]
        rows_in = (np.arange(chip.y, chip.y + size) >= 0) & (np.arange(chip.y, chip.y + size) < h)
        cols_in = (np.arange(chip.x, chip.x + size) >= 0) & (np.arange(chip.x, chip.x + size) < w)
        inside = rows_in[:, None] & cols_in[None, :]
        invalid = invalid_fraction(valid, inside, stride)
        n_inside = int(inside.sum())
        valid_fraction = float((valid & inside).sum() / n_inside) if n_inside else 0.0
        if not valid.any():
            return ChipSample(
                chip, None if out is not None else np.zeros(data.shape, np.float32), invalid, 0.0, True
            )
        data = np.ascontiguousarray(data, dtype=np.float32)
        if not valid.all():
            data = fill_invalid(data, valid)
        if out is not None:
            self._norm(data, out=out)
            return ChipSample(chip, None, invalid, valid_fraction, False)
        return ChipSample(chip, self._norm(data), invalid, valid_fraction, False)


class ChipBatchDataset(torch.utils.data.Dataset):
    """Item ``i`` is batch ``i`` of ``chips`` (consecutive, row-major), read by one worker.

    ``reader`` is a :class:`ChipReader` (read straight into a tensor in shared memory: no
    per-chip copies, no collate copy, and the DataLoader hands the tensor to the main process
    without copying it again) or any object with ``plan`` and ``read(chip) -> ChipSample``.
    """

    def __init__(self, reader: ChipReader, chips: Sequence[Chip], batch_size: int):
        self.reader = reader
        self.chips = list(chips)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.chips) // self.batch_size)

    def __getitem__(self, i: int) -> ChipBatch:
        chips = self.chips[i * self.batch_size : (i + 1) * self.batch_size]
        in_worker = torch.utils.data.get_worker_info() is not None
        samples, keep = [], []
        if isinstance(self.reader, ChipReader):
            size = self.reader.plan.chip_size
            x = torch.empty((len(chips), len(self.reader.bands), size, size), dtype=torch.float32)
            if in_worker:
                x.share_memory_()  # allocated in shared memory: sent to the main process as is
            arr = x.numpy()
            for c in chips:
                s = self.reader.read(c, out=arr[len(keep)])
                if not s.empty:
                    keep.append(len(samples))
                samples.append(s)
            return ChipBatch(samples, x[: len(keep)], keep)
        # any other reader (``plan`` and ``read(chip) -> ChipSample``), e.g. two dates stacked
        samples = [self.reader.read(c) for c in chips]
        keep = [j for j, s in enumerate(samples) if not s.empty]
        shape = samples[0].x.shape
        x = torch.empty((len(keep), *shape), dtype=torch.float32)
        if in_worker:
            x.share_memory_()
        for k, j in enumerate(keep):
            x[k] = torch.from_numpy(samples[j].x)
        for s in samples:  # the pixels travel in ``x``
            s.x = None
        return ChipBatch(samples, x, keep)


def identity_collate(batch):
    return batch


@dataclass
class ChipBatch:
    samples: list[ChipSample]
    x: torch.Tensor  # (B_nonempty, bands, C, C): only the chips with valid pixels
    keep: list[int]  # positions in ``samples`` of the rows of ``x``

    def __len__(self) -> int:
        return len(self.samples)

    def pin_memory(self) -> ChipBatch:
        """Called by the DataLoader (``pin_memory=True`` on CUDA) for faster host-to-GPU copies."""
        self.x = self.x.pin_memory()
        return self
