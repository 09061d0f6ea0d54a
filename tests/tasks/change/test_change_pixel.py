"""The full-resolution pixel-difference branch of the siamese change head (PixelDiffHead)."""

import pytest
import torch

from deo_cli.errors import UsageError
from deo_cli.models import build_encoder
from deo_cli.models.upernet import UPerNetHead
from deo_cli.tasks.change.model import PixelDiffHead, SiameseChange, make_change_head


def _model(pixel_channels=8, fusion="diff"):
    torch.manual_seed(0)
    enc = build_encoder("deo_swin_test", weights=None)
    head = make_change_head(
        "upernet",
        SiameseChange.head_channels(enc.feature_channels, fusion),
        enc.feature_strides,
        8,
        pixel_bands=10,
        pixel_channels=pixel_channels,
    )
    return SiameseChange(enc, head, freeze=True, fusion=fusion).eval()


def test_pixel_head_inputs_and_date_symmetry():
    model = _model()
    assert isinstance(model.head, PixelDiffHead) and isinstance(model.head.head, UPerNetHead)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 10, 64, 64, generator=g), torch.randn(2, 10, 64, 64, generator=g)
    inputs = model.head_inputs(torch.cat([a, b], 1))
    # first: [|a - b|, (a + b) / 2] at the chip's full resolution, then the four encoder levels
    assert inputs[0].shape == (2, 20, 64, 64)
    torch.testing.assert_close(inputs[0][:, :10], (a - b).abs())
    torch.testing.assert_close(inputs[0][:, 10:], (a + b) / 2)
    assert [t.shape[-1] for t in inputs[1:]] == [16, 8, 4, 2]
    with torch.no_grad():
        ab, ba = model(torch.cat([a, b], 1)), model(torch.cat([b, a], 1))
    assert ab.shape == (2, 2, 64, 64)
    torch.testing.assert_close(ab, ba, atol=1e-5, rtol=1e-5)  # diff fusion + symmetric branch


def test_pixel_branch_reaches_single_pixels():
    """A one-pixel change moves the logits around that pixel, hardly anywhere else."""
    model = _model()
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1, 10, 64, 64, generator=g)
    b = a.clone()
    b[0, :, 30, 41] += 3.0
    with torch.no_grad():
        d = (model(torch.cat([a, b], 1)) - model(torch.cat([a, a], 1)))[0].abs().sum(0)
    near = d[28:33, 39:44]  # the branch's two 3x3 convolutions see 5x5 pixels
    far = d.clone()
    far[24:37, 35:48] = 0
    assert near.max() == d.max() > 0
    assert far.max() < 0.05 * d.max()  # elsewhere only the head's global pooling moves a little


def test_pixel_channels_zero_is_the_plain_head_and_bands_are_checked():
    plain = _model(pixel_channels=0)
    assert isinstance(plain.head, UPerNetHead)
    assert not any(k.startswith("pixel") for k in plain.head.state_dict())
    with pytest.raises(UsageError, match="10 bands per date, the input has 3"):
        _model().head_inputs(torch.zeros(1, 6, 64, 64))
