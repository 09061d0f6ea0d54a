"""The trained-head file (``head.pt``) of ``deo segment train`` and ``deo detect-change train``.

A head file is self-describing: everything ``segment predict`` / ``detect-change --head``
needs to rebuild the model and feed it the same input as in training. Saved with
``torch.save`` (plain values and tensors only; read back with ``weights_only=True``)::

    deo_format      "head-v1"
    task            "segment" | "change"
    head            {kind: upernet|linear, channels, num_classes, in_channels, in_strides,
                     fusion (change: diff|concat)}
    head_state      state dict of the head
    encoder         {model, model_kwargs, weights (URI or "random"), weights_sha256,
                     manifest, rgb_manifest, frozen, embedded}
    encoder_state   the encoder's state dict when ``embedded`` (random or fine-tuned encoders,
                    whose weights exist nowhere else), else None
    classes         ClassTable.to_dict(): [{value, name, color}], ignore, nodata
    chip_size       training chip size (px), the default prediction chip
    normalization   how training chips were normalised (stem ms|rgb, manifest, unit policy,
                    RGB scale rule); prediction feeds the same stem (:func:`head_input_stem`)
    threshold       change heads: P(change) threshold chosen on the validation chips
    metrics         best epoch, validation metrics, history
    recipe          the resolved training recipe (plain data)
    deo_version, created

An encoder that is not embedded is loaded again from ``weights`` and must have the recorded
SHA-256 (a different file is a :class:`~deo_cli.errors.WeightsError`: the head would see
features it was not trained on).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from deo_cli.errors import OutputExistsError, WeightsError

log = logging.getLogger(__name__)

HEAD_FORMAT = "head-v1"


def make_head(kind: str, in_channels, in_strides, num_classes: int, channels: int = 512) -> nn.Module:
    """A segmentation head: UPerNet with ``channels`` (512 in the paper, docs/method.md §3.1) or linear."""
    from deo_cli.models.upernet import UPerNetHead, build_seg_head

    if kind == "upernet":
        return UPerNetHead(list(in_channels), list(in_strides), num_classes, channels=int(channels))
    return build_seg_head(kind, list(in_channels), list(in_strides), num_classes)


@dataclass
class HeadFile:
    task: str
    head: dict
    head_state: dict
    encoder: dict
    encoder_state: dict | None = None
    classes: dict | None = None
    chip_size: int = 224
    normalization: dict = field(default_factory=dict)
    threshold: float | None = None
    metrics: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    deo_version: str = ""
    created: str = ""
    path: Path | None = None
    sha256: str | None = None

    def to_dict(self) -> dict:
        return {
            "deo_format": HEAD_FORMAT,
            "task": self.task,
            "head": self.head,
            "head_state": self.head_state,
            "encoder": self.encoder,
            "encoder_state": self.encoder_state,
            "classes": self.classes,
            "chip_size": int(self.chip_size),
            "normalization": self.normalization,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "recipe": self.recipe,
            "deo_version": self.deo_version,
            "created": self.created,
        }

    def describe(self) -> dict:
        """Provenance for output tags (no tensors)."""
        return {
            "task": self.task,
            "file": str(self.path) if self.path else None,
            "sha256": self.sha256,
            "kind": self.head.get("kind"),
            "fusion": self.head.get("fusion"),
            "num_classes": self.head.get("num_classes"),
            "chip_size": self.chip_size,
            "encoder": {k: v for k, v in self.encoder.items() if k not in ("manifest", "rgb_manifest")},
        }


def encoder_record(encoder, frozen: bool = True) -> dict:
    """What a head file says about its encoder (see the module docstring)."""
    from deo_cli.models import encoder_meta

    meta = encoder_meta(encoder)
    sha = getattr(encoder, "weights_sha256", None)
    return {
        "model": meta["model"],
        "model_kwargs": meta["model_kwargs"],
        "weights": getattr(encoder, "weights_uri", None) or "random",
        "weights_sha256": sha,
        "manifest": meta["manifest"],
        "rgb_manifest": meta["rgb_manifest"],
        "frozen": bool(frozen),
        "embedded": sha is None or not frozen,
    }


def save_head(head: HeadFile, path: str | os.PathLike) -> Path:
    """Write ``head`` atomically (temporary name, then rename)."""
    from deo_cli import __version__
    from deo_cli.models.weights import atomic_torch_save

    head.deo_version = head.deo_version or __version__
    head.created = head.created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return atomic_torch_save(head.to_dict(), path)


def load_head(path: str | os.PathLike, task: str | None = None) -> HeadFile:
    """Read a head file; ``task`` (``segment``/``change``) checks it is the right kind."""
    from deo_cli.models.weights import file_sha256, read_checkpoint

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"head file {path} not found", "pass the head.pt written by deo segment train")
    data = read_checkpoint(path)
    if data.get("deo_format") != HEAD_FORMAT:
        raise WeightsError(
            f"{path.name} is not a deo head file (no deo_format {HEAD_FORMAT!r})",
            "pass the head.pt written by deo segment train or deo detect-change train",
        )
    head = HeadFile(
        task=str(data["task"]),
        head=dict(data["head"]),
        head_state=dict(data["head_state"]),
        encoder=dict(data["encoder"]),
        encoder_state=data.get("encoder_state"),
        classes=data.get("classes"),
        chip_size=int(data.get("chip_size") or 224),
        normalization=dict(data.get("normalization") or {}),
        threshold=data.get("threshold"),
        metrics=dict(data.get("metrics") or {}),
        recipe=dict(data.get("recipe") or {}),
        deo_version=str(data.get("deo_version", "")),
        created=str(data.get("created", "")),
        path=path,
        sha256=file_sha256(path),
    )
    if task is not None and head.task != task:
        cmd = {"segment": "deo segment predict", "change": "deo detect-change --head"}[head.task]
        raise WeightsError(f"{path.name} is a {head.task} head, not a {task} head", f"use it with {cmd}")
    return head


def load_head_encoder(head: HeadFile, weights: str | None = None):
    """The encoder ``head`` was trained on, in eval mode.

    Embedded encoders come from the file; others from ``weights`` (default: the recorded URI)
    and must match the recorded SHA-256.
    """
    from deo_cli.models import build_encoder
    from deo_cli.models.weights import load_encoder_state
    from deo_cli.sensors import BandManifest

    rec = head.encoder
    name = rec["model"]
    kwargs = dict(rec.get("model_kwargs") or {})
    if head.encoder_state is not None:
        encoder = build_encoder(name, weights=None, **kwargs)
        load_encoder_state(
            encoder, head.encoder_state, source=f"head file {head.path.name if head.path else ''}"
        )
        encoder.weights_uri = f"{rec.get('weights')} (embedded in {head.path.name if head.path else 'head'})"
        encoder.weights_sha256 = rec.get("weights_sha256")
    else:
        uri = weights or rec.get("weights")
        encoder = build_encoder(name, weights=uri, **kwargs)
        want = rec.get("weights_sha256")
        if want and encoder.weights_sha256 != want:
            raise WeightsError(
                f"the head was trained on {name} weights with SHA-256 {want[:12]}..., but {uri} has "
                f"{(encoder.weights_sha256 or 'none')[:12]}...",
                "pass the encoder weights the head was trained with (--weights PATH)",
            )
    encoder.manifest = BandManifest.from_dict(rec["manifest"])
    if rec.get("rgb_manifest"):
        encoder.rgb_manifest = BandManifest.from_dict(rec["rgb_manifest"])
    return encoder.eval()


def head_manifests(head: HeadFile):
    """The band manifests of the head's encoder: (multispectral, RGB or None)."""
    from deo_cli.sensors import BandManifest

    rec = head.encoder
    rgb = rec.get("rgb_manifest")
    return BandManifest.from_dict(rec["manifest"]), (BandManifest.from_dict(rgb) if rgb else None)


