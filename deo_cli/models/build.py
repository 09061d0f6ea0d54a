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
from deo_cli.models.registry import ModelSpec, get_model_builder, get_model_spec
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


def _from_loaded(name: str, loaded: LoadedWeights, path: Path, uri: str, overrides: dict) -> DeoEncoder:
    spec = get_model_spec(name)
    if loaded.model is not None and loaded.model != name:
        raise WeightsError(
            f"{path.name} holds a {loaded.model} encoder, not {name}",
            f"use --model {loaded.model}",
        )
    encoder = _instantiate(spec, {**loaded.model_kwargs, **overrides})
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
    """Build whatever encoder a weights file holds (deo checkpoints name their model; an
    official-layout file is taken to be ``deo_swin_b``)."""
    uri, selector = split_selector(str(weights))
    path = resolve_weights(uri)
    loaded = read_encoder_weights(path, which=selector or which)
    name = loaded.model or OFFICIAL_MODEL
    return _from_loaded(name, loaded, path, str(weights), overrides)
