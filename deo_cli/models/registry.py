"""The explicit registry of named DEO encoders.

Every encoder is one builder function with plain keyword arguments, registered with its
:class:`ModelSpec` (what callers need to know *before* building it: band manifests, feature
channels and strides, default chip size, default weights)::

    @register_model("deo_swin_b", family="swin", feature_channels=(128, 256, 512, 1024), ...)
    def deo_swin_b(**kwargs) -> DeoSwin:
        return DeoSwin(embed_dim=128, ...)

:func:`get_model_spec` looks a name up (unknown names raise :class:`~deo_cli.errors.UsageError`
with a did-you-mean); :func:`deo_cli.models.build_encoder` builds one and loads its weights.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from deo_cli.errors import UsageError
from deo_cli.sensors import DEO_RGB_MANIFEST, DEO_S2_MANIFEST, BandManifest

#: The official DEO Swin-B release (Hugging Face ``SolaireTheSun/DEO``), pinned to the revision
#: that TorchGeo 0.10's ``DEO_Weights.DEO_SWIN`` uses (docs/design.md §2, docs/method.md §1).
DEO_SWIN_B_WEIGHTS = "hf://SolaireTheSun/DEO/DEO_swin_b.pth@f973d29f6324fb12fca734778cf9d2ae539524bb"


@dataclass(frozen=True)
class ModelSpec:
    """What a named encoder is, known without building it.

    ``feature_channels`` and ``feature_strides`` describe the maps that ``forward`` returns, one
    per level; ``default_layer`` is the level used when a caller asks for "the" feature map
    (the last one: the most semantic, and the one the pooled vector comes from);
    ``distill_levels`` are the (mid, late) levels that DEO's patch distillation uses
    (docs/method.md §2.7: Swin stages 3 and 4; ViT blocks 6 and 12). ``input_size`` is the default
    chip size in pixels (square). ``pooled_dim`` is the width of ``forward_pooled``.
    """

    name: str
    family: str
    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]
    pooled_dim: int
    input_size: int = 224
    default_layer: int = -1
    distill_levels: tuple[int, int] = (2, 3)
    default_weights: str | None = None
    manifest: BandManifest = DEO_S2_MANIFEST
    rgb_manifest: BandManifest = DEO_RGB_MANIFEST
    description: str = ""
    test_only: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.family not in ("swin", "vit"):
            raise ValueError(f"model {self.name}: unknown family {self.family!r}")
        if len(self.feature_channels) != len(self.feature_strides):
            raise ValueError(f"model {self.name}: feature_channels and feature_strides differ in length")
        n = len(self.feature_channels)
        if not -n <= self.default_layer < n:
            raise ValueError(f"model {self.name}: default_layer {self.default_layer} out of range")
        object.__setattr__(self, "default_layer", self.default_layer % n)

    @property
    def num_levels(self) -> int:
        return len(self.feature_channels)

    @property
    def activation_bytes_per_pixel(self) -> float:
        """Float32 bytes of the finest feature map per input pixel (Swin: stage 1, C/16 per
        pixel), a measure of how much memory the forward pass of one chip takes; the CPU
        runner sizes its micro-batches by it (:func:`deo_cli.infer.runner.default_micro_batch`)."""
        return 4.0 * self.feature_channels[0] / self.feature_strides[0] ** 2


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    builder: Callable


_MODELS: dict[str, _Entry] = {}


def register_model(name: str, **spec_fields) -> Callable[[Callable], Callable]:
    """Register a builder function under ``name`` with the :class:`ModelSpec` fields given."""

    def decorator(fn: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = _Entry(ModelSpec(name=name, **spec_fields), fn)
        return fn

    return decorator


def _ensure_registered() -> None:
    # The model modules register themselves on import.
    from deo_cli.models import swin, vit  # noqa: F401


def _lookup(name: str) -> _Entry:
    _ensure_registered()
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(
            f"unknown model {name!r}{hint}",
            f"choose one of {', '.join(list_models())}",
        ) from None


def get_model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered model; unknown names raise ``UsageError``."""
    return _lookup(name).spec


def get_model_builder(name: str) -> Callable:
    """The registered builder function (plain keyword arguments, returns an encoder)."""
    return _lookup(name).builder


def list_models(include_test: bool = True) -> list[str]:
    """Registered model names, sorted; ``include_test=False`` hides the tiny test sizes."""
    _ensure_registered()
    return sorted(n for n, e in _MODELS.items() if include_test or not e.spec.test_only)
