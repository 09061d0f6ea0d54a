"""Benchmark ``deo embed``: end-to-end throughput against the pure model forward, and peak memory.

For each model and scene size (synthetic 10-band uint16 Sentinel-2-like scenes, written once as
tiled, DEFLATE-compressed GeoTIFFs into a work folder), a fresh subprocess:

1. builds the model (random weights) and warms it up;
2. times the model alone on a band of real chips from the middle of the plan (read beforehand
   into memory) in the pipeline's slices (on a CPU sized by the model's activations, see
   :func:`deo_cli.infer.runner.default_micro_batch`), ``--forward-rounds`` rounds;
3. runs :func:`deo_cli.tasks.embed.predict.run_embed` on the scene (everything a user waits
   for: unit and RGB statistics, reads, forward passes, stitching, the tiled GeoTIFF, the COG copy
   with overviews), probing the pure forward during it (:class:`ForwardProbe`);
4. times the model alone again as in 2, then in calls of 4, 8 and ``--batch-size`` chips.

Memory comes from a second subprocess that only builds the model and runs ``run_embed``, as a
user would, with the kernel's RSS high-water mark (``VmHWM``) reset just before; the timing
above fragments the heap and raised the peak by 40-70 MB. (With DataLoader workers the speed
run also samples their PSS every 0.5 s.)

It reports (a) end-to-end chips/s (probe time taken out) divided by the pure forward probed
during the run (this VM's speed drifts by +-15 % within minutes, so a baseline taken at another
time says more about the VM than about the pipeline), target >= 0.85 on a 2-core CPU; also
against the mean of the rounds of 2 and 4 (``ratio_adjacent``) and the best pure forward of any
round and slice (``ratio_vs_best_forward``), and as the model's share of the end-to-end time
(``model_share``); and (b) the peak RSS of each run and its growth from the smallest to the
largest scene (target < 10 %). Results are printed and written to
``benchmarks/results/embed.json`` (entries of other models/sizes already in the file are kept).

    python benchmarks/embed.py                                   # tiny model 1k/4k/10k, swin_t 1k/4k
    python benchmarks/embed.py --models deo_swin_t --sizes 10000  # the long one (~10 min on 2 cores)
    python benchmarks/embed.py --models deo_swin_b --sizes 10980 --cog --device cuda --batch-size 64
                                                   # a full Sentinel-2 tile on a GPU (gpu_check.py)

On a GPU (``--device cuda``) the pure forward is timed on chips already on the GPU, every timing
waits for the GPU (``torch.cuda.synchronize``), and ``peak_cuda_mb`` is the CUDA allocator's peak
(``max_memory_allocated``) over the run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "embed.json"
DEFAULT_RUNS = [
    ("deo_swin_test", 1000),
    ("deo_swin_test", 4000),
    ("deo_swin_test", 10000),
    ("deo_swin_t", 1000),
    ("deo_swin_t", 4000),
]
BANDS = ["B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]


# ---------------------------------------------------------------------------------------------
# Synthetic scenes
# ---------------------------------------------------------------------------------------------


def scene_path(workdir: Path, size: int, compress: str = "deflate", cog: bool = False) -> Path:
    """Where :func:`main` keeps the synthetic scene of ``size`` px (made once, then reused)."""
    return workdir / f"scene_{size}_{compress}{'_cog' if cog else ''}.tif"


def make_scene(path: Path, size: int, seed: int = 0, compress: str = "deflate", cog: bool = False) -> Path:
    """A size x size, 10-band uint16 scene (smooth fields plus noise), tiled 256.

    ``cog``: a Cloud-Optimized GeoTIFF as Sentinel-2 tiles are distributed (nodata 0, 512 px
    blocks, ``compress`` with a predictor, overviews): the rows are written block by block into
    an uncompressed tiled temporary file, which GDAL's COG driver then compresses with every
    core; the arrays held are one row of blocks whatever the size (10980 px: a 2.4 GB scene)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp.tif")
    written = "none" if cog else compress
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=10,
        dtype="uint16",
        crs="EPSG:32631",
        transform=Affine(10.0, 0, 400000.0, 0, -10.0, 5000000.0),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress=written,
        **({"predictor": 2} if written != "none" else {}),
        interleave="pixel",
        bigtiff="IF_SAFER",
        **({"nodata": 0} if cog else {}),
    )
    freqs = rng.uniform(0.002, 0.02, (10, 3, 2))
    phases = rng.uniform(0, 2 * np.pi, (10, 3))
    xs = np.arange(size, dtype=np.float32)

    def band(b: int, ys, noise):
        f = sum(np.sin(freqs[b, j, 0] * ys + freqs[b, j, 1] * xs + phases[b, j]) for j in range(3))
        f = 1500 + 400 * b / 10 + 350 * f + noise
        return np.clip(f, 1, 10000).astype(np.uint16)

    # The bands of a row of blocks are computed in threads (NumPy releases the GIL); the noise is
    # drawn in the same order as one band after the other, so the values do not depend on it.
    with rasterio.open(tmp, "w", **profile) as ds, ThreadPoolExecutor(min(10, os.cpu_count() or 1)) as pool:
        ds.descriptions = tuple(BANDS)
        for r0 in range(0, size, 256):
            k = min(256, size - r0)
            ys = np.arange(r0, r0 + k, dtype=np.float32)[:, None]
            noise = [rng.normal(0, 60, (k, size)) for _ in range(10)]
            block = np.stack(list(pool.map(band, range(10), [ys] * 10, noise)))
            del noise
            ds.write(block, window=Window(0, r0, size, k))
    if cog:
        import rasterio.shutil

        staged = path.with_name(path.name + ".cog.tmp.tif")
        try:
            rasterio.shutil.copy(
                tmp,
                staged,
                driver="COG",
                compress=compress,
                **({"predictor": "YES"} if compress != "none" else {}),
                num_threads="ALL_CPUS",
                bigtiff="IF_SAFER",
                overview_resampling="average",
            )
            os.replace(staged, path)
        finally:
            tmp.unlink(missing_ok=True)
            staged.unlink(missing_ok=True)
        return path
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Memory sampling (this process and its descendants: the DataLoader workers)
# ---------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (fork copy-on-write, libraries) split between the
    processes sharing them, so summing over processes does not count them twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (Linux >= 4.0: ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_kb() -> int:
    """This process's RSS high-water mark since the last :func:`_reset_peak_rss` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                kids = []
            out += kids
            stack += kids
    return out


class RssSampler(threading.Thread):
    """Peaks of the summed PSS of this process and its descendants, and of this process's RSS,
    sampled every ``interval`` seconds.

    Not faster than every 0.5 s: reading ``smaps_rollup`` walks the page tables of a process
    holding a model under its memory lock; at every 50 ms it cost the measured run 30 % of its
    throughput (4k x 4k, Swin-T: 5.8 chips/s sampled every 50 ms, 8.9 with /proc/stat only)."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kb = 0
        self.peak_main_kb = 0
        self._halt = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._halt.is_set():
            main = _rss_kb(me)
            total = _pss_kb(me) + sum(_pss_kb(p) for p in _descendants(me))
            self.peak_kb = max(self.peak_kb, total)
            self.peak_main_kb = max(self.peak_main_kb, main)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _cuda_sync(device) -> None:
    import torch

    torch.cuda.synchronize(device)


def _cuda_peaks(device) -> dict:
    """The CUDA caching allocator's peaks since the last reset (None on other devices)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return {"peak_cuda_mb": None, "peak_cuda_reserved_mb": None}
    return {
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
        "peak_cuda_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
    }


def _reset_cuda_peaks(device) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


class ForwardProbe:
    """The model as the pipeline sees it, timing the pure forward *during* the run.

    Every ``every`` seconds, the slice the pipeline hands over is first run ``repeat`` more
    times on its own and timed: the pure forward on the same chips, at the same moment (this
    VM's speed drifts by +-15 % within minutes, more than the effect measured), with no extra
    memory. The probe's time is taken out of the end-to-end time and the model time.
    """

    def __init__(self, model, every: float = 10.0, repeat: int = 4):
        self.model = model
        self.every = every
        self.repeat = repeat
        self.chips = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.rates: list[float] = []
        self._calls = 0
        self._due = 0.0  # the third call probes (the first ones still allocate), then every ``every`` s

    def __getattr__(self, name):
        return getattr(self.model, name)

    def to(self, device):
        self.model = self.model.to(device)
        return self

    def __call__(self, x):
        now = time.perf_counter()
        self._calls += 1
        if self._calls >= 3 and now >= self._due:
            cuda = getattr(x, "is_cuda", False)
            if cuda:  # the GPU runs asynchronously: time its work, not the launches
                _cuda_sync(x.device)
                now = time.perf_counter()
            cpu = _cpu_seconds()
            for _ in range(self.repeat):
                self.model(x)
            if cuda:
                _cuda_sync(x.device)
            dt = time.perf_counter() - now
            self.cpu_seconds += _cpu_seconds() - cpu
            self.chips += self.repeat * len(x)
            self.seconds += dt
            self.rates.append(self.repeat * len(x) / dt)
            self._due = time.perf_counter() + self.every
        return self.model(x)

    @property
    def chips_per_second(self) -> float:
        return self.chips / self.seconds if self.seconds else float("nan")


# ---------------------------------------------------------------------------------------------
# One run (in a subprocess)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def peak_before_finish():
    """Yields a dict whose ``kb`` is set to the RSS high-water mark when the COG copy starts
    (``StreamingRasterWriter.finish``): the peak of the streaming part alone."""
    from deo_cli.io.writers import StreamingRasterWriter

    finish = StreamingRasterWriter.finish
    seen = {"kb": 0}

    def timed_finish(self):
        seen["kb"] = _peak_rss_kb()
        return finish(self)

    StreamingRasterWriter.finish = timed_finish
    try:
        yield seen
    finally:
        StreamingRasterWriter.finish = finish


def memory_run(model, recipe, scene: Path, out: Path, workers: int = 0, device=None) -> dict:
    """Peak RSS of one ``run_embed`` with no timing around it: the forward-speed measurements
    of :func:`child` leave the heap fragmented (a 64-chip forward before the run raised the
    tiny model's 4k peak from ~900 to 971 MB), so memory gets a process of its own.

    With reading ``workers`` the peak is the larger of this process's and the peak summed PSS of
    it and its workers (sampled as in :func:`child`); on a CUDA ``device`` also the allocator's
    peaks."""
    from deo_cli.infer.runner import release_heap
    from deo_cli.tasks.embed.predict import run_embed

    gc.collect()
    release_heap()
    base_kb = _rss_kb(os.getpid())
    sampler = RssSampler() if workers > 0 else None
    _reset_cuda_peaks(device)
    _reset_peak_rss()
    if sampler is not None:
        sampler.start()
    with peak_before_finish() as before_finish:
        (res,) = run_embed([str(scene)], out, recipe, model=model, overwrite=True)
    peak_kb = _peak_rss_kb()
    if sampler is not None:
        sampler.stop()
        peak_kb = max(peak_kb, sampler.peak_kb)
    return {
        "rss_before_mb": round(base_kb / 1024, 1),
        "peak_mb": round(peak_kb / 1024, 1),
        "peak_rss_streaming_mb": round(before_finish["kb"] / 1024, 1),
        "chips": res.chips,
        **_cuda_peaks(device),
    }


def decode_once_seconds(scene: Path, repeat: int = 2) -> float:
    """Seconds to decode ``scene`` once (best of ``repeat``): every band, whole rows of its
    blocks in their own data type, GDAL with every core and a cache no read reuses. Any
    pipeline must do at least this on the same cores as the forward pass, so with the model
    taking ``f`` s, ``f / (f + this)`` bounds the ratio (a) can reach (``ratio_ceiling``)."""
    import rasterio
    from rasterio.windows import Window

    best = float("inf")
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", GDAL_CACHEMAX=64 * 2**20):
        for _ in range(repeat):
            with rasterio.open(scene) as ds:
                rows = ds.block_shapes[0][0]
                t = time.perf_counter()
                for r0 in range(0, ds.height, rows):
                    ds.read(window=Window(0, r0, ds.width, min(rows, ds.height - r0)))
                best = min(best, time.perf_counter() - t)
    return best


def child(model_name: str, size: int, scene: Path, outdir: Path, args) -> dict:
    import numpy as np
    import torch

    from deo_cli.infer.chips import ChipReader
    from deo_cli.infer.model import EncoderFeatures, resolve_layer
    from deo_cli.infer.prepare import prepare_input
    from deo_cli.infer.runner import default_micro_batch, release_heap
    from deo_cli.infer.tiling import TilePlan
    from deo_cli.io.raster import open_scene
    from deo_cli.models import build_encoder, get_model_spec
    from deo_cli.recipes import EmbedRecipe, build_recipe
    from deo_cli.runtime import (
        autocast,
        precision_name,
        resolve_device,
        resolve_num_workers,
        resolve_precision,
    )
    from deo_cli.tasks.embed.predict import run_embed

    torch.manual_seed(0)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    spec = get_model_spec(model_name)
    model = EncoderFeatures(build_encoder(model_name, weights=None), resolve_layer(spec, "default"))
    model = model.to(device)
    sets = [
        f"model.name={model_name}",
        "model.weights=random",
        f"tiling.chip_size={args.chip_size}",
        f"runtime.batch_size={args.batch_size}",
        f"runtime.num_workers={args.num_workers}",
        f"runtime.micro_batch={args.micro_batch}",
        f"runtime.device={args.device}",
        f"runtime.precision={args.precision}",
    ]
    recipe = build_recipe(EmbedRecipe, sets=sets)
    bs = args.batch_size

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # the pipeline's slices
    step = default_micro_batch(device, args.micro_batch, model, args.chip_size) or bs
    with torch.inference_mode(), autocast(device, precision):  # warm-up (first calls allocate)
        model(torch.zeros(step, 10, args.chip_size, args.chip_size, device=device))
    sync()
    out = outdir / f"{model_name}_{size}.tif"
    if out.exists():
        out.unlink()
    workers = resolve_num_workers(
        args.num_workers if args.num_workers == "auto" else int(args.num_workers), device
    )
    if args.memory_only:  # the run as a user makes it: nothing else in the process
        return memory_run(model, recipe, scene, out, workers, device)

    def forward_chips():
        """The chips a forward-only run uses: a band of real chips from the middle of the plan."""
        sc = open_scene(str(scene))
        inp = prepare_input(sc, model.manifest, model.rgb_manifest)
        plan = TilePlan.create(sc.height, sc.width, args.chip_size, model.stride, None)
        reader = ChipReader(sc, inp.bands, inp.normalizer, plan)
        chips = plan.chips()
        mid = len(chips) // 2
        n_fwd = min(len(chips), args.forward_chips)
        pick = chips[max(0, mid - n_fwd // 2) : max(0, mid - n_fwd // 2) + n_fwd]
        xs = torch.from_numpy(np.stack([reader.read(c).x for c in pick])).to(device)
        sc.close()
        return plan, xs

    fwd_cpu_per_chip = []

    def forward_cps(xs, step: int) -> float:
        """Chips/s of the model alone over ``xs``, ``step`` chips per call."""
        with torch.inference_mode(), autocast(device, precision):
            model(xs[:step])  # warm-up
            sync()
            c = _cpu_seconds()
            t = time.perf_counter()
            for i in range(0, len(xs), step):
                model(xs[i : i + step])
            sync()
            fwd_cpu_per_chip.append((_cpu_seconds() - c) / len(xs))
            return len(xs) / (time.perf_counter() - t)

    rounds = max(2, args.forward_rounds)
    # the pure forward right before the run, in the pipeline's slices (this VM's speed drifts by
    # +-15 % within minutes, so the baseline is taken next to the run, before and after it)
    plan, xs = forward_chips()
    before = [forward_cps(xs, step) for _ in range(rounds)]
    del xs
    gc.collect()
    release_heap()
    load0 = os.getloadavg()[0]
    sampler = RssSampler()
    base_kb = _rss_kb(os.getpid())
    _reset_cuda_peaks(device)
    _reset_peak_rss()  # the high-water mark from here on is the run's alone
    sampler.start()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    probe = ForwardProbe(model, every=args.probe_every)
    with peak_before_finish() as before_finish:
        (res,) = run_embed([str(scene)], out, recipe, model=probe, overwrite=True)
    e2e_s = time.perf_counter() - t0 - probe.seconds  # the run without its probes
    e2e_cpu = _cpu_seconds() - cpu0 - probe.cpu_seconds  # this process + its (joined) workers
    # the kernel's high-water mark of this process's RSS over the run: exact, unlike sampling,
    # which can miss the peak of a one-second run (it covers reading too when there are no workers)
    maxrss_kb = _peak_rss_kb()
    sampler.stop()
    cuda_peaks = _cuda_peaks(device)
    plan, xs = forward_chips()
    after = [forward_cps(xs, step) for _ in range(rounds)]
    adjacent = sum(before + after) / len(before + after)

    # and the model's best over every slice size and round: the most conservative baseline
    steps = sorted({bs, 4, 8, step})
    by_step = {st: [forward_cps(xs, st) for _ in range(rounds)] for st in steps}
    fwd_best = max([v for r in by_step.values() for v in r] + before + after)
    e2e_cps = res.chips / e2e_s
    decode_s = decode_once_seconds(scene)
    forward_s = res.chips / probe.chips_per_second
    timing = dict(res.extra.get("timing") or {})
    if timing:
        timing["model_seconds"] = round(timing["model_seconds"] - probe.seconds, 3)
        timing["stream_seconds"] = round(timing["stream_seconds"] - probe.seconds, 3)
    return {
        "model": model_name,
        "size": size,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision_name(precision),
        "chip_size": args.chip_size,
        "overlap": plan.overlap,
        "layer": model.layer,
        "stride": model.stride,
        "channels": model.channels,
        "batch_size": bs,
        "num_workers": args.num_workers,
        "num_workers_resolved": workers,
        "chips": res.chips,
        "end_to_end_s": round(e2e_s, 2),
        "end_to_end_chips_per_s": round(e2e_cps, 3),
        "forward_chips_per_s": round(probe.chips_per_second, 3),
        "forward_probes": len(probe.rates),
        "forward_probe_chips_per_s": [round(v, 2) for v in probe.rates],
        "forward_adjacent_chips_per_s": round(adjacent, 3),
        "forward_chips_per_s_before": [round(v, 3) for v in before],
        "forward_chips_per_s_after": [round(v, 3) for v in after],
        "forward_slice": step,
        "forward_best_chips_per_s": round(fwd_best, 3),
        "forward_chips_per_s_by_slice": {str(k): [round(v, 3) for v in r] for k, r in by_step.items()},
        "micro_batch": args.micro_batch,
        "micro_batch_resolved": step,
        "timing_s": timing,
        # (a): end-to-end over the pure forward timed during the run on the pipeline's slices
        "ratio": round(e2e_cps / probe.chips_per_second, 4),
        "ratio_adjacent": round(e2e_cps / adjacent, 4),
        "ratio_vs_best_forward": round(e2e_cps / fwd_best, 4),
        # the floor no pipeline gets under: decoding the input once (see decode_once_seconds)
        "input_decode_once_s": round(decode_s, 3),
        "ratio_ceiling": round(forward_s / (forward_s + decode_s), 4),
        # CPU seconds per chip (all processes): insensitive to other load on the machine
        "end_to_end_cpu_s_per_chip": round(e2e_cpu / res.chips, 5),
        "forward_cpu_s_per_chip": round(min(fwd_cpu_per_chip), 5),
        "cpu_ratio": round(min(fwd_cpu_per_chip) / (e2e_cpu / res.chips), 4),
        "peak_pss_mb": round(sampler.peak_kb / 1024, 1),
        # with no reading workers (deo's default on <= 4 cores) the process is the whole run
        "peak_mb": round(
            (maxrss_kb if workers == 0 else max(sampler.peak_kb, maxrss_kb)) / 1024,
            1,
        ),
        "peak_rss_e2e_mb": round(maxrss_kb / 1024, 1),
        "peak_rss_streaming_mb": round(before_finish["kb"] / 1024, 1),
        # share of the end-to-end time spent in the model's forward calls (robust to the VM's
        # speed changing between the end-to-end run and the pure-forward timing)
        "model_share": round(timing["model_seconds"] / e2e_s, 4),
        "peak_rss_main_mb": round(sampler.peak_main_kb / 1024, 1),
        # the CUDA caching allocator's peaks over the run (None on the CPU)
        **cuda_peaks,
        "rss_before_mb": round(base_kb / 1024, 1),
        "ru_maxrss_main_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ru_maxrss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "output_mb": round(out.stat().st_size / 1e6, 2),
        "loadavg_start": round(load0, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _peak(row: dict) -> float:
    return row.get("peak_mb") or row["peak_pss_mb"]


def _input(row: dict) -> str:
    """What a run read and ran on besides model and size: the scene's compression, ``-cog`` for
    a COG, ``@cuda`` off the CPU (rows of CPU runs on plain GeoTIFFs: the compression alone)."""
    label = row.get("scene_compression", "deflate")
    if row.get("scene_format") == "cog":
        label += "-cog"
    if row.get("device", "cpu") != "cpu":
        label += f"@{row['device']}"
    return label


def run_child(cmd: list[str]) -> dict | None:
    """Run one child (``--child ...``) and return its ``RESULT`` row; None (output printed) if it
    failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return None
    return json.loads(line[-1][7:])


def _commit() -> str:
    """The checkout's commit, ``+changes`` when the code measured differs from it."""
    try:
        git = ["git", "-C", str(ROOT)]
        sha = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "deo_cli", "benchmarks/embed.py"],
            capture_output=True,
            text=True,
        )
        return sha.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="models to run (default: the standard set)")
    ap.add_argument("--sizes", nargs="*", type=int, help="scene sizes in px (default: the standard set)")
    ap.add_argument(
        "--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "deo-bench-embed"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--chip-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", default="auto", help="runtime.num_workers (default: deo's auto)")
    ap.add_argument("--micro-batch", type=int, default=0, help="runtime.micro_batch (0: deo's default)")
    ap.add_argument("--forward-chips", type=int, default=64)
    ap.add_argument(
        "--forward-rounds", type=int, default=3, help="pure-forward rounds before and after each run"
    )
    ap.add_argument(
        "--probe-every", type=float, default=10.0, help="seconds between pure-forward probes during a run"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the best ratio is kept")
    ap.add_argument(
        "--compress", default="deflate", help="compression of the synthetic scenes (deflate, none)"
    )
    ap.add_argument("--device", default="auto", help="runtime.device (auto, cpu, cuda, cuda:N)")
    ap.add_argument("--precision", default="auto", help="runtime.precision (auto, fp32, bf16, fp16)")
    ap.add_argument(
        "--cog",
        action="store_true",
        help="synthetic scenes as Sentinel-2-like COGs (nodata 0, 512 px blocks, overviews)",
    )
    ap.add_argument(
        "--no-memory-run",
        dest="memory_run",
        action="store_false",
        help="skip the separate memory run; peak memory is then the timed run's",
    )
    ap.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "SIZE", "SCENE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        name, size, scene = args.child
        row = child(name, int(size), Path(scene), args.workdir, args)
        print("RESULT " + json.dumps(row), flush=True)
        return 0

    runs = DEFAULT_RUNS
    if args.models or args.sizes:
        models = args.models or sorted({m for m, _ in DEFAULT_RUNS})
        sizes = args.sizes or sorted({s for _, s in DEFAULT_RUNS})
        runs = [(m, s) for m in models for s in sizes]
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, size in runs:
        scene = make_scene(
            scene_path(args.workdir, size, args.compress, args.cog),
            size,
            compress=args.compress,
            cog=args.cog,
        )
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            str(size),
            str(scene),
            "--workdir",
            str(args.workdir),
            "--chip-size",
            str(args.chip_size),
            "--batch-size",
            str(args.batch_size),
            "--num-workers",
            str(args.num_workers),
            "--forward-chips",
            str(args.forward_chips),
            "--micro-batch",
            str(args.micro_batch),
            "--forward-rounds",
            str(args.forward_rounds),
            "--probe-every",
            str(args.probe_every),
            "--device",
            args.device,
            "--precision",
            args.precision,
        ]
        print(f"running {name} on {size} x {size} px ...", flush=True)
        tries = [run_child(cmd) for _ in range(max(1, args.repeat))]
        if None in tries:
            return 1
        row = max(tries, key=lambda r: r["ratio"])
        row["repeats"] = len(tries)
        row["ratios_of_repeats"] = [t["ratio"] for t in tries]
        row["scene_compression"] = args.compress
        if args.cog:
            row["scene_format"] = "cog"
        row["commit"] = _commit()
        # memory from a run of its own (the speed run's probes and pure forwards perturb it)
        row["memory_run"] = args.memory_run
        if args.memory_run:
            mem = run_child([*cmd, "--memory-only"])
            if mem is None:
                return 1
            row["peak_mb_speed_run"] = row["peak_mb"]
            row["peak_rss_streaming_mb_speed_run"] = row["peak_rss_streaming_mb"]
            row.update(peak_mb=mem["peak_mb"], peak_rss_streaming_mb=mem["peak_rss_streaming_mb"])
            row["rss_before_memory_run_mb"] = mem["rss_before_mb"]
            if mem.get("peak_cuda_mb") is not None:
                row["peak_cuda_mb_speed_run"] = row["peak_cuda_mb"]
                row.update(
                    peak_cuda_mb=mem["peak_cuda_mb"], peak_cuda_reserved_mb=mem["peak_cuda_reserved_mb"]
                )
        rows.append(row)
        print(
            f"  {row['chips']} chips: end-to-end {row['end_to_end_chips_per_s']:.2f} chips/s, "
            f"forward {row['forward_chips_per_s']:.2f} chips/s, ratio {row['ratio']:.3f} "
            f"(CPU-time ratio {row['cpu_ratio']:.3f}, model share {row['model_share']:.3f}, "
            f"ceiling {row['ratio_ceiling']:.3f}: input decoded once in {row['input_decode_once_s']:.2f} s); "
            f"peak {row['peak_mb']:.0f} MB ({row['peak_rss_streaming_mb']:.0f} MB before the COG copy); "
            f"load {row['loadavg_start']}-{row['loadavg_end']}"
            + (f"; GPU peak {row['peak_cuda_mb']:.0f} MB" if row.get("peak_cuda_mb") is not None else ""),
            flush=True,
        )

    # merge with earlier results (other models/sizes), then summarise
    old = []
    if args.out.exists():
        try:
            old = json.loads(args.out.read_text()).get("runs", [])
        except ValueError:
            old = []

    def key(r):
        return (r["model"], _input(r), r["size"])

    done = {key(r) for r in rows}
    allrows = [r for r in old if key(r) not in done] + rows
    allrows.sort(key=key)
    growth = {}
    for m, comp in sorted({key(r)[:2] for r in allrows}):
        mine = sorted((r for r in allrows if key(r)[:2] == (m, comp)), key=lambda r: r["size"])
        if len(mine) > 1:
            a, b = mine[0], mine[-1]
            top = max(mine[1:], key=_peak)
            growth[f"{m} ({comp})"] = {
                "from": a["size"],
                "to": b["size"],
                "peak_growth": round(_peak(b) / _peak(a) - 1, 4),
                # a middle size may peak higher than the largest (glibc's heap, run to run)
                "largest_peak_growth": round(_peak(top) / _peak(a) - 1, 4),
                "largest_peak_size": top["size"],
            }
    import torch

    summary = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "targets": {"ratio": ">= 0.85", "peak_memory_growth_smallest_to_largest": "< 0.10"},
        "memory": "peak_mb: the RSS high-water mark (VmHWM, reset right before the run) of a "
        "separate process that only runs the embedding (no probes, no pure forwards); with "
        "workers, the larger of that and the peak summed PSS of the process and its workers "
        "sampled every 0.5 s; peak_mb_speed_run: the same in the timed run",
        "ratio": "end-to-end chips/s (probe time taken out) over the pure forward probed during "
        "the run (every --probe-every s the current slice run again on its own), in the "
        "pipeline's slices; with --repeat the best run is kept (ratios_of_repeats lists all); "
        "ratio_adjacent: over the mean of the forward rounds right before and after the run; "
        "ratio_vs_best_forward: over the best round of any slice size; ratio_ceiling: the pure "
        "forward's time over itself plus input_decode_once_s, the time to decode the input once "
        "with every core (the least any pipeline must add on the cores the forward uses)",
        "runs": allrows,
        "rss_growth": growth,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print()
    print(
        f"{'model':<15}{'input':>8}{'size':>7}{'chips':>7}{'e2e/s':>9}{'fwd/s':>9}{'ratio':>8}{'ceil':>7}{'cpu':>7}{'peakMB':>9}"
    )
    for r in allrows:
        print(
            f"{r['model']:<15}{_input(r):>8}{r['size']:>7}{r['chips']:>7}{r['end_to_end_chips_per_s']:>9.2f}"
            f"{r['forward_chips_per_s']:>9.2f}{r['ratio']:>8.3f}{r.get('ratio_ceiling', float('nan')):>7.3f}"
            f"{r['cpu_ratio']:>7.3f}{_peak(r):>9.0f}"
        )
    for m, g in growth.items():
        print(
            f"{m}: peak memory growth {g['from']} -> {g['to']} px: {100 * g['peak_growth']:.1f} % "
            f"(largest peak, {g['largest_peak_size']} px: {100 * g['largest_peak_growth']:+.1f} %)"
        )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
