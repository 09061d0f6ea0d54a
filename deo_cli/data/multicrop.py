"""DEO's multi-crop views and augmentations (docs/method.md §2.3-2.4).

One training sample (all bands of a chip or window, in the model's band order, raw units) becomes
``global_number`` global crops and ``local_number`` local crops. For every crop:

1. **One crop window for all bands** (RandomResizedCrop: area fraction ``scale``, aspect ratio
   3/4-4/3, torchvision's sampling rule with its central-crop fallback), resized with bicubic
   interpolation (antialiased when shrinking) on the multi-channel float tensor, so the bands stay
   co-registered. Where a co-located high-resolution RGB image is given, the same box (mapped by
   relative position) is cut from it and resized onto the crop, replacing channels 0-2
   (docs/method.md §2.2).
2. **Horizontal flip** of all channels with ``hflip_p`` (0.5). No vertical flip, no rotation.
3. **RGB max-scaling**: channels 0-2 are divided by the crop's maximum RGB value over valid pixels
   (when it exceeds 1e-6) and clamped to [0, 1] (docs/method.md §2.3).
4. **RGB-only photometric augmentations** (docs/method.md §2.4) on those max-scaled channels, with
   torchvision's ``transforms.v2.functional`` ops and parameters drawn from the sample's own
   generator: ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p 0.8 (the
   four adjustments in a random order, as torchvision's ``ColorJitter``); grayscale with p 0.2;
   Gaussian blur (kernel 23, sigma uniform in [0.1, 2.0]) with p 1.0 / 0.1 / 0.5 for global 1 /
   global 2 / each local crop; solarize with p 0.2 on global 2 only. Extra global crops (more
   than two) use global 2's probabilities. The kernel is capped at ``2 * crop_size - 1`` for
   crops too small for reflect padding (never the case at DEO's sizes).
5. The augmented RGB is **written back into channels 0-2**, so the multispectral pass sees it too
   (docs/method.md §2.4), then **all channels are z-scored** with the manifest statistics
   (DEO_S2_MANIFEST: the max-scaled RGB statistics and SatMAE's fMoW-Sentinel statistics for
   B5..B12). Pixels that were nodata in the source are set to 0 (the band mean) afterwards.

**Solarize, Kornia semantics** (the official code uses ``kornia.augmentation.RandomSolarize``
with ``thresholds=0.5`` and its default ``additions=0.1``): a threshold ``t ~ U(0.5 - 0.5,
0.5 + 0.5) = U(0, 1)`` and an addition ``a ~ U(-0.1, 0.1)`` are drawn per crop; the addition is
applied first and clamped, ``x <- clamp(x + a, 0, 1)``, then every value at or above ``t`` is
inverted, ``x <- where(x < t, x, 1 - x)`` (:func:`solarize`). torchvision's solarize has a fixed
threshold and no addition, so it is not used. Kornia's Gaussian blur pads by reflection, as
torchvision's ``gaussian_blur`` does.

Every random draw comes from a ``torch.Generator`` passed in, so a sample's views depend only on
(seed, epoch, index) and not on which DataLoader worker made them (exact resume).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from deo_cli.sensors import BandManifest

#: RandomResizedCrop's aspect-ratio range (torchvision's default, which DINO/DEO keep).
RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Channels 0-2 are R, G, B in DEO's input order (docs/method.md §2.2).
RGB = slice(0, 3)


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=gen).item())


def _bernoulli(gen: torch.Generator, p: float) -> bool:
    if p <= 0.0:
        return False
    if p >= 1.0:
        return True
    return bool(torch.rand((), generator=gen).item() < p)


def crop_box(
    height: int,
    width: int,
    scale: Sequence[float],
    gen: torch.Generator,
    ratio: Sequence[float] = RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a RandomResizedCrop box, by torchvision's rule.

    Up to 10 tries of an area fraction ``U(scale)`` and a log-uniform aspect ratio; if none fits,
    the largest central box whose ratio lies within ``ratio``.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (), generator=gen).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def max_scale(rgb: Tensor, valid: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Divide by the maximum over valid pixels (when above ``eps``) and clamp to [0, 1] (docs/method.md §2.3)."""
    values = rgb[:, valid] if valid is not None and bool(valid.any()) else rgb
    m = float(values.max()) if values.numel() else 0.0
    if m > eps:
        rgb = rgb / m
    return rgb.clamp(0.0, 1.0)


def solarize(rgb: Tensor, threshold: float, addition: float = 0.0) -> Tensor:
    """Kornia's solarize: ``x = clamp(x + addition, 0, 1)``, then values ``>= threshold`` become ``1 - x``."""
    x = (rgb + addition).clamp(0.0, 1.0)
    return torch.where(x < threshold, x, 1.0 - x)


