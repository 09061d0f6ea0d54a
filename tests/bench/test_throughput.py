"""Timing the encoder forward: warm-up excluded, images/s and a peak-memory figure."""

import torch

from deo_cli.bench import throughput
from deo_cli.models import build_encoder


def test_measure_forward_counts_only_timed_batches(monkeypatch):
    enc = build_encoder("deo_swin_test", weights=None)
    calls = []
    real = enc.forward

    def counting(x):
        calls.append(x.shape)
        return real(x)

    monkeypatch.setattr(enc, "forward", counting)
    clock = iter([10.0, 12.0])  # 2 s for the timed batches
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    res = throughput.measure_forward(enc, 3, 32, 10, torch.device("cpu"), warmup=2, iterations=4)
    assert len(calls) == 6 and calls[0] == (3, 10, 32, 32)
    assert res.images_per_s == 3 * 4 / 2.0 and res.seconds_per_batch == 0.5
    assert res.peak_memory_mib > 10 and res.memory_kind in ("rss_peak", "rss_peak_lifetime")
