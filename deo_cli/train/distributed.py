"""torch.distributed for pretraining: one process per GPU (DDP), on one node or many.

Two ways to get several processes:

- ``deo pretrain --gpus N`` starts N processes on this machine (``torch.multiprocessing``, start
  method ``spawn``) and connects them through ``127.0.0.1`` on a free port. The parent process
  validates the run, then relays rank 0's log records and progress to the terminal.
- ``torchrun [--nnodes M --node_rank i --rdzv_endpoint HOST:PORT] --nproc_per_node N -m deo_cli
  pretrain ...`` starts the processes itself; deo detects it from the ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK`` / ``MASTER_ADDR`` environment variables and joins with ``init_method="env://"``
  (``--gpus`` is then ignored). This is how several nodes train together.

Backend: NCCL on CUDA, gloo on the CPU. Each process uses ``cuda:LOCAL_RANK``. Only rank 0 logs
and writes files. Every call is guarded by :func:`is_distributed`, so single-process runs never
touch ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import logging.handlers
import os
import queue as queue_mod
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deo_cli.errors import DeoError

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: How long a collective may wait for a silent peer before the run fails (not the default 30 min).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, rank on this node, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(v in os.environ for v in TORCHRUN_VARS) and int(os.environ.get("WORLD_SIZE", "1")) >= 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank``: ``cuda:LOCAL_RANK`` for CUDA runs."""
    if device.type == "cuda":
        return torch.device("cuda", local_rank)
    return device


def init_process_group(env: DistEnv, init_method: str) -> None:
    """Join the process group (NCCL on CUDA, gloo otherwise)."""
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    dist.init_process_group(
        backend, init_method=init_method, rank=env.rank, world_size=env.world_size, timeout=TIMEOUT
    )


def torchrun_env(device: torch.device) -> DistEnv:
    """The :class:`DistEnv` torchrun describes through its environment variables."""
    r, w, lr = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    return DistEnv(r, w, lr, process_device(device, lr))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (a list of one item without distribution)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over ranks (one collective) and return Python floats."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in keys])
    if is_distributed():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Spawning N local processes and relaying rank 0's logs and progress
# ---------------------------------------------------------------------------------------------


class _QueueLogHandler(logging.handlers.QueueHandler):
    """Sends formatted log records to the parent as ``("log", record, (), {})``."""

    def enqueue(self, record: logging.LogRecord) -> None:
        self.queue.put(("log", record, (), {}))


class QueueProgress:
    """A progress object that forwards calls to the parent process through a queue."""

    def __init__(self, q):
        self.q = q

    def start(self, total: int | None, description: str = "") -> None:
        self.q.put(("progress", "start", (total, description), {}))

    def advance(self, n: int = 1, **metrics: float) -> None:
        self.q.put(("progress", "advance", (n,), metrics))

    def finish(self) -> None:
        self.q.put(("progress", "finish", (), {}))


def _child(
    local_rank: int,
    fn: Callable,
    args: tuple,
    world: int,
    port: int,
    device_type: str,
    q,
    threads: int,
    level: int,
) -> None:
    logger = logging.getLogger("deo_cli")
    logger.handlers.clear()
    logger.propagate = False
    logger.addHandler(_QueueLogHandler(q))
    logger.setLevel(level if local_rank == 0 else max(level, logging.WARNING))
    torch.set_num_threads(threads)
    device = process_device(torch.device(device_type), local_rank)
    env = DistEnv(local_rank, world, local_rank, device)
    progress = QueueProgress(q) if local_rank == 0 else None
    try:
        init_process_group(env, f"tcp://127.0.0.1:{port}")
        fn(env, progress, *args)
    except DeoError as err:
        q.put(("error", err, (), {}))
        raise
    finally:
        cleanup()


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads(processes: int, workers: int) -> int | None:
    """Intra-op threads per training process on the CPU: the cores left once every process's
    DataLoader workers have one each. ``None`` when ``OMP_NUM_THREADS`` is set (the user decides).

    More threads than free cores make OpenMP's spin-waits collide; on a 2-core machine with one
    worker that costs an order of magnitude.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, available_cores() // max(1, processes) - workers)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (nothing when ``None``)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def spawn(
    fn: Callable, args: tuple, world: int, device: torch.device, progress=None, threads: int | None = None
) -> None:
    """Run ``fn(env, progress, *args)`` in ``world`` new processes on this machine and wait.

    Rank 0's log records are handled by this process's loggers and its progress calls go to
    ``progress``. A ``DeoError`` in any rank is re-raised here (one clear line); other failures
    raise ``torch.multiprocessing.ProcessRaisedException`` with the child's traceback.
    ``threads``: torch intra-op threads per process (default: the cores divided among them).
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    if threads is None:
        threads = max(1, available_cores() // world) if device.type == "cpu" else 1
    port = free_port()
    procs = mp.start_processes(
        _child,
        args=(
            fn,
            args,
            world,
            port,
            device.type,
            q,
            threads,
            logging.getLogger("deo_cli").getEffectiveLevel(),
        ),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    error: DeoError | None = None

    def drain() -> None:
        nonlocal error
        while True:
            try:
                kind, a, b, c = q.get_nowait()
            except queue_mod.Empty:
                return
            if kind == "error":
                error = error or a
            elif kind == "progress":
                if progress is not None:
                    getattr(progress, a)(*b, **c)
            elif kind == "log":
                logging.getLogger(a.name).handle(a)

    try:
        while True:
            try:
                done = procs.join(timeout=0.2)
            except mp.ProcessRaisedException:
                drain()
                if error is not None:
                    raise error from None
                raise
            except mp.ProcessExitedException:
                drain()
                if error is not None:
                    raise error from None
                raise
            drain()
            if done:
                break
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    drain()
