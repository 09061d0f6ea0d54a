"""Test models and scenes for tiled inference.

:class:`ConvFeatures` is a small conv net with a bounded receptive field and stride 4, wrapped
to the :class:`~deo_cli.infer.model.FeatureModel` API, so stitched maps can be compared with
one forward pass over the whole scene.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deo_cli.sensors import DEO_RGB_MANIFEST, DEO_S2_MANIFEST

S2_BANDS = list(DEO_S2_MANIFEST.bands)


class ConvFeatures(nn.Module):
    """conv3x3 -> tanh -> conv4x4/4 -> tanh -> conv3x3: stride 4, 8 channels.

    A chip-border (zero padding) error reaches at most 2 feature pixels into a chip.
    """

    name = "conv_test"
    stride = 4
    channels = 8
    input_size = 32
    manifest = DEO_S2_MANIFEST
    rgb_manifest = DEO_RGB_MANIFEST
    weights_uri = "random"
    weights_sha256 = None
    layer = 0

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(10, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 4, stride=4)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.rgb = nn.Conv2d(3, 10, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.eval()

    def forward(self, x):
        if x.shape[1] == 3:
            x = self.rgb(x)
        return self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x)))))

    def pooled(self, x):
        return self.forward(x).mean(dim=(2, 3))


def smooth_scene(
    h: int, w: int, bands: int = 10, seed: int = 0, lo: float = 300, hi: float = 4000
) -> np.ndarray:
    """A smooth random uint16 DN scene (bands, h, w): sums of a few random sinusoids."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.zeros((bands, h, w))
    for b in range(bands):
        for _ in range(4):
            fy, fx = rng.uniform(0.01, 0.15, 2)
            ph = rng.uniform(0, 2 * np.pi)
            out[b] += np.sin(fy * yy + fx * xx + ph)
        out[b] += rng.normal(0, 0.3, (h, w))
    out = (out - out.min()) / (out.max() - out.min())
    return (lo + out * (hi - lo)).astype(np.uint16)


def assert_valid_cog(path) -> None:
    """The checks of GDAL's COG validator that matter here: GDAL recognises the COG layout
    (the ghost header the COG driver writes), the image and every overview are tiled, and the
    data of smaller overviews come before larger ones and before the full-resolution image."""
    import rasterio

    with rasterio.open(path) as ds:
        assert ds.driver == "GTiff"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG", ds.tags(ns="IMAGE_STRUCTURE")
        assert ds.profile.get("tiled") is True
        ovs = ds.overviews(1)
        assert ovs, "no overviews"
        assert all(ds.overviews(b) == ovs for b in ds.indexes)
        main = int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        offsets = [int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1, ovr=i)) for i in range(len(ovs))]
    assert all(o < main for o in offsets), (offsets, main)
    assert offsets == sorted(offsets, reverse=True), offsets  # smallest overview first on disk
    for i in range(len(ovs)):
        with rasterio.open(path, overview_level=i) as ov:
            assert ov.profile.get("tiled") is True