def head_stem(head: HeadFile) -> str | None:
    """The stem the head was trained through (``"ms"`` or ``"rgb"``), or None when the file does
    not say (change heads of deo 0.x without a pixel branch)."""
    stem = head.normalization.get("stem")
    if stem in ("ms", "rgb"):
        return stem
    pixel_bands = int(head.head.get("pixel_bands") or 0)
    if pixel_bands:
        return "ms" if pixel_bands == len(head_manifests(head)[0].bands) else "rgb"
    return None


def head_input_stem(head: HeadFile, scene) -> str:
    """The stem ``scene`` goes through for ``head``: the one the head was trained on.

    A head sees features of one stem in training; the other stem's features are not what it
    learnt, so a scene without the head's bands is refused (:class:`BandError`) rather than sent
    through the other stem. A head trained on RGB takes the red, green and blue of a
    multispectral scene. Shared by ``segment predict`` and ``detect-change --head``; ``"auto"``
    when the file does not say.
    """
    from deo_cli.errors import BandError

    stem = head_stem(head)
    if stem is None:
        return "auto"
    ms, rgb = head_manifests(head)
    man = ms if stem == "ms" or rgb is None else rgb
    try:
        scene.select(man.bands)
    except BandError as e:
        names = [s.name or f"band {i + 1} (unnamed)" for i, s in enumerate(scene.sources)]
        missing = [b for b in man.bands if b not in names]
        what = f"{len(man.bands)} multispectral bands" if stem == "ms" else "red, green and blue"
        fix = (
            "give a scene with those bands (--band-names names unnamed ones), or train a head on "
            "RGB images for RGB scenes"
            if stem == "ms"
            else "give a scene with red, green and blue bands (--band-names names unnamed ones)"
        )
        raise BandError(
            f"the {head.task} head {head.path.name if head.path else ''} was trained on {what} "
            f"({', '.join(man.bands)}), but scene {scene.name} lacks {', '.join(missing) or 'some'} "
            f"(it has {', '.join(names)})",
            fix,
        ) from e
    return stem


