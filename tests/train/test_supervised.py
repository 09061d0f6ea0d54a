import numpy as np
import torch

from deo_cli.models import build_encoder
from deo_cli.models.upernet import build_seg_head
from deo_cli.train.supervised import FitSettings, FrozenEncoderSegmenter, evaluate_dense, fit_dense


def _toy_loader(n=8, size=32, seed=0):
    """Images whose left half is bright in band 0: the mask marks that half (learnable by a head)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n // 4):
        x = torch.randn(4, 10, size, size, generator=g) * 0.1
        mask = torch.zeros(4, size, size, dtype=torch.long)
        for b in range(4):
            c = int(torch.randint(4, size - 4, (1,), generator=g))
            x[b, 0, :, :c] += 3.0
            mask[b, :, :c] = 1
        batches.append({"image": x, "mask": mask})
    return batches


def test_frozen_encoder_never_changes_and_head_learns():
    torch.manual_seed(0)
    enc = build_encoder("deo_swin_test", weights="random")
    head = build_seg_head("linear", enc.feature_channels, enc.feature_strides, 2)
    model = FrozenEncoderSegmenter(enc, head, freeze=True)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    train, val = _toy_loader(8, seed=0), _toy_loader(8, seed=1)
    dev = torch.device("cpu")
    start = evaluate_dense(model, val, 2, dev)["miou"]
    res = fit_dense(model, train, val, FitSettings(epochs=6, warmup_epochs=1, lr=3e-2, num_classes=2), dev)
    model.head.load_state_dict({k[5:]: v for k, v in res.best_state.items()})
    after = evaluate_dense(model, val, 2, dev)
    assert after["miou"] > start and after["miou"] > 0.6
    assert res.best_metric == max(r["val_miou"] for r in res.history)
    assert all(not k.startswith("encoder.") for k in res.best_state)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k  # frozen: weights and BN statistics untouched
    assert not enc.training


def test_ignore_index_is_excluded_from_metrics():
    enc = build_encoder("deo_swin_test", weights="random")
    model = FrozenEncoderSegmenter(
        enc, build_seg_head("linear", enc.feature_channels, enc.feature_strides, 2)
    )
    batch = _toy_loader(4)[0]
    batch["mask"][:] = 255
    m = evaluate_dense(model, [batch], 2, torch.device("cpu"), ignore_index=255)
    assert np.isnan(m["miou"]) and np.asarray(m["confusion"]).sum() == 0
