"""The input-gradient product on the faster CPU kernel: the same numbers to rounding, chosen once per shape."""

from __future__ import annotations

import pytest
import torch

from deo_cli.models import build_encoder, matmul
from deo_cli.models.swin import SwinBlock

needs_onednn = pytest.mark.skipif(matmul._LP is None, reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.setattr(matmul, "_choices", {})
    monkeypatch.setattr(matmul, "_pinned", False)


def _pick(monkeypatch, fast: str) -> None:
    """Make the timing say ``fast`` ("onednn" or "mkl") is faster."""
    calls = iter(range(1000))

    def seconds(fn, repeat=3):  # called for oneDNN first, then MKL
        return (0.0 if fast == "onednn" else 1.0) if next(calls) % 2 == 0 else 0.5

    monkeypatch.setattr(matmul, "_best_seconds", seconds)


@needs_onednn
@pytest.mark.parametrize("fast", ["onednn", "mkl"])
def test_input_grad_matches_mm_and_keeps_its_choice(monkeypatch, fast):
    g = torch.Generator().manual_seed(0)
    grad, weight = torch.randn(4096, 384, generator=g), torch.randn(384, 96, generator=g)
    _pick(monkeypatch, fast)
    got = matmul.input_grad(grad, weight)
    ref = grad.mm(weight)
    assert got.shape == ref.shape == (4096, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    assert list(matmul.choices().values()) == [fast]
    # the choice is kept: no more timing for this shape
    monkeypatch.setattr(matmul, "_best_seconds", lambda *a, **k: pytest.fail("timed twice"))
    torch.testing.assert_close(matmul.input_grad(grad, weight), ref, rtol=1e-5, atol=1e-4)
    if fast == "mkl":
        assert torch.equal(matmul.input_grad(grad, weight), ref)


def test_input_grad_is_torch_mm_where_there_is_no_choice(monkeypatch):
    monkeypatch.setattr(matmul, "_best_seconds", lambda *a, **k: pytest.fail("timed"))
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4096, 384, generator=g), torch.randn(384, 96, generator=g)
    small = torch.randn(64, 32, generator=g), torch.randn(32, 16, generator=g)  # under MIN_MACS
    double = tuple(t.double() for t in big)
    with matmul.pinned():
        assert torch.equal(matmul.input_grad(*big), big[0].mm(big[1]))
    assert torch.equal(matmul.input_grad(*small), small[0].mm(small[1]))
    assert torch.equal(matmul.input_grad(*double), double[0].mm(double[1]))
    assert matmul.choices() == {}


@needs_onednn
def test_swin_block_gradients_on_onednn_equal_mkl_to_rounding(monkeypatch):
    """A Swin-T stage-1 block large enough for the choice: with oneDNN's input-gradient products,
    the forward values are the same bits and every gradient is MKL's to rounding."""
    torch.manual_seed(0)
    block = SwinBlock(96, 3, [7, 7], [3, 3], stochastic_depth_prob=0.0, norm_layer=torch.nn.LayerNorm)
    block.attn.__class__ = type(build_encoder("deo_swin_test", weights=None).features[0][1].attn)
    block.train()
    x = torch.randn(2, 56, 56, 96)
    runs = []
    for pin in (True, False):
        _pick(monkeypatch, "onednn")
        block.zero_grad()
        xi = x.clone().requires_grad_()
        if pin:
            with matmul.pinned():
                y = block(xi)
                y.square().sum().backward()
        else:
            y = block(xi)
            y.square().sum().backward()
        runs.append([y.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()])
    assert set(matmul.choices().values()) == {"onednn"}
    assert torch.equal(runs[0][0], runs[1][0])  # forward: untouched
    for a, b in zip(runs[0][1:], runs[1][1:], strict=True):
        # sums over 6,272 rows in another order: rounding relative to the gradient's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
