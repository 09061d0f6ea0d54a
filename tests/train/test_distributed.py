"""Process-group plumbing: torchrun detection, and --gpus N processes relaying logs, progress, errors."""

import logging
import time

import pytest
import torch

from deo_cli.errors import DataError
from deo_cli.train import distributed as ddp


def test_torchrun_environment_is_detected(monkeypatch):
    for var in ddp.TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not ddp.launched_by_torchrun()
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert ddp.launched_by_torchrun()
    got = ddp.torchrun_env(torch.device("cpu"))
    assert (got.rank, got.world_size, got.local_rank, got.is_main) == (5, 8, 1, False)
    assert ddp.process_device(torch.device("cuda"), 3) == torch.device("cuda", 3)


def test_single_process_helpers_need_no_process_group():
    assert not ddp.is_distributed() and ddp.world_size() == 1 and ddp.rank() == 0
    assert ddp.all_gather_object({"a": 1}) == [{"a": 1}]
    assert ddp.all_reduce_mean({"x": torch.tensor(2.5)}) == {"x": 2.5}
    ddp.barrier()


def _worker(env, progress, fail_rank):
    summed = ddp.all_reduce_mean({"rank": torch.tensor(float(env.rank))})
    gathered = ddp.all_gather_object(env.rank * 10)
    if env.is_main:
        progress.start(2, "relay")
        progress.advance(1, mean_rank=summed["rank"], gathered=float(sum(gathered)))
        progress.finish()
        logging.getLogger("deo_cli.test").info("hello from rank 0 of %d", env.world_size)
    if env.rank == fail_rank:
        time.sleep(0.5)
        raise DataError("rank 1 found no data", "check --data")


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, total, description=""):
        self.calls.append(("start", total, description))

    def advance(self, n=1, **metrics):
        self.calls.append(("advance", n, metrics))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.slow
def test_spawned_ranks_relay_progress_logs_and_errors(caplog):
    logger = logging.getLogger("deo_cli")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="deo_cli")
    try:
        rec = Recorder()
        ddp.spawn(_worker, (-1,), 2, torch.device("cpu"), rec)
        assert rec.calls == [
            ("start", 2, "relay"),
            ("advance", 1, {"mean_rank": 0.5, "gathered": 10.0}),
            ("finish",),
        ]
        assert "hello from rank 0 of 2" in caplog.text
        with pytest.raises(DataError, match="rank 1 found no data"):
            ddp.spawn(_worker, (1,), 2, torch.device("cpu"), Recorder())
    finally:
        logger.removeHandler(caplog.handler)


def test_cpu_threads_leave_cores_for_the_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(ddp, "available_cores", lambda: 16)
    assert ddp.cpu_threads(1, 8) == 8 and ddp.cpu_threads(2, 2) == 6 and ddp.cpu_threads(4, 8) == 1
    monkeypatch.setattr(ddp, "available_cores", lambda: 2)
    assert ddp.cpu_threads(1, 1) == 1 and ddp.cpu_threads(1, 0) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert ddp.cpu_threads(1, 1) is None  # the user's setting wins
    before = torch.get_num_threads()
    with ddp.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
