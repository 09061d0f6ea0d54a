"""From raw band values to model input, by the model's band manifest.

One :class:`Normalizer` per (scene, model): it knows the unit conversion (e.g. reflectance 0-1
x 10^4 to DN), the fixed scale of DEO's max-scaled RGB bands and the per-band mean/std, and
applies ``clamp01(x * scale) - mean) / std`` band by band on numpy arrays or torch tensors
shaped ``(..., C, H, W)``.

DEO max-scales the RGB channels of every training crop by the crop's maximum RGB value
(docs/method.md §2.3). At inference a per-chip maximum would make neighbouring chips disagree (a
seam at every chip edge), so deo uses one **scene-level** value instead: the 99.9th percentile
of the RGB values over the scene's valid pixels (:func:`scene_rgb_max`, computed on a
decimated read of the whole scene). It is written into the output tags, and can be fixed with
``input.rgb_max``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deo_cli.sensors import BandManifest

RGB_MAX_PERCENTILE = 99.9


@dataclass(frozen=True)
class Normalizer:
    """``(clamp01?(x * scale) - mean) / std`` per band, in manifest order."""

    bands: tuple[str, ...]
    scale: tuple[float, ...]
    clamp01: tuple[bool, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_manifest(
        cls,
        manifest: BandManifest,
        unit_factor: float = 1.0,
        rgb_max: float | None = None,
    ) -> Normalizer:
        """``unit_factor`` converts scene values to the manifest's unit; ``rgb_max`` is the value
        (in scene units) that max-scaled bands are divided by (required if the manifest has any)."""
        scale, clamp = [], []
        for b in manifest.bands:
            if b in manifest.max_scaled:
                if rgb_max is None or not np.isfinite(rgb_max) or rgb_max <= 0:
                    raise ValueError(
                        f"manifest {manifest.name} max-scales {b}: a positive rgb_max is required"
                    )
                scale.append(1.0 / float(rgb_max))
                clamp.append(True)
            else:
                scale.append(float(unit_factor))
                clamp.append(False)
        return cls(manifest.bands, tuple(scale), tuple(clamp), tuple(manifest.mean), tuple(manifest.std))

    def __call__(self, x):
        """Normalise ``x`` (``(..., C, H, W)``; numpy or torch; float). Returns a new array."""
        shape = (len(self.bands), 1, 1)
        if hasattr(x, "new_tensor"):  # torch, without importing it here
            scale = x.new_tensor(self.scale).reshape(shape)
            mean = x.new_tensor(self.mean).reshape(shape)
            std = x.new_tensor(self.std).reshape(shape)
            clamp = x.new_tensor(self.clamp01, dtype=x.dtype).reshape(shape).bool()
            y = x * scale
            y = y.where(~clamp, y.clamp(0.0, 1.0))
            return (y - mean) / std
        x = np.asarray(x, dtype=np.float32)
        scale = np.asarray(self.scale, np.float32).reshape(shape)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        clamp = np.asarray(self.clamp01).reshape(shape)
        y = x * scale
        y = np.where(clamp, np.clip(y, 0.0, 1.0), y)
        return ((y - mean) / std).astype(np.float32)

    def to_dict(self) -> dict:
        return {
            "bands": list(self.bands),
            "scale": list(self.scale),
            "clamp01": list(self.clamp01),
            "mean": list(self.mean),
            "std": list(self.std),
        }


def scene_rgb_max(values: np.ndarray, valid: np.ndarray | None = None) -> float:
    """The scene-level RGB scale: the 99.9th percentile of the RGB values of valid pixels.

    ``values`` is (3, H, W) (or any shape with RGB values); ``valid`` masks pixels.
    """
    v = np.asarray(values, dtype=np.float64)
    if valid is not None:
        v = v[..., np.asarray(valid, bool)]
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no valid RGB pixels to compute the scene's RGB scale")
    m = float(np.percentile(v, RGB_MAX_PERCENTILE))
    if m <= 0:
        m = float(v.max())
    if m <= 0:
        raise ValueError("RGB bands are all zero")
    return m
