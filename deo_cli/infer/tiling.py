"""Cut a scene into chips aligned to a feature grid, and stitch per-chip maps back, row by row.

Shared by ``deo embed`` (feature maps), ``deo segment predict`` (logits) and ``deo
detect-change`` (scores): everything here is plain numpy and knows nothing about models.

**The plan** (:class:`TilePlan`). A model with feature stride ``s`` maps a chip of ``C`` input
pixels (a multiple of ``s``) to an ``n = C / s`` feature grid. Chips step by ``C - O`` pixels
(``O`` = overlap, a multiple of ``s``), so every chip's feature grid lies exactly on the output
grid (``Grid.scaled(s)``: feature pixel ``(i, j)`` covers input pixels ``[i*s, (i+1)*s)``). In
feature units: ``m = O / s`` overlap, ``t = n - m`` step.

Dense plans (``pad_start=True``) start ``O`` pixels *before* the scene, so the scene's first rows
and columns lie in the interior of the first chip rather than on its border, and add chips
until the last scene row lies at least ``O`` pixels inside the last chip. Along an axis where
the scene fits one chip but not with ``O`` pixels to spare on both sides (``C - 2O < size <= C``)
the plan is one chip at the origin instead: a scene of exactly one chip (224 x 224 for a
224-px model) is one forward pass and its map is the model's own output. Chip plans
(``pad_start=False``, for one vector per chip) start at the scene origin.

**Edges.** Pixels a chip needs outside the scene are the nearest scene pixel (edge replicate;
:func:`edge_index`), never zeros, and are cropped away again when stitching. Invalid (nodata)
pixels inside the scene are filled the same way, from the nearest valid pixel of the chip
(:func:`fill_invalid`), so a rectangular valid area inside a nodata border reads exactly like a
scene that ends there.

**Blending** (:func:`plan_window`). Each chip's map is weighted by a window that falls toward
the chip edge over its ``m`` overlap pixels (flat along an axis with a single chip): ``cosine`` (sin², neighbouring ramps sum to 1),
``linear``, or ``center`` (1 on the central part, 0 on the outer ``m/2``: every output pixel is
taken from exactly one chip). The stitched value is the weighted mean of the chips covering a
pixel.

**Streaming** (:class:`RowStitcher`). Chips arrive in row-major order. Once a chip row is done,
output rows above the next chip row's start can no longer change; they are released to the sink
in blocks of ``block_rows`` rows. The buffer holds ``block_rows + n`` feature rows, whatever the
scene's height.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

BLENDS = ("cosine", "linear", "center")
#: Bytes of the stitcher's buffer moved per copy when released rows are shifted out.
SHIFT_BYTES = 1 << 20


def round_up(x: int, multiple: int) -> int:
    return -(-int(x) // multiple) * multiple


def largest_overlap(chip_size: int, unit: int) -> int:
    """The largest overlap (a multiple of ``unit``) below half of a ``chip_size`` chip."""
    return max(0, (chip_size - 1) // 2 // unit * unit)


def resolve_overlap(chip_size: int, unit: int, overlap: int | None = None, default: int | None = None) -> int:
    """The overlap in pixels of ``chip_size`` chips: a multiple of ``unit`` below half the chip.

    ``None``: ``default`` (a quarter of the chip when ``None``) rounded up to ``unit`` and, where
    that reaches half the chip, lowered to :func:`largest_overlap` (deo's own choice: the plan's
    tags record it). A given ``overlap`` is rounded up to ``unit`` (callers warn and record the
    value used) and refused with a :class:`~deo_cli.errors.UsageError` naming the allowed range
    when it is negative or its rounded value reaches half the chip.
    """
    from deo_cli.errors import UsageError

    top = largest_overlap(chip_size, unit)
    if overlap is None:
        return min(round_up(chip_size // 4 if default is None else default, unit), top)
    fix = (
        f"use --overlap 0 to {top} (multiples of {unit} px), or a larger --chip-size"
        if top
        else f"use --overlap 0, or a --chip-size of at least {4 * unit} for an overlap of {unit} px"
    )
    if overlap < 0:
        raise UsageError(f"--overlap {overlap} is negative", fix)
    used = round_up(overlap, unit)
    if used > top:
        rounded = f" (rounded up to a multiple of {unit} px: {used})" if used != overlap else ""
        raise UsageError(
            f"--overlap {overlap}{rounded} is too large for {chip_size} px chips: "
            f"chips must overlap by less than half a chip ({chip_size / 2:g} px)",
            fix,
        )
    return used


#: Share of the machine's memory that one batch of input chips (and the read of one more) may
#: take; a chip size beyond it is refused before anything is allocated.
CHIP_MEMORY_SHARE = 0.25


def physical_memory() -> int | None:
    """This machine's memory in bytes (``None`` where the system does not say)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _bytes_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n:.3g} PB"


