"""The generic streaming runner: scene chips -> model -> stitched rows -> a sink.

Shared by ``deo embed``, ``deo segment predict`` and ``deo detect-change``::

    plan = TilePlan.create(scene.height, scene.width, chip_size=224, stride=16)
    reader = ChipReader(scene, bands, normalizer, plan)
    sink = StreamingRasterWriter("out.tif", scene.grid.scaled(16), layout)
    stats = run_dense(reader, model, sink, batch_size=16, num_workers=2)
    sink.finish()

- DataLoader workers read, fill and normalise chips (:class:`~deo_cli.infer.chips.ChipReader`;
  the scene pickles and each worker opens its own files), ``prefetch`` batches ahead each;
  without workers the main process reads, GDAL decoding with every core (:func:`decode_threads`).
- The main process runs batches on the device under the resolved precision (autocast), skips
  chips without any valid pixel, and stitches (:class:`~deo_cli.infer.tiling.RowStitcher`).
- Finished row blocks go to a compressing sink in a background thread
  (:class:`BackgroundSink`), so compression overlaps the next forward pass; a sink that does
  not compress (float temporaries) is written directly. Memory is bounded by the
  stitcher's band of rows, the prefetch queue and the GDAL cache (capped at
  :data:`READ_CACHE_BYTES` per worker), none of which grows with the scene's height.

A sink is anything with ``block_rows`` and ``write_rows(row0, data)``
(:class:`~deo_cli.io.writers.StreamingRasterWriter`, :class:`~deo_cli.io.writers.ZarrWriter`,
or a segmentation sink that turns logits into classes).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import rasterio
import torch
from torch.utils.data import DataLoader

from deo_cli.infer.chips import ChipBatch, ChipBatchDataset, ChipReader, identity_collate
from deo_cli.infer.tiling import RowStitcher, round_up
from deo_cli.io.raster import every_core
from deo_cli.progress import NullProgress, Progress
from deo_cli.runtime import autocast

log = logging.getLogger(__name__)

#: GDAL block cache of each reading process (bytes): enough for the source tiles neighbouring
#: chips of a row share, small enough that memory does not grow with the scene's width.
READ_CACHE_BYTES = 16 * 1024 * 1024
#: Batches between two returns of freed heap memory to the OS in the main process (the
#: forward pass frees tensors of many sizes; without it glibc's heap grew ~170 MB over 4000 chips).
TRIM_EVERY = 16
#: Added to the niceness of reading workers (see :func:`_worker_init`).
WORKER_NICENESS = 10

_worker_env = None


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Called before DataLoader workers are forked: they inherit the parent's heap, and writing
    into its free chunks would copy those pages into every worker.
    """
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def _fixed_mmap_threshold() -> None:
    """Serve allocations of 1 MiB and more (chips, batches) with ``mmap`` so that freeing them
    returns the memory, instead of glibc's default that moves the threshold up after the first
    large free and then fragments the heap over thousands of chips."""
    lib = _libc()
    if lib is not None and hasattr(lib, "mallopt"):
        lib.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _worker_init(_worker_id: int) -> None:
    """In each DataLoader worker: a capped GDAL cache, and a lower CPU priority than the process
    running the model, so that reading fills the gaps instead of stalling the forward pass (on a
    CPU, torch's threads wait for each other at every operation)."""
    global _worker_env
    _fixed_mmap_threshold()
    _worker_env = rasterio.Env(GDAL_CACHEMAX=READ_CACHE_BYTES)
    _worker_env.__enter__()
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not permitted: keep the default priority
        pass


@dataclass
class RunStats:
    """What a run did: chips read and computed, timings (seconds)."""

    chips: int = 0
    computed: int = 0
    skipped_empty: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    rows: tuple[int, int] = (0, 0)
    extra: dict = field(default_factory=dict)

    @property
    def chips_per_second(self) -> float:
        return self.chips / self.seconds if self.seconds > 0 else float("nan")


