"""The one entry point for encoders: :func:`build_encoder` (and :func:`load_encoder`).

``build_encoder("deo_swin_b")`` gives the official DEO Swin-B (downloaded once into the Hugging
Face cache); ``build_encoder("deo_swin_t", weights="runs/deo-t/checkpoint.pt")`` loads a deo
pretraining checkpoint (its EMA teacher); ``weights="random"`` gives a random encoder with a
warning, ``weights=None`` one without (the student at the start of pretraining).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from deo_cli.errors import WeightsError
from deo_cli.models.encoder import DeoEncoder
from deo_cli.models.registry import ModelSpec, get_model_builder, get_model_spec, list_models
from deo_cli.models.weights import (
    LoadedWeights,
    file_sha256,
    load_encoder_state,
    read_encoder_weights,
    resolve_weights,
    split_selector,
)
from deo_cli.sensors import BandManifest

log = logging.getLogger(__name__)

#: The model an official-layout file (no deo header) is taken to hold.
OFFICIAL_MODEL = "deo_swin_b"


def _instantiate(spec: ModelSpec, kwargs: dict) -> DeoEncoder:
    encoder = get_model_builder(spec.name)(**kwargs)
    encoder.model_kwargs = dict(kwargs)
    encoder.spec = dataclasses.replace(
        spec,
        feature_channels=encoder.feature_channels,
        feature_strides=encoder.feature_strides,
        pooled_dim=encoder.pooled_dim,
    )
    encoder.manifest = spec.manifest
    encoder.rgb_manifest = spec.rgb_manifest
    if encoder.manifest.num_bands != encoder.in_chans:
        raise ValueError(
            f"{spec.name}: manifest has {encoder.manifest.num_bands} bands, stem {encoder.in_chans}"
        )
    return encoder


def _swin_shape_of(name: str, kwargs: dict):
    """The :class:`~deo_cli.models.swin.SwinShape` that ``name(**kwargs)`` builds (on the meta
    device: no memory, no initialisation cost)."""
    import torch

    from deo_cli.models.swin import swin_shape

    with torch.device("meta"):
        encoder = get_model_builder(name)(**kwargs)
    return swin_shape(encoder.state_dict())


def fit_swin_to_checkpoint(
    name: str, state_dict, kwargs: dict, source: str = "the file", *, implied: bool = False
) -> tuple[str, dict]:
    """The model name and builder kwargs that build the Swin whose tensors ``state_dict`` holds.

    The official DEO code builds torchvision's ``swin_b()`` (window 7) while its README says
    the release uses window 12, so the window is read from the checkpoint's own tensors
    (:func:`~deo_cli.models.swin.swin_shape`) and the network is built with it, logged at INFO,
    unless ``kwargs`` name a window (a deo checkpoint's stored kwargs or the caller's): then a
    different window is one :class:`WeightsError` line. Width, depths, heads and MLP ratio
    decide the tensors' names and widths: a checkpoint of another size is refused naming both
    shapes and the registered model that fits, or, when the model was only ``implied`` (a file
    without a deo header, :func:`load_encoder`), that model is used. Non-Swin models and
    state dicts without Swin blocks are returned unchanged (the key check reports them).
    """
    from deo_cli.models.swin import swin_shape

    if get_model_spec(name).family != "swin":
        return name, kwargs
    try:
        found = swin_shape(state_dict)
    except ValueError as exc:
        raise WeightsError(
            f"{source} holds no Swin deo can build ({exc})",
            "pass a checkpoint of a torchvision-style Swin such as the official DEO_swin_b.pth",
        ) from exc
    if found is None:
        return name, kwargs
    log.info("checkpoint %s: %s", source, found.describe())
    wanted = _swin_shape_of(name, kwargs)
    if found.size != wanted.size:
        fits = [
            n
            for n in sorted(list_models(), key=lambda n: (get_model_spec(n).test_only, n))
            if get_model_spec(n).family == "swin" and _swin_shape_of(n, {}).size == found.size
        ]
        if implied and fits and _swin_shape_of(fits[0], kwargs).size == found.size:
            log.info("%s is not %s (%s): building %s", source, name, wanted.describe(), fits[0])
            name, wanted = fits[0], _swin_shape_of(fits[0], kwargs)
        elif implied and not fits:
            raise WeightsError(
                f"{source} holds a {found.describe()}, which no deo model has",
                "pass the weights of one of deo's Swin models ("
                + ", ".join(n for n in list_models(include_test=False) if get_model_spec(n).family == "swin")
                + "), e.g. the official DEO_swin_b.pth",
            )
        else:
            raise WeightsError(
                f"{source} holds a {found.describe()}, which --model {name} ({wanted.describe()}) cannot load",
                f"use --model {fits[0]}" if fits else f"pass weights written for {name}",
            )
    if found.window_size != wanted.window_size:
        if "window_size" in kwargs:
            raise WeightsError(
                f"{source} holds a Swin with window {found.window_size}, but {name} was asked for "
                f"window {kwargs['window_size']}",
                "drop the window_size setting (deo reads the window from the checkpoint)",
            )
        log.info(
            "building %s with the checkpoint's window %d (its default is %d)",
            name,
            found.window_size,
            wanted.window_size,
        )
        kwargs = {**kwargs, "window_size": found.window_size}
    return name, kwargs


def _from_loaded(
    name: str, loaded: LoadedWeights, path: Path, uri: str, overrides: dict, *, implied: bool = False
) -> DeoEncoder:
    if loaded.model is not None and loaded.model != name:
        raise WeightsError(
            f"{path.name} holds a {loaded.model} encoder, not {name}",
            f"use --model {loaded.model}",
        )
    name, kwargs = fit_swin_to_checkpoint(
        name, loaded.state_dict, {**loaded.model_kwargs, **overrides}, path.name, implied=implied
    )
    spec = get_model_spec(name)
    encoder = _instantiate(spec, kwargs)
    load_encoder_state(encoder, loaded.state_dict, source=path.name)
    if loaded.manifest is not None:
        encoder.manifest = BandManifest.from_dict(loaded.manifest)
    if loaded.rgb_manifest is not None:
        encoder.rgb_manifest = BandManifest.from_dict(loaded.rgb_manifest)
    encoder.weights_uri = uri
    encoder.weights_sha256 = file_sha256(path)
    log.info(
        "loaded %s weights from %s (%s%s)",
        name,
        uri,
        loaded.format,
        f", {loaded.which}" if loaded.which else "",
    )
    return encoder.eval()


def build_encoder(
    name: str,
    weights: str | os.PathLike | None = "default",
    *,
    which: str | None = None,
    **overrides,
) -> DeoEncoder:
    """Build the registered encoder ``name`` and load its weights; returned in eval mode.

    Args:
        name: a registered model (:func:`~deo_cli.models.list_models`).
        weights: ``"default"`` (the model's released weights; a ``WeightsError`` for models
            without any), ``"random"`` (random init, logs a warning), ``None`` (random init,
            silently: the start of pretraining), a local file, ``hf://OWNER/REPO/FILE[@REV]`` or
            an https URL. A ``?student`` / ``?teacher`` suffix picks from a pretraining checkpoint.
        which: ``"teacher"`` / ``"student"``, as the suffix (the suffix wins when both are given).
        **overrides: builder keyword arguments (e.g. ``drop_path_rate=0.0``); they win over the
            ``model_kwargs`` stored in a deo checkpoint.

    The encoder carries ``spec``, ``manifest``, ``rgb_manifest``, ``model_kwargs``,
    ``weights_uri`` and ``weights_sha256`` (``None`` for random weights).
    """
    spec = get_model_spec(name)
    if weights is not None and str(weights) == "default":
        if spec.default_weights is None:
            raise WeightsError(
                f"{name} has no released weights",
                "pass a checkpoint from deo pretrain with --weights PATH, or --weights random for a smoke test",
            )
        weights = spec.default_weights
    if weights is None or str(weights) == "random":
        if weights is not None:
            log.warning("%s has random weights: its features are meaningless (use for tests only)", name)
        return _instantiate(spec, dict(overrides)).eval()
    uri, selector = split_selector(str(weights))
    path = resolve_weights(uri)
    loaded = read_encoder_weights(path, which=selector or which)
    return _from_loaded(name, loaded, path, str(weights), overrides)


def load_encoder(weights: str | os.PathLike, *, which: str | None = None, **overrides) -> DeoEncoder:
    """Build whatever encoder a weights file holds (deo checkpoints name their model; a file
    without a deo header is taken to be ``deo_swin_b``, or the registered Swin its tensors fit,
    with the window they show)."""
    uri, selector = split_selector(str(weights))
    path = resolve_weights(uri)
    loaded = read_encoder_weights(path, which=selector or which)
    name = loaded.model or OFFICIAL_MODEL
    return _from_loaded(name, loaded, path, str(weights), overrides, implied=loaded.model is None)
