"""Change vector analysis (CVA): the spectral baseline of ``deo detect-change --method cva``.

The baseline every change-detection paper reports: no features, no training, the size of the
per-pixel spectral difference of the two dates. Here each date is read, reprojected and
normalised exactly as for the DEO scores (the ``--model``'s band manifest: its bands by name,
each date's unit inferred, then ``(x - mean) / std`` per band; :mod:`deo_cli.infer.prepare`),
and the score is the root mean square over the ``B`` bands of the normalised difference::

    score = || x_after - x_before || / sqrt(B)

(the norm of the normalised band difference, divided by ``sqrt(B)`` so that it does not grow
with the number of bands), on the input grid; red, green and blue of both dates are divided by
the first date's RGB scale (:func:`same_scale`). It goes through the same streaming runner,
nodata rules, thresholds and outputs as the zero-shot score, so the two can be compared inside
deo (``deo bench --suite oscd`` does, city by city). No weights are loaded.
"""

from __future__ import annotations

import torch
from torch import nn

#: The histogram range of CVA scores (standard deviations of the band manifest): unchanged
#: land is mostly below 1, new buildings 1-4; clouds can exceed 16 and are counted in the top
#: bin (the exact maximum is still recorded).
CVA_RANGE = (0.0, 16.0)
#: Chip size when ``--chip-size`` is not given (the score is per pixel: any size gives the
#: same values; no overlap is needed).
CVA_CHIP = 256


def same_scale(before, after):
    """``after``'s input plan with ``before``'s RGB scale (:class:`~deo_cli.infer.prepare.InputPlan`).

    DEO's band manifest divides red, green and blue by a per-scene maximum (the 99.9th
    percentile of the scene's RGB values), which makes a date with a new bright roof darker
    everywhere else: a per-pixel difference would then flag every RGB pixel. CVA compares the
    dates on one scale: the first date's maximum, in the second date's units.
    """
    from dataclasses import replace

    from deo_cli.data.normalize import Normalizer

    if before.rgb_max is None or after.rgb_max is None:
        return after
    scale = before.rgb_max * before.unit_factor / after.unit_factor
    norm = Normalizer.from_manifest(after.manifest, unit_factor=after.unit_factor, rgb_max=scale)
    return replace(after, normalizer=norm, rgb_max=scale)


class CvaChange(nn.Module):
    """``(B, 2C, H, W)`` (both dates stacked, normalised) -> ``(B, 1, H, W)`` RMS difference."""

    def __init__(self, spec, input_size: int = CVA_CHIP):
        super().__init__()
        self.name = "cva"
        self.spec_name = spec.name
        self.stride = 1
        self.align = 1
        self.channels = 1
        self.input_size = int(input_size)
        self.manifest = spec.manifest
        self.rgb_manifest = spec.rgb_manifest
        self.weights_uri = None
        self.weights_sha256 = None
        self.score_range = CVA_RANGE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1] // 2
        d = x[:, :c].float() - x[:, c:].float()
        return d.square().mean(dim=1, keepdim=True).sqrt()

    def describe(self) -> dict:
        return {
            "score": "change vector analysis: root mean square over the bands of the difference of "
            "the two dates normalised by the band manifest (||x2 - x1|| / sqrt(bands))",
            "bands_from": self.spec_name,
            "stride": 1,
            "range": list(self.score_range),
        }


__all__ = ["CVA_CHIP", "CVA_RANGE", "CvaChange", "same_scale"]
