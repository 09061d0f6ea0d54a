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

#: Most chips read as one strip window. A whole batch row (16 chips, 10 bands) was a 24 MB float
#: strip on a wide scene against 9 MB on a 1k x 1k one, which made peak memory grow with the
#: scene's width; GDAL's block cache keeps the tiles two strips share, so decoding is the same.
STRIP_CHIPS = 4


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

    def set_decode_threads(self, threads: int) -> None:
        """See :meth:`deo_cli.io.raster.Scene.set_decode_threads`."""
        self.scene.set_decode_threads(threads)

    def read(self, chip: Chip, out: np.ndarray | None = None) -> ChipSample:
        """Read one chip; with ``out`` (bands, C, C) float32 the pixels go there (``x`` is then
        ``None``) unless the chip is empty."""
        return self.read_many([chip], None if out is None else out[None])[0]

    def read_many(self, chips: Sequence[Chip], out: np.ndarray | None = None) -> list[ChipSample]:
        """Read ``chips``; with ``out`` (len(chips), bands, C, C) float32 chip ``k``'s pixels go
        to ``out[k]`` (its ``x`` is then ``None``) unless it is empty.

        Up to :data:`STRIP_CHIPS` neighbours of one chip row (the same ``y``) are read as one
        strip: they overlap and share the file's tiles, and one window makes fewer GDAL calls
        than one per chip. Each chip is then filled and normalised on its own, exactly as if
        read alone.
        """
        samples: list[ChipSample] = []
        k = 0
        while k < len(chips):
            j = k + 1
            while j < len(chips) and chips[j].y == chips[k].y and j - k < STRIP_CHIPS:
                j += 1
            samples += self._read_row(chips[k:j], None if out is None else out[k:j])
            k = j
        return samples

    def _read_row(self, chips: Sequence[Chip], out: np.ndarray | None) -> list[ChipSample]:
        h, w = self.scene.height, self.scene.width
        size = self.plan.chip_size
        x0 = min(c.x for c in chips)
        ri = edge_index(chips[0].y, size, h)
        ci = edge_index(x0, max(c.x for c in chips) + size - x0, w)
        r0, c0 = int(ri[0]), int(ci[0])
        win = Window(c0, r0, int(ci[-1]) - c0 + 1, int(ri[-1]) - r0 + 1)
        sample = self.scene.read(self.bands, win)
        data, valid = sample.data, sample.valid
        if data.shape[1] != size:  # the first or last chip row: replicate the scene edge
            data, valid = data[:, ri - r0], valid[ri - r0]
        rows = np.arange(chips[0].y, chips[0].y + size)
        rows_in = (rows >= 0) & (rows < h)
        result = []
        for k, chip in enumerate(chips):
            cols = edge_index(chip.x, size, w) - c0
            if cols[-1] - cols[0] == size - 1:  # a view of the strip
                d, v = data[:, :, cols[0] : cols[0] + size], valid[:, cols[0] : cols[0] + size]
            else:  # the first or last chip of a row: replicate the scene edge
                d, v = data[:, :, cols], valid[:, cols]
            x = np.arange(chip.x, chip.x + size)
            inside = rows_in[:, None] & ((x >= 0) & (x < w))[None, :]
            result.append(self._finish(chip, d, v, inside, out, k))
        return result

    def _finish(self, chip, data, valid, inside, out, k) -> ChipSample:
        """Invalid fractions, nodata fill and normalisation of one chip's pixels."""
        if valid.all() and inside.all():  # most chips: nothing to count or fill (0.24 ms saved)
            invalid, valid_fraction = np.zeros((self.plan.n, self.plan.n), np.float32), 1.0
        else:
            invalid = invalid_fraction(valid, inside, self.plan.stride)
            n_inside = int(inside.sum())
            valid_fraction = float((valid & inside).sum() / n_inside) if n_inside else 0.0
            if not valid.any():
                x = None if out is not None else np.zeros(data.shape, np.float32)
                return ChipSample(chip, x, invalid, 0.0, True)
            if not valid.all():
                data = fill_invalid(np.array(data, dtype=np.float32), valid)  # a copy: the strip is shared
        target = out[k] if out is not None else np.empty(data.shape, np.float32)
        self._norm(data, out=target)
        return ChipSample(chip, None if out is not None else target, invalid, valid_fraction, False)


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
        if isinstance(self.reader, ChipReader):
            size = self.reader.plan.chip_size
            x = torch.empty((len(chips), len(self.reader.bands), size, size), dtype=torch.float32)
            if in_worker:
                x.share_memory_()  # allocated in shared memory: sent to the main process as is
            samples = self.reader.read_many(chips, out=x.numpy())
            keep = [j for j, s in enumerate(samples) if not s.empty]
            if len(keep) < len(chips):  # empty chips are skipped: move the others up
                for k, j in enumerate(keep):
                    if k != j:
                        x[k] = x[j]
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
