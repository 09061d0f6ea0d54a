"""Ranks for ``--gpus N`` inference: this process is rank 0, ``N - 1`` children are spawned.

Each rank computes a contiguous band of output rows (aligned to the writer's blocks) and writes
its own part file; rank 0 waits for all, then assembles the parts into one output (a VRT into
the COG driver for rasters, row groups for GeoParquet). Nothing but a "done / failed" flag and
small objects (an int8 scale) travel between ranks, so the ``gloo`` backend on CPU and ``nccl``
on GPUs behave the same. Under ``torchrun`` (``WORLD_SIZE`` set) the launcher's ranks are used
as they are.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deo_cli.errors import DeoError

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def sums(self, *values: int) -> tuple[int, ...]:
        """Each of ``values`` summed over the ranks (a collective: every rank must call it)."""
        if not self.active:
            return tuple(int(v) for v in values)
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=dev)  # NCCL reduces on the GPU
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return tuple(int(v) for v in t.tolist())

    def all_ok_and_total(self, ok: bool, count: int) -> tuple[bool, int]:
        """Whether every rank reports ``ok``, and ``count`` summed over the ranks (one
        collective: every rank must call it)."""
        failed, total = self.sums(0 if ok else 1, count)
        return failed == 0, total

    def broadcast(self, obj):
        """``obj`` from rank 0, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order, on every rank (a collective)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_rank(rank: int, world: int, port: int) -> RankInfo:
    dist.init_process_group(
        _backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:  # share the CPU cores between the ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return RankInfo(rank, world)


def _child(rank: int, world: int, port: int, fn: Callable, args: tuple, kwargs: dict, level: int) -> None:
    # every rank reads the same scenes: their warnings are rank 0's again, so only errors (all with -v)
    quiet = level if level < logging.INFO else max(level, logging.ERROR)
    logging.basicConfig(level=quiet, format=f"[rank {rank}] %(levelname)s %(message)s")
    info = init_rank(rank, world, port)
    try:
        fn(*args, ranks=info, **kwargs)
    except DeoError as e:  # rank 0 reports the same error in one line; no traceback from here
        logging.getLogger(__name__).debug("rank %d: %s", rank, e, exc_info=True)
        raise SystemExit(1) from None
    finally:
        dist.destroy_process_group()


def run_ranks(
    world: int,
    fn: Callable,
    *args,
    main_kwargs: dict | None = None,
    tolerate_failed_ranks: bool = False,
    **kwargs,
):
    """Run ``fn(*args, ranks=RankInfo, **kwargs)`` on ``world`` ranks; returns rank 0's result.

    ``fn`` and its arguments must pickle (children are spawned); ``main_kwargs`` (e.g. a
    progress bar) go to this process's call only. Under ``torchrun`` the current process is one
    of the launcher's ranks. ``tolerate_failed_ranks``: a child rank that died (killed, out of
    memory) is logged, not raised, when rank 0 still returned (its result says what is missing).
    """
    kwargs_main = {**kwargs, **(main_kwargs or {})}
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            dist.init_process_group(_backend(), timeout=TIMEOUT)
        info = RankInfo(dist.get_rank(), dist.get_world_size())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", info.rank)) % torch.cuda.device_count())
        return fn(*args, ranks=info, **(kwargs_main if info.is_main else kwargs))
    if world <= 1:
        return fn(*args, ranks=RankInfo(), **kwargs_main)
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    level = logging.getLogger("deo_cli").getEffectiveLevel()
    children = [
        ctx.Process(target=_child, args=(r, world, port, fn, args, kwargs, level), daemon=False)
        for r in range(1, world)
    ]
    for p in children:
        p.start()
    info = init_rank(0, world, port)
    try:
        result = fn(*args, ranks=info, **kwargs_main)
    finally:
        dist.destroy_process_group()
        for p in children:
            p.join()
    bad = [p.exitcode for p in children if p.exitcode != 0]
    if bad and tolerate_failed_ranks:
        log.error("%d inference rank(s) stopped (exit codes %s)", len(bad), bad)
    elif bad:
        raise RuntimeError(f"{len(bad)} inference rank(s) failed (exit codes {bad})")
    return result