class BackgroundSink:
    """Run ``sink.write_rows`` in a thread (GDAL and zarr release the GIL while compressing).

    At most ``depth`` blocks wait in the queue; an error in the thread is raised by the next
    ``write_rows`` or by ``close``.
    """

    def __init__(self, sink, depth: int = 1):
        self.sink = sink
        self.block_rows = sink.block_rows
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="deo-sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                self.sink.write_rows(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e

    def write_rows(self, row0: int, data: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._q.put((row0, data))

    def close(self) -> None:
        """Wait until every queued block is written; re-raise a writer error."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


@contextlib.contextmanager
def forked_workers(num_workers: int):
    """Prepare this process for forking DataLoader workers, and undo it afterwards.

    Workers inherit the parent's memory copy-on-write; every page they write becomes their own.
    Two sources of such writes are removed: Python's garbage collector touching every inherited
    object (``gc.freeze`` parks them in a generation it never scans) and freed heap chunks that
    a worker's allocations would reuse (``malloc_trim`` returns them to the OS first). Without
    this the workers' memory grew by about 200 MB over a 4k x 4k scene.
    """
    if num_workers <= 0:
        yield
        return
    gc.collect()
    release_heap()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def decode_threads(num_workers: int) -> int:
    """GDAL threads decoding each read: one in DataLoader workers (they run beside the model),
    every core when the chips are read in this process (the model waits for each read: a 4k x
    4k DEFLATE scene's chip strips took 1.5 s instead of 2.9 s on 2 cores; :func:`every_core`)."""
    return 1 if num_workers > 0 else every_core()


def make_loader(
    reader: ChipReader,
    chips,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    prefetch: int = 2,
) -> DataLoader:
    """Batches of ``chips`` read by ``num_workers`` processes (0: in this one); readers with
    ``set_decode_threads`` get :func:`decode_threads` first."""
    if hasattr(reader, "set_decode_threads"):
        reader.set_decode_threads(decode_threads(num_workers))
    kwargs = {}
    if num_workers > 0:
        kwargs = {"prefetch_factor": max(1, prefetch), "worker_init_fn": _worker_init}
    return DataLoader(
        ChipBatchDataset(reader, chips, batch_size),
        batch_size=None,  # items are whole batches
        shuffle=False,
        num_workers=num_workers,
        collate_fn=identity_collate,
        pin_memory=device.type == "cuda",
        **kwargs,
    )


#: Most chips per forward call on the CPU (a read batch is run in slices). Measured on the
#: 2-core CI machine, forward of 64 random 224 px chips (benchmarks/embed.py models):
#: deo_swin_t 13.6 chips/s in slices of 4 against 11.0 in one batch of 16, with the process's
#: peak RSS 1109 MB against 1450 MB (a batch's activations are the largest transient of a
#: run); deo_swin_test 164 against 108 chips/s. Smaller slices stay in the CPU's caches.
CPU_MICRO_BATCH = 4
#: Activation bytes a CPU slice aims at (the finest feature map of all its chips; see
#: :func:`default_micro_batch`). deo_swin_t (1.15 MB per 224 px chip) then runs 2 chips per
#: call: 10.2 against 9.8 chips/s for 4 and 8.3 for 1 (same VM, interleaved rounds), and the
#: forward's transient memory 85 against 137 MB, the largest part of a run's peak above the
#: model. deo_swin_b (1.53 MB) also gets 2: 2.3 chips/s at 1, 2 or 4, transient 74-107 /
#: 140-168 / 300-335 MB. deo_vit_b8 (3 MB at 256 px) gets 1.
CPU_SLICE_BYTES = 3.2 * 2**20


def default_micro_batch(device: torch.device, micro_batch: int = 0, model=None, chip_size: int = 0) -> int:
    """``micro_batch`` when set (> 0); else 0 (the whole batch in one call) on GPUs, which want
    large batches, and on the CPU as many chips as fit :data:`CPU_SLICE_BYTES` of the model's
    finest feature map (its ``activation_bytes_per_pixel`` times ``chip_size``²), between 1 and
    :data:`CPU_MICRO_BATCH` (that many for a model that does not say)."""
    if micro_batch > 0:
        return int(micro_batch)
    if device.type != "cpu":
        return 0
    per_pixel = getattr(model, "activation_bytes_per_pixel", None)
    if not per_pixel or chip_size <= 0:
        return CPU_MICRO_BATCH
    return max(1, min(CPU_MICRO_BATCH, int(CPU_SLICE_BYTES // (per_pixel * chip_size**2))))


def _forward(
    model,
    x: torch.Tensor,
    device,
    precision,
    fn: Callable | None = None,
    micro_batch: int = 0,
    extra: tuple = (),
) -> np.ndarray:
    """``(fn or model)(x, *extra)`` on ``device`` as float32 numpy, in slices of ``micro_batch``
    chips (0: all at once); ``extra`` arrays are sliced along with ``x``."""
    fn = fn or model
    step = micro_batch if 0 < micro_batch < len(x) else len(x)
    out = None
    with torch.inference_mode(), autocast(device, precision):
        for i in range(0, len(x), step):
            part = (a[i : i + step] for a in extra)
            y = fn(x[i : i + step].to(device, non_blocking=True), *part).float().cpu()
            if step == len(x):
                return y.numpy()
            if out is None:
                out = np.empty((len(x), *y.shape[1:]), np.float32)
            out[i : i + step] = y.numpy()
    return out


def default_prefetch(device: torch.device) -> int:
    """Batches each worker reads ahead: 2 on GPUs (torch's default), 1 on the CPU, where reading
    ahead only competes with the forward pass for the same cores and costs one batch of memory
    per worker (which made peak memory grow from small scenes, too short to fill the queue, to
    large ones)."""
    return 2 if device.type == "cuda" else 1


def block_rows_for(requested: int = 16) -> int:
    """Output rows per block: a multiple of 16 (GeoTIFF tile heights must be)."""
    return max(16, round_up(requested, 16))


def split_rows(height: int, parts: int, block_rows: int) -> list[tuple[int, int]]:
    """Split ``height`` output rows into ``parts`` contiguous ranges aligned to ``block_rows``
    (some may be empty when there are more parts than blocks)."""
    blocks = -(-height // block_rows)
    out = []
    for r in range(parts):
        lo = min(height, (blocks * r // parts) * block_rows)
        hi = min(height, (blocks * (r + 1) // parts) * block_rows)
        out.append((lo, hi))
    return out


def run_dense(
    reader: ChipReader,
    model,
    sink,
    *,
    blend: str = "cosine",
    max_nodata_fraction: float = 0.5,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | None = None,
    precision: torch.dtype | None = None,
    rows: tuple[int, int] | None = None,
    progress: Progress | None = None,
    description: str = "",
    prefetch: int | None = None,
    background: bool | None = None,
    micro_batch: int = 0,
) -> RunStats:
    """Stitch ``model`` maps over ``reader``'s plan into ``sink`` (output rows ``rows``, default all).

    ``model(x)`` takes ``(B, bands, C, C)`` and returns ``(B, model.channels, C/stride, C/stride)``
    with ``stride == reader.plan.stride``. Batches of ``batch_size`` chips are read; the model
    sees them in slices of ``micro_batch`` (0: :func:`default_micro_batch`). The caller
    finishes the sink.

    ``background``: write row blocks in a thread (:class:`BackgroundSink`). Default: when the
    sink compresses (its ``compresses`` attribute, True when absent); a sink that only copies
    rows to disk is called directly, so no finished block waits in memory for the thread.
    """
    plan = reader.plan
    device = device or torch.device("cpu")
    progress = progress or NullProgress()
    rows = rows or (0, plan.out_height)
    if prefetch is None:
        prefetch = default_prefetch(device)
    micro_batch = default_micro_batch(device, micro_batch, model, plan.chip_size)
    stats = RunStats(rows=rows)
    if model.stride != plan.stride:
        raise ValueError(f"model stride {model.stride} differs from the plan's {plan.stride}")
    if background is None:
        background = bool(getattr(sink, "compresses", True))
    out = BackgroundSink(sink) if background else sink
    stitcher = RowStitcher(
        plan,
        model.channels,
        out.write_rows,
        blend=blend,
        block_rows=sink.block_rows,
        rows=rows,
        max_nodata_fraction=max_nodata_fraction,
    )
    chips = plan.chips(rows)
    t0 = time.perf_counter()
    progress.start(len(chips), description)
    expected = (model.channels, plan.n, plan.n)
    try:
        batch: ChipBatch
        loader = make_loader(reader, chips, batch_size, num_workers, device, prefetch)
        with forked_workers(num_workers):
            batches = iter(loader)  # the workers start here
        for batch in batches:
            y = None
            if batch.keep:
                tm = time.perf_counter()
                y = _forward(model, batch.x, device, precision, micro_batch=micro_batch)
                stats.model_seconds += time.perf_counter() - tm
                if y.shape[1:] != expected:
                    raise RuntimeError(f"model returned maps of shape {y.shape[1:]}, expected {expected}")
            pos = {j: i for i, j in enumerate(batch.keep)}
            for j, s in enumerate(batch.samples):
                stitcher.add(s.chip, y[pos[j]] if j in pos else None, s.invalid)
            stats.chips += len(batch)
            stats.computed += len(batch.keep)
            stats.skipped_empty += len(batch) - len(batch.keep)
            progress.advance(len(batch))
            if stats.chips // batch_size % TRIM_EVERY == 0:
                release_heap()
        stitcher.close()
        release_heap()  # what the stream freed, back to the OS before the caller finishes the sink
    finally:
        if out is not sink:
            out.close()
        progress.finish()
    stats.seconds = time.perf_counter() - t0
    stats.extra["stitch_buffer_bytes"] = stitcher.buffer_bytes
    return stats


def run_pooled(
    reader: ChipReader,
    vectors: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
    write: Callable[[list, np.ndarray], None],
    *,
    max_nodata_fraction: float = 0.5,
    batch_size: int = 16,
    num_workers: int = 0,
    device: torch.device | None = None,
    precision: torch.dtype | None = None,
    chips=None,
    progress: Progress | None = None,
    description: str = "",
    micro_batch: int = 0,
    model=None,
) -> RunStats:
    """One vector per chip: ``vectors(x, invalid)`` -> ``(B, D)``; ``write(samples, vectors)``.

    Chips whose in-scene pixels are more than ``max_nodata_fraction`` nodata are skipped.
    ``invalid`` is the batch's (B, n, n) per-feature-pixel invalid fraction (numpy). The model
    sees slices of ``micro_batch`` chips (0: :func:`default_micro_batch` for ``model``, the
    feature model behind ``vectors``).
    """
    device = device or torch.device("cpu")
    step = default_micro_batch(device, micro_batch, model, reader.plan.chip_size) or batch_size
    progress = progress or NullProgress()
    chips = reader.plan.chips() if chips is None else chips
    stats = RunStats()
    t0 = time.perf_counter()
    progress.start(len(chips), description)
    try:
        loader = make_loader(reader, chips, batch_size, num_workers, device, default_prefetch(device))
        with forked_workers(num_workers):
            batches = iter(loader)
        for batch in batches:
            take = [
                k
                for k, j in enumerate(batch.keep)
                if 1.0 - batch.samples[j].valid_fraction <= max_nodata_fraction
            ]
            if take:
                inv = np.stack([batch.samples[batch.keep[k]].invalid for k in take])
                tm = time.perf_counter()
                v = _forward(None, batch.x[take], device, precision, vectors, step, (inv,))
                stats.model_seconds += time.perf_counter() - tm
                write([batch.samples[batch.keep[k]] for k in take], v)
            stats.chips += len(batch)
            stats.computed += len(take)
            progress.advance(len(batch))
    finally:
        progress.finish()
    stats.seconds = time.perf_counter() - t0
    return stats


def masked_mean(maps: torch.Tensor, invalid: np.ndarray, max_nodata_fraction: float) -> torch.Tensor:
    """Mean of ``maps`` (B, C, n, n) over feature pixels whose invalid fraction is within bounds."""
    keep = torch.from_numpy(invalid <= max_nodata_fraction).to(maps.device, maps.dtype)[:, None]
    den = keep.sum(dim=(2, 3)).clamp_min(1.0)
    return (maps * keep).sum(dim=(2, 3)) / den


def stream_options(tiling, rt, progress: Progress | None, description: str) -> dict:
    """The keyword arguments of :func:`run_dense` for a recipe's ``tiling`` section and a
    resolved :class:`~deo_cli.runtime.Runtime` (embed, segment predict and detect-change)."""
    return dict(
        blend=tiling.blend,
        max_nodata_fraction=tiling.max_nodata_fraction,
        batch_size=rt.batch_size,
        num_workers=rt.num_workers,
        micro_batch=rt.micro_batch,
        device=rt.device,
        precision=rt.precision,
        progress=progress,
        description=description,
    )