def check_chip_memory(
    chip_size: int,
    batch_size: int,
    bands: int,
    stride: int,
    model_input: int | None = None,
    memory: int | None = None,
) -> None:
    """Refuse (:class:`~deo_cli.errors.UsageError`) a chip size whose batch of input chips
    (``batch_size`` + 1 chips of ``bands`` float32 bands) would take more than
    :data:`CHIP_MEMORY_SHARE` of the machine's ``memory`` (default: :func:`physical_memory`),
    saying the largest size that fits."""
    from deo_cli.errors import UsageError

    memory = memory if memory is not None else physical_memory()
    if not memory:
        return
    per_px = (batch_size + 1) * bands * 4
    need = per_px * chip_size * chip_size
    budget = memory * CHIP_MEMORY_SHARE
    if need <= budget:
        return
    largest = max(stride, int(math.sqrt(budget / per_px)) // stride * stride)
    own = f" (the model's own input is {model_input} px)" if model_input else ""
    raise UsageError(
        f"--chip-size {chip_size} needs {_bytes_text(need)} of memory for one batch of {batch_size} "
        f"chips ({bands} bands as float32), more than a quarter of this machine's {_bytes_text(memory)}",
        f"use --chip-size {largest} or less{own}, or a smaller --batch-size",
    )


@dataclass(frozen=True)
class Chip:
    """One chip: its position in the plan and its top-left corner in input pixels.

    ``row``/``col`` are chip-row/column numbers; ``y``/``x`` the input-pixel offsets (may be
    negative, or reach past the scene); ``fy``/``fx`` the same in feature pixels.
    """

    index: int
    row: int
    col: int
    y: int
    x: int
    fy: int
    fx: int


@dataclass(frozen=True)
class TilePlan:
    """Chips of ``chip_size`` px stepping ``chip_size - overlap`` px over a ``height`` x ``width``
    scene, aligned to a feature grid of ``stride`` px.

    Use :meth:`create` to get overlap rounding and checks with clear messages.
    """

    height: int
    width: int
    chip_size: int
    overlap: int
    stride: int
    pad_start: bool = True

    def __post_init__(self):
        if self.chip_size % self.stride:
            raise ValueError(f"chip size {self.chip_size} is not a multiple of the stride {self.stride}")
        if self.overlap % self.stride:
            raise ValueError(f"overlap {self.overlap} is not a multiple of the stride {self.stride}")
        if not 0 <= 2 * self.overlap < self.chip_size:
            raise ValueError(f"overlap {self.overlap} must be below half the chip size {self.chip_size}")
        if self.height < 1 or self.width < 1:
            raise ValueError("empty scene")

    @classmethod
    def create(
        cls,
        height: int,
        width: int,
        chip_size: int,
        stride: int,
        overlap: int | None = None,
        pad_start: bool = True,
    ) -> TilePlan:
        """A plan whose ``overlap`` is :func:`resolve_overlap`'s (default: a quarter of the chip).

        Raises ``ValueError`` (with a message for the user) for a chip that is not a multiple of
        the stride, :class:`~deo_cli.errors.UsageError` for an overlap of half the chip or more.
        """
        if chip_size % stride:
            raise ValueError(
                f"--chip-size {chip_size} is not a multiple of the feature stride {stride}; "
                f"use {round_up(chip_size, stride)}"
            )
        overlap = resolve_overlap(chip_size, stride, overlap)
        return cls(height, width, chip_size, overlap, stride, pad_start)

    # -- feature units -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Chip size in feature pixels."""
        return self.chip_size // self.stride

    @property
    def m(self) -> int:
        """Overlap in feature pixels."""
        return self.overlap // self.stride

    @property
    def step(self) -> int:
        """Chip step in input pixels."""
        return self.chip_size - self.overlap

    @property
    def out_height(self) -> int:
        return -(-self.height // self.stride)

    @property
    def out_width(self) -> int:
        return -(-self.width // self.stride)

    def _starts(self, size_px: int) -> list[int]:
        """Chip starts (input px) along one axis."""
        if self.pad_start:
            if self.chip_size - 2 * self.overlap < size_px <= self.chip_size:
                # the scene fits one chip but not with O px to spare on both sides: one chip
                # at the origin, one forward pass, as the model itself sees the scene (two
                # overlapping chips would only blend two views of the same pixels)
                return [0]
            # start -O (a scene of at most C - 2O px: one chip with the scene O px inside it);
            # last chip: its last O px reach past the scene (the scene end lies at least O px
            # inside it, where the blend weight is full).
            first = -self.overlap
            count = max(1, math.ceil((size_px + 2 * self.overlap - self.chip_size) / self.step) + 1)
        else:
            first = 0
            count = max(1, math.ceil((size_px - self.chip_size) / self.step) + 1)
        return [first + k * self.step for k in range(count)]

    @property
    def row_starts(self) -> list[int]:
        return self._starts(self.out_height * self.stride)

    @property
    def col_starts(self) -> list[int]:
        return self._starts(self.out_width * self.stride)

    @property
    def shape(self) -> tuple[int, int]:
        """(chip rows, chip columns)."""
        return len(self.row_starts), len(self.col_starts)

    def __len__(self) -> int:
        r, c = self.shape
        return r * c

    def chip_rows_for(self, rows: tuple[int, int] | None) -> list[int]:
        """Chip rows whose feature rows touch output rows ``[rows[0], rows[1])`` (all if None)."""
        starts = self.row_starts
        if rows is None:
            return list(range(len(starts)))
        lo, hi = rows
        out = []
        for k, y in enumerate(starts):
            fy = y // self.stride
            if fy < hi and fy + self.n > lo and hi > lo:
                out.append(k)
        return out

    def chips(self, rows: tuple[int, int] | None = None) -> list[Chip]:
        """Chips in row-major order, only those touching output rows ``rows`` when given."""
        cols = self.col_starts
        out = []
        for r in self.chip_rows_for(rows):
            y = self.row_starts[r]
            for c, x in enumerate(cols):
                out.append(Chip(r * len(cols) + c, r, c, y, x, y // self.stride, x // self.stride))
        return out

    def describe(self) -> dict:
        return {
            "chip_size": self.chip_size,
            "overlap": self.overlap,
            "stride": self.stride,
            "chips": list(self.shape),
            "pad_start": self.pad_start,
        }


# ---------------------------------------------------------------------------------------------
# Reading: edge replicate and nodata fill
# ---------------------------------------------------------------------------------------------


def edge_index(start: int, size: int, limit: int) -> np.ndarray:
    """Source indices for ``size`` positions from ``start`` along an axis of ``limit`` pixels,
    replicating the edge pixel outside ``[0, limit)``."""
    return np.clip(np.arange(start, start + size), 0, limit - 1)


def _nearest_along(valid: np.ndarray) -> np.ndarray:
    """For each position of each row of ``valid`` (2-D bool), the column of the nearest valid
    pixel in that row (ties: the left one); -1 for rows without valid pixels."""
    h, w = valid.shape
    idx = np.arange(w)
    left = np.where(valid, idx, -1)
    np.maximum.accumulate(left, axis=1, out=left)
    right = np.where(valid, idx, w)
    right = np.minimum.accumulate(right[:, ::-1], axis=1)[:, ::-1]
    has_left = left >= 0
    has_right = right < w
    use_right = has_right & (~has_left | ((right - idx) < (idx - left)))
    out = np.where(use_right, right, left)
    out[~valid.any(axis=1)] = -1
    return out


def fill_invalid(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Replace invalid pixels of ``data`` (bands, H, W) by the nearest valid pixel, in place.

    Nearest along the row; rows without any valid pixel copy the nearest filled row. For a
    rectangular valid area this is exactly edge replication (the value of the nearest pixel of
    the rectangle), the same rule as outside the scene. Returns ``data``.
    """
    if valid.all() or not valid.any():
        return data
    h, w = valid.shape
    cols = _nearest_along(valid)  # (H, W)
    rows_ok = cols[:, 0] >= 0
    src_rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).copy()
    src_cols = cols.copy()
    if not rows_ok.all():
        # rows with no valid pixel: take the nearest row that has one (ties: the upper one)
        near = _nearest_along(rows_ok[None, :])[0]
        bad = ~rows_ok
        src_rows[bad] = near[bad][:, None]
        src_cols[bad] = cols[near[bad]]
    inv = ~valid
    data[:, inv] = data[:, src_rows[inv], src_cols[inv]]
    return data


def invalid_fraction(valid: np.ndarray, inside: np.ndarray, stride: int) -> np.ndarray:
    """Fraction of invalid pixels among the in-scene pixels of each ``stride`` x ``stride`` block.

    ``valid`` and ``inside`` are (H, W) masks with H, W multiples of ``stride``; blocks with no
    in-scene pixel get 1.0.
    """
    h, w = valid.shape
    bad = (~valid & inside).reshape(h // stride, stride, w // stride, stride).sum(axis=(1, 3))
    n_in = inside.reshape(h // stride, stride, w // stride, stride).sum(axis=(1, 3))
    out = np.ones(bad.shape, np.float32)
    np.divide(bad, n_in, out=out, where=n_in > 0)
    return out


# ---------------------------------------------------------------------------------------------
# Blending and stitching
# ---------------------------------------------------------------------------------------------


def blend_ramp(n: int, m: int, blend: str = "cosine") -> np.ndarray:
    """1-D weights over ``n`` feature pixels, falling toward both ends over ``m`` pixels."""
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; use one of {', '.join(BLENDS)}")
    w = np.ones(n, np.float64)
    if m <= 0:
        return w
    i = np.arange(m)
    if blend == "cosine":
        ramp = np.sin(0.5 * np.pi * (i + 0.5) / m) ** 2
    elif blend == "linear":
        ramp = (i + 0.5) / m
    else:  # center: each output pixel from exactly one chip
        lo, hi = m // 2, m - m // 2
        w[:lo] = 0.0
        w[n - hi :] = 0.0
        return w
    w[:m] = np.minimum(w[:m], ramp)
    w[n - m :] = np.minimum(w[n - m :], ramp[::-1])
    return w


def blend_window(n: int, m: int, blend: str = "cosine") -> np.ndarray:
    """The 2-D (n, n) float32 weight window (outer product of :func:`blend_ramp`)."""
    r = blend_ramp(n, m, blend)
    return np.outer(r, r).astype(np.float32)


def plan_window(plan: TilePlan, blend: str = "cosine") -> np.ndarray:
    """The (n, n) float32 weight window of ``plan``'s chips: :func:`blend_window`, except that
    along an axis with a single chip the weights are 1 (no neighbour to blend with; a falling
    ramp there would only lose precision, and the ``center`` blend would drop the scene edge of
    a chip that starts at the origin)."""
    rows, cols = plan.shape
    r = blend_ramp(plan.n, plan.m if rows > 1 else 0, blend)
    c = blend_ramp(plan.n, plan.m if cols > 1 else 0, blend)
    return np.outer(r, c).astype(np.float32)


class RowStitcher:
    """Accumulate weighted chip maps; release finished output rows in blocks.

    Args:
        plan: the tile plan (output grid ``plan.out_height`` x ``plan.out_width``).
        channels: channels of each chip map.
        emit: ``emit(row0, data)`` receives finished rows: ``data`` is float32
            ``(channels, rows, out_width)``, NaN where no chip contributed or where the footprint
            is mostly nodata (invalid fraction > ``max_nodata_fraction``).
        blend: ``cosine``, ``linear`` or ``center`` (see :func:`blend_ramp`).
        block_rows: rows are released in multiples of this (the sink's block height), except
            the last block.
        rows: only output rows ``[rows[0], rows[1])`` are accumulated and emitted (a rank's
            share, or what is left after ``--resume``).
        max_nodata_fraction: see ``emit``.

    Chips must be added in row-major plan order (``plan.chips()``).
    """

    def __init__(
        self,
        plan: TilePlan,
        channels: int,
        emit: Callable[[int, np.ndarray], None],
        blend: str = "cosine",
        block_rows: int = 16,
        rows: tuple[int, int] | None = None,
        max_nodata_fraction: float = 0.5,
    ):
        self.plan = plan
        self.channels = channels
        self.emit = emit
        self.window = plan_window(plan, blend)
        self.block_rows = max(1, int(block_rows))
        lo, hi = rows if rows is not None else (0, plan.out_height)
        self.begin, self.end = max(0, lo), min(plan.out_height, hi)
        self.max_nodata_fraction = float(max_nodata_fraction)
        self.width = plan.out_width
        self.capacity = self.block_rows + plan.n + 1
        self._sum = np.zeros((channels, self.capacity, self.width), np.float32)
        self._wsum = np.zeros((self.capacity, self.width), np.float32)
        self._bad = np.ones((self.capacity, self.width), np.float32)
        self._lo = self.begin  # first output row held in the buffer (row 0 of the buffers)
        self._final = self.begin  # rows below this are final
        self._chip_row: int | None = None
        self.rows_emitted = 0

    @property
    def buffer_bytes(self) -> int:
        return self._sum.nbytes + self._wsum.nbytes + self._bad.nbytes

    def add(self, chip: Chip, values: np.ndarray | None, invalid: np.ndarray | None = None) -> None:
        """Add one chip's map ``values`` (channels, n, n) (``None``: nothing computed, e.g. a chip
        with no valid pixel) and its per-feature-pixel invalid fraction ``invalid`` (n, n)."""
        if self._chip_row is None or chip.row != self._chip_row:
            if self._chip_row is not None:
                self._advance(chip.fy)
            self._chip_row = chip.row
        n = self.plan.n
        r0, r1 = max(chip.fy, self._lo, self.begin), min(chip.fy + n, self.end)
        c0, c1 = max(chip.fx, 0), min(chip.fx + n, self.width)
        if r1 <= r0 or c1 <= c0:
            return
        if r1 - self._lo > self.capacity:  # a bug in the caller's order, not a user error
            raise RuntimeError("chips added out of row-major order")
        br0, br1 = r0 - self._lo, r1 - self._lo
        a0, a1 = r0 - chip.fy, r1 - chip.fy
        b0, b1 = c0 - chip.fx, c1 - chip.fx
        if invalid is not None:
            self._bad[br0:br1, c0:c1] = invalid[a0:a1, b0:b1]
        if values is None:
            return
        w = self.window[a0:a1, b0:b1]
        self._sum[:, br0:br1, c0:c1] += values[:, a0:a1, b0:b1] * w
        self._wsum[br0:br1, c0:c1] += w

    def _advance(self, final_row: int) -> None:
        """Rows below ``final_row`` can no longer change: release complete blocks."""
        self._final = min(max(self._final, final_row), self.end)
        while self._final - self._lo >= self.block_rows or (self._final >= self.end and self._lo < self.end):
            k = min(self.block_rows, self._final - self._lo)
            if k <= 0:
                break
            self._release(k)

    def _release(self, k: int) -> None:
        wsum = self._wsum[:k]
        out = np.full((self.channels, k, self.width), np.nan, np.float32)
        ok = (wsum > 0) & (self._bad[:k] <= self.max_nodata_fraction)
        np.divide(self._sum[:, :k], wsum[None], out=out, where=ok[None])
        self.emit(self._lo, out)
        self.rows_emitted += k
        # shift the buffers up by k rows, a few channels at a time: source and target share
        # the buffer, so numpy copies the source first (all channels at once: a second
        # 14 MB block at 384 channels x 625 px)
        keep = self.capacity - k
        step = max(1, SHIFT_BYTES // max(1, keep * self.width * 4))
        for c in range(0, self.channels, step):
            self._sum[c : c + step, :keep] = self._sum[c : c + step, k:]
        self._sum[:, keep:] = 0.0
        self._wsum[:keep] = self._wsum[k:]
        self._wsum[keep:] = 0.0
        self._bad[:keep] = self._bad[k:]
        self._bad[keep:] = 1.0
        self._lo += k

    def close(self) -> None:
        """All chips added: release the remaining rows."""
        self._advance(self.end)


def chip_row_groups(chips: list[Chip]) -> Iterator[list[Chip]]:
    """Group chips (row-major) by chip row."""
    group: list[Chip] = []
    for c in chips:
        if group and c.row != group[0].row:
            yield group
            group = []
        group.append(c)
    if group:
        yield group
