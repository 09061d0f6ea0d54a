"""Linear probe and kNN on cached features; the feature cache itself."""

import numpy as np
import torch

from deo_cli.bench.features import FeatureCache, extract_features, pool_features
from deo_cli.bench.knn import knn_predict
from deo_cli.bench.linear import ProbeSettings, predict, train_linear_probe
from deo_cli.models import build_encoder


def _blobs(n, k=3, d=8, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(k, d) * 3
    y = torch.arange(n) % k
    x = centers[y] + spread * torch.randn(n, d, generator=g)
    return x, y


def test_linear_probe_learns_and_keeps_best_validation_epoch():
    x, y = _blobs(60)
    xv, yv = _blobs(30, seed=1)
    xt, yt = _blobs(30, seed=2)
    settings = ProbeSettings(epochs=8, warmup_epochs=1, batch_size=16, lr=1e-2)
    res = train_linear_probe(
        FeatureCache(x[None], y), FeatureCache(xv[None], yv), 3, False, settings, torch.device("cpu")
    )
    assert res.best_val == max(h["val"] for h in res.history)
    assert res.history[res.best_epoch]["val"] == res.best_val
    assert (predict(res.layer, xt, False, torch.device("cpu")) == yt.numpy()).mean() > 0.9
    # same seed, same result
    again = train_linear_probe(
        FeatureCache(x[None], y), FeatureCache(xv[None], yv), 3, False, settings, torch.device("cpu")
    )
    assert torch.equal(again.layer.weight, res.layer.weight)


def test_linear_probe_multilabel_and_flip_variants():
    x, y = _blobs(60, k=4)
    multi = torch.nn.functional.one_hot(y, 4).float()
    multi[:, 3] = 1.0  # a label every sample has
    variants = torch.stack([x, x + 0.01, x - 0.01, x * 1.01])  # four cached "flips"
    settings = ProbeSettings(epochs=10, warmup_epochs=1, batch_size=16, lr=3e-2)
    res = train_linear_probe(
        FeatureCache(variants, multi), FeatureCache(x[None], multi), 4, True, settings, torch.device("cpu")
    )
    pred = predict(res.layer, x, True, torch.device("cpu"))
    assert pred.dtype == bool and pred.shape == (60, 4) and pred[:, 3].all()
    assert res.best_val > 0.9


def test_knn_majority_vote_cosine_and_multilabel():
    bank = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.9, -0.1], [0.0, 1.0], [0.1, 3.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    queries = torch.tensor([[10.0, 0.5], [0.2, 0.5]])  # scale does not matter with cosine
    assert knn_predict(bank, labels, queries, 2, k=3).tolist() == [0, 1]
    multi = torch.tensor([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1]])
    pred = knn_predict(bank, multi, queries, 2, k=3, multilabel=True)
    assert pred.tolist() == [[True, False], [False, True]]
    # k larger than the bank is clipped
    assert knn_predict(bank, labels, queries, 2, k=50).shape == (2,)


def test_extract_features_mean_pool_and_flips():
    torch.manual_seed(0)
    enc = build_encoder("deo_swin_test", weights=None)
    x = torch.randn(3, 10, 32, 32)
    loader = [{"image": x[:2], "label": torch.tensor([0, 1])}, {"image": x[2:], "label": torch.tensor([2])}]
    cache = extract_features(enc, loader, torch.device("cpu"), flips=True)
    assert cache.features.shape == (4, 3, enc.feature_channels[-1]) and cache.targets.tolist() == [0, 1, 2]
    with torch.no_grad():
        expected = enc(x)[-1].mean(dim=(-2, -1))  # last map, no final norm (docs/method.md §3.1)
        flipped = pool_features(enc, x.flip(-1))
    assert torch.allclose(cache.features[0], expected, atol=1e-5)
    assert torch.allclose(cache.features[1], flipped, atol=1e-5)
    assert not torch.allclose(cache.features[0], cache.features[1])
    pooled = pool_features(enc, x, "model")
    assert pooled.shape == (3, enc.pooled_dim) and not torch.allclose(pooled, expected)
    assert np.isfinite(cache.features.numpy()).all()
