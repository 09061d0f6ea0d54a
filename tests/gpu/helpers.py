"""What the GPU tests share: small synthetic scenes, a segmentation head file, and comparisons of
a run on the GPU with the same run on the CPU in fp32.

The comparisons take plain arrays, so they say nothing about where the arrays came from; the
tolerances (:data:`TOL`) are per autocast precision. The bounds leave room for other kernels
(cuDNN, cuBLAS, TF32 convolutions) than the CPU's, while a real fault (a band order, a device
mix-up, a dropped normalisation) gives a cosine near 0 and a relative error near 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch

from deo_cli.data.segdata import ClassTable
from deo_cli.infer.headfile import HeadFile, encoder_record, make_head, save_head
from deo_cli.models import build_encoder
from tests.conftest import write_raster
from tests.infer.helpers import S2_BANDS, smooth_scene

PRECISIONS = ("fp32", "bf16", "fp16")

#: Per precision: the least per-pixel cosine of embedding vectors (0.1st percentile, mean), the
#: largest relative L2 error of an embedding raster, the least share of equal class / change pixels
#: (``agree``; among pixels whose fp32 class wins by at least :data:`CONFIDENT` probability,
#: ``agree_confident``), and the largest mean absolute difference of probabilities or of change
#: scores (as a share of the scores' range). Measured on the CPU, bf16 autocast against fp32:
#: cosine 0.99995 / 0.99998, relative error 0.7 %, classes 99.5 % equal (all flips where the fp32
#: gap was under 0.18), change masks 99.8 %, probabilities 0.003, scores 0.001.
TOL = {
    "fp32": {"cos_p001": 0.999, "cos_mean": 0.9999, "rel": 0.01, "agree": 0.995, "mad": 0.002},
    "bf16": {"cos_p001": 0.99, "cos_mean": 0.999, "rel": 0.05, "agree": 0.98, "mad": 0.01},
    "fp16": {"cos_p001": 0.995, "cos_mean": 0.9995, "rel": 0.02, "agree": 0.99, "mad": 0.005},
}
#: Top-two probability gap (fp32) above which a pixel's class must not change with the precision.
CONFIDENT = 0.2
AGREE_CONFIDENT = 0.999

#: Scene size (rows, cols): several chips in both directions at chip size 64, not a multiple of it.
SHAPE = (200, 232)


def write_scenes(folder: Path) -> tuple[Path, Path]:
    """Two dates of a 10-band uint16 DN scene (S2 band names, UTM, 10 m): the second is the
    first with noise and a brighter 48 x 56 px block (a change)."""
    folder.mkdir(parents=True, exist_ok=True)
    a = smooth_scene(*SHAPE, seed=3)
    rng = np.random.default_rng(4)
    b = np.clip(a.astype(np.int32) + rng.integers(-40, 41, a.shape), 1, 10000)
    b[:, 80:128, 120:176] = np.clip(b[:, 80:128, 120:176] * 1.8 + 600, 1, 10000)
    before = write_raster(folder / "before.tif", a, descriptions=S2_BANDS, crs="EPSG:32631")
    after = write_raster(folder / "after.tif", b.astype(np.uint16), descriptions=S2_BANDS, crs="EPSG:32631")
    return before, after


def write_segment_head(path: Path, scene: Path, seed: int = 0) -> Path:
    """A segmentation head file (UPerNet, 3 classes) on a random deo_swin_test encoder embedded in
    the file, its classifier fitted to ``scene`` so that classes are decided by clear margins.

    A random head's logits are nearly equal everywhere (one class wins the whole scene, by a
    margin any rounding can flip), which would test nothing. Here the classifier projects the
    head's last features (read from ``scene`` as the pipeline reads it) onto their two main
    directions, in units of their spread: three classes over the scene, each pixel's class
    decided by logit gaps of several units except near the class borders."""
    from deo_cli.infer.chips import ChipReader
    from deo_cli.infer.prepare import prepare_input
    from deo_cli.infer.tiling import TilePlan
    from deo_cli.io.raster import open_scene

    torch.manual_seed(seed)
    enc = build_encoder("deo_swin_test", weights=None).eval()
    head = make_head("upernet", enc.feature_channels, enc.feature_strides, 3, channels=16).eval()
    sc = open_scene(str(scene))
    try:
        inp = prepare_input(sc, enc.manifest, enc.rgb_manifest)
        plan = TilePlan.create(sc.height, sc.width, 64, 4, None)
        reader = ChipReader(sc, inp.bands, inp.normalizer, plan)
        x = torch.from_numpy(np.stack([reader.read(c).x for c in plan.chips()]))
    finally:
        sc.close()
    seen = {}
    hook = head.classifier.register_forward_hook(lambda m, i, o: seen.setdefault("z", i[0]))
    with torch.no_grad():
        head(list(enc(x)), out_size=(64, 64))
    hook.remove()
    z = seen["z"].permute(0, 2, 3, 1).reshape(-1, seen["z"].shape[1]).double()
    mean = z.mean(0)
    _, s, v = torch.linalg.svd(z - mean, full_matrices=False)
    pc = v[:2] / (s[:2, None] / len(z) ** 0.5)  # unit spread along each direction
    w = CLASSIFIER_GAIN * torch.stack([pc[0], pc[1], -(pc[0] + pc[1])])
    with torch.no_grad():
        head.classifier.weight.copy_(w[:, :, None, None].float())
        head.classifier.bias.copy_((-(w @ mean)).float())
    hf = HeadFile(
        task="segment",
        head={
            "kind": "upernet",
            "channels": 16,
            "num_classes": 3,
            "in_channels": list(enc.feature_channels),
            "in_strides": list(enc.feature_strides),
            "fusion": None,
        },
        head_state=head.state_dict(),
        encoder=encoder_record(enc),
        encoder_state=enc.state_dict(),
        classes=ClassTable.from_values([1, 2, 3]).to_dict(),
        chip_size=64,
    )
    return save_head(hf, path)


#: Logit units per spread of the head's features along their main directions (see
#: :func:`write_segment_head`).
CLASSIFIER_GAIN = 4.0


def read(path: Path) -> tuple[np.ndarray, dict]:
    """A raster's bands (float64 for comparisons, NaN where nodata) and what must match exactly."""
    with rasterio.open(path) as ds:
        data = ds.read(masked=True).astype(np.float64).filled(np.nan)
        facts = {
            "shape": (ds.count, ds.height, ds.width),
            "crs": ds.crs,
            "transform": ds.transform,
            "dtype": ds.dtypes[0],
            "descriptions": ds.descriptions,
        }
    return data, facts


def vector_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel cosine of two (channels, rows, cols) rasters over pixels valid in both."""
    ok = np.isfinite(a).all(0) & np.isfinite(b).all(0)
    va, vb = a[:, ok], b[:, ok]
    num = (va * vb).sum(0)
    den = np.linalg.norm(va, axis=0) * np.linalg.norm(vb, axis=0)
    return num / np.maximum(den, 1e-30)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||a|| over the pixels finite in both."""
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.linalg.norm(a[ok] - b[ok]) / max(np.linalg.norm(a[ok]), 1e-30))


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of equal values (class or change masks, nodata included)."""
    return float((a == b).mean())