def color_jitter(
    rgb: Tensor, gen: torch.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> Tensor:
    """torchvision's ColorJitter: the four adjustments in a random order, factors drawn uniformly
    from ``[max(0, 1 - v), 1 + v]`` (hue: ``[-hue, hue]``)."""
    order = torch.randperm(4, generator=gen).tolist()
    b = _uniform(gen, max(0.0, 1 - brightness), 1 + brightness) if brightness > 0 else None
    c = _uniform(gen, max(0.0, 1 - contrast), 1 + contrast) if contrast > 0 else None
    s = _uniform(gen, max(0.0, 1 - saturation), 1 + saturation) if saturation > 0 else None
    h = _uniform(gen, -hue, hue) if hue > 0 else None
    for op in order:
        if op == 0 and b is not None:
            rgb = TF.adjust_brightness(rgb, b)
        elif op == 1 and c is not None:
            rgb = TF.adjust_contrast(rgb, c)
        elif op == 2 and s is not None:
            rgb = TF.adjust_saturation(rgb, s)
        elif op == 3 and h is not None:
            rgb = TF.adjust_hue(rgb, h)
    return rgb


@dataclass(frozen=True)
class CropKind:
    """Size, scale range and blur/solarize probabilities of one crop."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


class MultiCrop:
    """Turns one sample into DEO's global and local views (module docstring).

    Args:
        mean, std: per-band z-score statistics in the input's band order (the manifest's).
        global_number, global_size, global_scale: 2 crops of 224 px, area 0.4-1 (docs/method.md §2.4).
        local_number, local_size, local_scale: 10 crops of 96 px, area 0.05-0.4.
        hflip_p: horizontal flip probability (0.5).
        color_jitter_p, brightness, contrast, saturation, hue: 0.8; 0.4, 0.4, 0.2, 0.1.
        grayscale_p: 0.2.
        blur_kernel, blur_sigma: 23; (0.1, 2.0).
        blur_p: (global 1, global 2, each local) = (1.0, 0.1, 0.5).
        solarize_p: (global 1, global 2, each local) = (0.0, 0.2, 0.0).
        solarize_threshold: range of the drawn threshold, (0, 1) (Kornia ``thresholds=0.5``).
        solarize_addition: half-width of the drawn addition, 0.1 (Kornia's default ``additions``).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        global_number: int = 2,
        global_size: int = 224,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_number: int = 10,
        local_size: int = 96,
        local_scale: Sequence[float] = (0.05, 0.4),
        hflip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_kernel: int = 23,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_p: Sequence[float] = (1.0, 0.1, 0.5),
        solarize_p: Sequence[float] = (0.0, 0.2, 0.0),
        solarize_threshold: Sequence[float] = (0.0, 1.0),
        solarize_addition: float = 0.1,
    ):
        if global_number < 1:
            raise ValueError("global_number must be >= 1")
        if local_number < 0:
            raise ValueError("local_number must be >= 0")
        if len(mean) != len(std) or len(mean) < 3:
            raise ValueError("mean and std need one value per band (at least R, G, B)")
        if len(blur_p) != 3 or len(solarize_p) != 3:
            raise ValueError("blur_p and solarize_p hold (global 1, global 2, local) probabilities")
        if blur_kernel < 1 or blur_kernel % 2 == 0:
            raise ValueError("blur_kernel must be a positive odd number")
        self.mean = torch.tensor([float(v) for v in mean]).reshape(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in std]).reshape(-1, 1, 1)
        g1 = CropKind(int(global_size), tuple(global_scale), float(blur_p[0]), float(solarize_p[0]))
        g2 = CropKind(int(global_size), tuple(global_scale), float(blur_p[1]), float(solarize_p[1]))
        loc = CropKind(int(local_size), tuple(local_scale), float(blur_p[2]), float(solarize_p[2]))
        self.global_kinds = [g1] + [g2] * (global_number - 1)
        self.local_kinds = [loc] * local_number
        self.hflip_p = hflip_p
        self.color_jitter_p = color_jitter_p
        self.jitter = (brightness, contrast, saturation, hue)
        self.grayscale_p = grayscale_p
        self.blur_kernel = blur_kernel
        self.blur_sigma = tuple(blur_sigma)
        self.solarize_threshold = tuple(solarize_threshold)
        self.solarize_addition = float(solarize_addition)

    @property
    def num_bands(self) -> int:
        return int(self.mean.shape[0])

    def __call__(
        self,
        image: Tensor,
        gen: torch.Generator,
        valid: Tensor | None = None,
        rgb_image: Tensor | None = None,
    ) -> dict[str, list[Tensor]]:
        """``image (C, H, W)`` float in raw units -> ``{"global": [...], "local": [...]}`` of
        ``(C, size, size)`` z-scored crops. ``valid (H, W)`` bool marks usable pixels;
        ``rgb_image (3, H', W')`` is a co-located RGB image covering the same extent."""
        if image.ndim != 3 or image.shape[0] != self.num_bands:
            raise ValueError(f"expected ({self.num_bands}, H, W), got {tuple(image.shape)}")
        image = image.float()
        return {
            "global": [self.crop(image, kind, gen, valid, rgb_image) for kind in self.global_kinds],
            "local": [self.crop(image, kind, gen, valid, rgb_image) for kind in self.local_kinds],
        }

    def crop(
        self,
        image: Tensor,
        kind: CropKind,
        gen: torch.Generator,
        valid: Tensor | None = None,
        rgb_image: Tensor | None = None,
    ) -> Tensor:
        """One view (steps 1-5 of the module docstring)."""
        _, height, width = image.shape
        top, left, h, w = crop_box(height, width, kind.scale, gen)
        size = [kind.size, kind.size]
        x = TF.resized_crop(
            image, top, left, h, w, size, interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        mask = None
        if valid is not None:
            mask = TF.resized_crop(
                valid[None].float(), top, left, h, w, size, interpolation=InterpolationMode.NEAREST
            )[0].bool()
        if rgb_image is not None:
            x[RGB] = self._rgb_crop(rgb_image, top / height, left / width, h / height, w / width, kind.size)
        if _bernoulli(gen, self.hflip_p):
            x = x.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        rgb = max_scale(x[RGB], mask)
        rgb = self.photometric(rgb, kind, gen)
        x = torch.cat([rgb, x[3:]], dim=0)
        x = (x - self.mean) / self.std
        if mask is not None:
            x = x * mask
        return x.contiguous()

    @staticmethod
    def _rgb_crop(rgb: Tensor, top: float, left: float, h: float, w: float, size: int) -> Tensor:
        """The box given as fractions of the extent, cut from ``rgb`` and resized to ``size``."""
        _, rh, rw = rgb.shape
        t, lft = int(round(top * rh)), int(round(left * rw))
        hh, ww = max(1, int(round(h * rh))), max(1, int(round(w * rw)))
        hh, ww = min(hh, rh - t), min(ww, rw - lft)
        return TF.resized_crop(
            rgb.float(), t, lft, hh, ww, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True
        )

    def photometric(self, rgb: Tensor, kind: CropKind, gen: torch.Generator) -> Tensor:
        """ColorJitter (p 0.8), grayscale (p 0.2), blur and solarize (per crop kind) on max-scaled RGB."""
        if _bernoulli(gen, self.color_jitter_p):
            rgb = color_jitter(rgb, gen, *self.jitter).clamp(0.0, 1.0)
        if _bernoulli(gen, self.grayscale_p):
            rgb = TF.rgb_to_grayscale(rgb, num_output_channels=3)
        if _bernoulli(gen, kind.blur_p):
            sigma = _uniform(gen, *self.blur_sigma)
            k = min(self.blur_kernel, 2 * min(rgb.shape[-2:]) - 1)
            k = k if k % 2 else k - 1
            rgb = TF.gaussian_blur(rgb, [k, k], [sigma, sigma])
        if _bernoulli(gen, kind.solarize_p):
            threshold = _uniform(gen, *self.solarize_threshold)
            addition = _uniform(gen, -self.solarize_addition, self.solarize_addition)
            rgb = solarize(rgb, threshold, addition)
        return rgb


def build_multicrop(crops, manifest: BandManifest) -> MultiCrop:
    """A :class:`MultiCrop` from a recipe's ``crops`` section and the model's band manifest."""
    return MultiCrop(
        mean=manifest.mean,
        std=manifest.std,
        global_number=crops.global_number,
        global_size=crops.global_size,
        global_scale=crops.global_scale,
        local_number=crops.local_number,
        local_size=crops.local_size,
        local_scale=crops.local_scale,
        hflip_p=crops.hflip_p,
        color_jitter_p=crops.color_jitter_p,
        brightness=crops.brightness,
        contrast=crops.contrast,
        saturation=crops.saturation,
        hue=crops.hue,
        grayscale_p=crops.grayscale_p,
        blur_kernel=crops.blur_kernel,
        blur_sigma=crops.blur_sigma,
        blur_p=crops.blur_p,
        solarize_p=crops.solarize_p,
        solarize_threshold=crops.solarize_threshold,
        solarize_addition=crops.solarize_addition,
    )


def collate_multicrop(samples: Sequence[dict]) -> dict[str, Tensor | None]:
    """Stack samples: ``global (G, B, C, S, S)``, ``local (L, B, C, s, s)`` or ``None``, ``index (B,)``."""
    glob = torch.stack(
        [torch.stack([s["global"][g] for s in samples]) for g in range(len(samples[0]["global"]))]
    )
    n_local = len(samples[0]["local"])
    local = (
        torch.stack([torch.stack([s["local"][i] for s in samples]) for i in range(n_local)])
        if n_local
        else None
    )
    index = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    return {"global": glob, "local": local, "index": index}