def build_head_module(head: HeadFile) -> nn.Module:
    h = head.head
    module = make_head(
        h["kind"], h["in_channels"], h["in_strides"], int(h["num_classes"]), int(h.get("channels", 512))
    )
    try:
        module.load_state_dict(head.head_state)
    except RuntimeError as e:
        raise WeightsError(
            f"head state in {head.path.name if head.path else 'the head file'} does not fit a {h['kind']} head "
            f"({str(e).splitlines()[0]})",
            "the file is damaged or from another deo version; train the head again",
        ) from e
    return module.eval()


def trainable_to_head_file(state: dict, frozen: bool) -> tuple[dict, dict | None]:
    """Split a ``FrozenEncoderSegmenter.trainable_state_dict`` into (head state, encoder state)."""
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return head, (enc if (enc and not frozen) else None)


def encoder_state_for(encoder, record: dict, finetuned_state: dict | None) -> dict | None:
    """The encoder state to embed: the fine-tuned state, or a random encoder's own weights."""
    if finetuned_state is not None:
        return finetuned_state
    if record.get("embedded"):
        return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    return None


def check_run_folder(out: str | os.PathLike, overwrite: bool) -> Path:
    """A training run folder may be written: absent, empty, or ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not a folder", "give a folder name for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output folder {out} is not empty", "pass --overwrite to replace it, or choose another --out"
        )
    return out


def _json_default(v):
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    return str(v)


def _finite(value):
    """NaN/inf -> None, recursively (metrics.json stays strict JSON)."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_run_folder(out: Path, overwrite: bool, head: HeadFile, metrics: dict, recipe, command: str) -> Path:
    """``head.pt``, ``metrics.json`` and ``recipe.yaml`` into a temporary folder beside ``out``,
    then renamed into place (a failed run leaves nothing at ``out``). Returns the head path."""
    from deo_cli.io.atomic import commit, temp_path_for
    from deo_cli.recipes import save_recipe

    out = Path(out)
    tmp = temp_path_for(out, "partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_recipe(recipe, tmp / "recipe.yaml", command)
        save_head(head, tmp / "head.pt")
        text = json.dumps(_finite(metrics), indent=1, default=_json_default)
        (tmp / "metrics.json").write_text(text)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        commit(tmp, out, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "head.pt"


__all__ = [
    "HEAD_FORMAT",
    "HeadFile",
    "build_head_module",
    "check_run_folder",
    "encoder_record",
    "encoder_state_for",
    "head_input_stem",
    "head_manifests",
    "head_stem",
    "load_head",
    "load_head_encoder",
    "make_head",
    "save_head",
    "trainable_to_head_file",
    "write_run_folder",
]
