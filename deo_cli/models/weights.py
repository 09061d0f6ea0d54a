"""Finding, reading, checking and writing encoder weights.

``--weights`` accepts (docs/design.md §2, issue 4):

- a local file;
- ``hf://OWNER/REPO/PATH/FILE[@REVISION]``: downloaded once with ``huggingface_hub`` into the
  standard Hugging Face cache (and found there later without a network);
- an ``https://`` URL: downloaded once into torch hub's cache (``$TORCH_HOME/hub/checkpoints``);
- ``random``: a fresh initialisation, with a warning (for tests and benchmarks).

A ``?student`` or ``?teacher`` suffix picks one of the two encoders in a pretraining checkpoint.

Files deo reads (:func:`read_encoder_weights`):

- **The official release** (``DEO_swin_b.pth``, docs/method.md §2.13): a state dict whose keys carry
  ``feat_extr.`` (and possibly ``student``/``module.``/``backbone.``/``_orig_mod.``) prefixes,
  either at the top level or under a ``student`` key (the official training script saves
  ``{"student": ..., "teacher": ..., "args": Namespace, ...}``). Prefix stripping alone maps it
  onto :class:`~deo_cli.models.swin.DeoSwin`, built with the window, width and depths its
  tensors show (:func:`deo_cli.models.build.fit_swin_to_checkpoint`: the official code builds
  torchvision's ``swin_b()``, window 7, while its README says window 12).
- **deo's encoder export** (``deo_format: "encoder-v1"``, written by :func:`save_encoder`)::

      {"deo_format": "encoder-v1", "model": name, "model_kwargs": {...}, "state_dict": {...},
       "manifest": BandManifest.to_dict(), "rgb_manifest": {...}, "deo_version": "...",
       "recipe": {...} (optional), ...}

- **deo's pretraining checkpoints** (``deo_format: "pretrain-v1"``): the same identity fields
  (:func:`encoder_meta`) plus ``student_encoder`` and ``teacher_encoder`` state dicts. The EMA
  teacher is used by default (it is the better encoder in DINO-style training); it has no RGB
  stem (docs/method.md §2.6), so the RGB stem comes from the student.
- A plain state dict, or one under a ``state_dict`` / ``model`` key.

Every file is loaded with ``torch.load(weights_only=True)`` (or safetensors) and checked key by
key and shape by shape before it touches the model; truncated, foreign or mismatched files raise
one :class:`~deo_cli.errors.WeightsError` line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from deo_cli.errors import WeightsError

log = logging.getLogger(__name__)

ENCODER_FORMAT = "encoder-v1"
PRETRAIN_FORMAT = "pretrain-v1"

#: Prefixes the official checkpoints may carry (docs/method.md §2.13), stripped in any order.
OFFICIAL_PREFIXES = ("_orig_mod.", "module.", "student.", "backbone.")
OFFICIAL_MODULE = "feat_extr."

_WEIGHTS_FIX = "pass a local file with --weights PATH (or --weights random for a smoke test)"


# ---------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------


def split_selector(uri: str) -> tuple[str, str | None]:
    """``"ckpt.pt?student"`` -> ``("ckpt.pt", "student")``; no suffix -> ``(uri, None)``."""
    for which in ("student", "teacher"):
        suffix = "?" + which
        if uri.endswith(suffix):
            return uri[: -len(suffix)], which
    return uri, None


@dataclass(frozen=True)
class HfRef:
    """A file in a Hugging Face repository: ``hf://repo_id/filename@revision``."""

    repo_id: str
    filename: str
    revision: str | None = None

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision or 'main'}/{self.filename}"


def parse_hf_uri(uri: str) -> HfRef:
    """Parse ``hf://OWNER/REPO/PATH/FILE[@REVISION]``."""
    if not uri.startswith("hf://"):
        raise ValueError(f"not an hf:// URI: {uri!r}")
    body = uri[len("hf://") :]
    revision = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not revision or "/" in revision:
            revision = None
            body = uri[len("hf://") :]
    parts = [p for p in body.split("/") if p]
    if len(parts) < 3:
        raise WeightsError(
            f"weights URI {uri!r} does not name a file in a repository",
            "write it as hf://OWNER/REPO/FILE or hf://OWNER/REPO/FILE@REVISION",
        )
    return HfRef(f"{parts[0]}/{parts[1]}", "/".join(parts[2:]), revision)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "could not fetch" (the HTTP client varies by version)."""
    errors: list[type[BaseException]] = [OSError, ValueError, TimeoutError]
    try:
        from huggingface_hub import errors as hf_errors

        errors += [hf_errors.EntryNotFoundError, hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError]
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a download from ``host`` can possibly work: ``HF_HUB_OFFLINE`` unset and the host
    answers on port 443 within ``timeout`` (skipped, i.e. True, when a proxy is configured).

    Without this probe an offline machine waits through the hub client's retries (~25 s of
    back-off) before the clear error.
    """
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _download_hf(uri: str) -> Path:
    ref = parse_hf_uri(uri)
    import huggingface_hub

    try:  # the local cache first: no network needed for a file fetched before
        return Path(
            huggingface_hub.hf_hub_download(
                ref.repo_id, ref.filename, revision=ref.revision, local_files_only=True
            )
        )
    except _network_errors():
        pass
    try:
        if not hub_reachable():
            raise OSError("huggingface.co is not reachable from this machine")
        path = huggingface_hub.hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision)
    except _network_errors() as exc:
        at = f" at revision {ref.revision[:12]}" if ref.revision else ""
        raise WeightsError(
            f"cannot get {Path(ref.filename).name} from Hugging Face ({ref.repo_id}{at}; offline or "
            f"unreachable? {_first_line(exc)})",
            f"on a machine with internet fetch {ref.url} and pass the file with --weights PATH",
        ) from exc
    return Path(path)


def _download_url(url: str) -> Path:
    name = Path(urlparse(url).path).name
    if not name:
        raise WeightsError(f"weights URL {url!r} names no file", "give the URL of the checkpoint file")
    dst = Path(torch.hub.get_dir()) / "checkpoints" / name
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        host = urlparse(url).hostname or ""
        if not hub_reachable(host):
            raise OSError(f"{host} is not reachable from this machine")
        torch.hub.download_url_to_file(url, str(dst), progress=False)
    except _network_errors() as exc:
        raise WeightsError(
            f"cannot download {name} from {url} (offline or unreachable? {_first_line(exc)})",
            f"on a machine with internet fetch {url} and pass the file with --weights PATH",
        ) from exc
    return dst


def resolve_weights(uri: str | os.PathLike) -> Path:
    """A local path for a weights URI: a file, ``hf://REPO/FILE[@REV]`` or an https URL.

    Downloads happen once into the standard caches; offline, an uncached download raises one
    :class:`WeightsError` that names the file to fetch and the ``--weights`` option.
    """
    text = str(uri)
    if text.startswith("hf://"):
        return _download_hf(text)
    if text.startswith(("https://", "http://")):
        return _download_url(text)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise WeightsError(f"weights path {text} is a folder", "pass the checkpoint file inside it")
    raise WeightsError(
        f"weights file {text} not found",
        "pass an existing file, hf://OWNER/REPO/FILE[@REV], an https URL, 'default' or 'random' to --weights",
    )


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (for provenance tags)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _allowed_globals(extra: list):
    """Allow ``extra`` in ``weights_only`` loads for the block, then put torch's allow-list back
    exactly as it was: ``torch.serialization.safe_globals`` removes its entries on exit even
    when the caller had added them with ``add_safe_globals`` before."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(list(extra))
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint file safely (tensors and plain Python values only).

    Raises :class:`WeightsError` for unreadable, truncated or non-PyTorch files.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(
                f"cannot read weights file {path.name}: truncated or not a safetensors file ({_first_line(exc)})",
                "download it again or pass another file with --weights",
            ) from exc
    try:
        # DINO-style checkpoints store their argparse arguments; those are harmless.
        with _allowed_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise WeightsError(
                f"weights file {path.name} holds Python objects other than tensors, which deo does not load",
                "if you trust the file, re-save only its state dict with torch.save(state_dict, 'weights.pth')",
            ) from exc
        raise WeightsError(
            f"cannot read weights file {path.name}: not a PyTorch checkpoint ({_first_line(exc)})",
            "pass a .pth/.pt file written by torch.save, deo pretrain or deo export",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes fail in arbitrary ways inside the unpickler
        # (RuntimeError for a cut zip, EOFError, IndexError/KeyError for garbage...): all mean "unreadable".
        raise WeightsError(
            f"cannot read weights file {path.name}: truncated or not a PyTorch checkpoint ({_first_line(exc)})",
            "download it again or pass another file with --weights",
        ) from exc
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"weights file {path.name} holds a {type(obj).__name__}, not a checkpoint dictionary",
            "pass a file written by deo or the official DEO_swin_b.pth",
        )
    return dict(obj)


@dataclass
class LoadedWeights:
    """An encoder state dict read from a file, with what the file says about it."""

    state_dict: dict[str, Tensor]
    format: str  # "encoder-v1", "pretrain-v1", "official" or "state_dict"
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    manifest: dict | None = None
    rgb_manifest: dict | None = None
    which: str | None = None
    meta: dict = field(default_factory=dict)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _strip_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip the official prefixes, then keep what sat under ``feat_extr.`` (docs/method.md §2.13)."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in OFFICIAL_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    if any(k.startswith(OFFICIAL_MODULE) for k in out):
        out = {k[len(OFFICIAL_MODULE) :]: v for k, v in out.items() if k.startswith(OFFICIAL_MODULE)}
    return out


def _has_tensor(obj) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    return False


def _unwrap_deo(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Tolerate wrapped encoders in deo checkpoints: drop ``module.`` / ``_orig_mod.`` (DDP,
    torch.compile) and, for a whole teacher/student module, keep what sits under ``encoder.``."""
    out = {}
    for key, value in sd.items():
        for token in ("module.", "_orig_mod."):
            key = key.replace(token, "")
        out[key] = value
    if any(k.startswith("encoder.") for k in out):
        out = {k[len("encoder.") :]: v for k, v in out.items() if k.startswith("encoder.")}
    return out


def _rgb_prefixes() -> tuple[str, ...]:
    from deo_cli.models.swin import DeoSwin
    from deo_cli.models.vit import DeoViT

    return (DeoSwin.rgb_stem_name + ".", DeoViT.rgb_stem_name + ".")


def _teacher_with_student_rgb(teacher: dict, student: Mapping | None) -> dict:
    """The EMA teacher has no RGB stem (docs/method.md §2.6): borrow the student's."""
    prefixes = _rgb_prefixes()
    if student is None or any(k.startswith(prefixes) for k in teacher):
        return teacher
    borrowed = {k: v for k, v in student.items() if k.startswith(prefixes)}
    if borrowed:
        log.info("the EMA teacher has no RGB stem; using the student's (%d tensors)", len(borrowed))
    return {**teacher, **borrowed}


def read_encoder_weights(path: str | os.PathLike, which: str | None = None) -> LoadedWeights:
    """Read any weights file deo understands (module docstring) into an encoder state dict.

    ``which`` picks ``"teacher"`` or ``"student"`` from a checkpoint holding both; the default is
    the EMA teacher for deo checkpoints and the student for the official layout (docs/method.md §2.13).
    """
    path = Path(path)
    if which not in (None, "teacher", "student"):
        raise WeightsError(f"unknown encoder choice {which!r}", "use ?teacher or ?student")
    ckpt = read_checkpoint(path)
    fmt = ckpt.get("deo_format")
    if fmt is not None:
        ident = dict(
            model=ckpt.get("model"),
            model_kwargs=dict(ckpt.get("model_kwargs") or {}),
            manifest=ckpt.get("manifest"),
            rgb_manifest=ckpt.get("rgb_manifest"),
        )
        # Small fields only (recipe, epoch, version); optimiser states stay behind.
        meta = {k: v for k, v in ckpt.items() if k not in ident and not _has_tensor(v)}
        if fmt == ENCODER_FORMAT:
            if not _is_state_dict(ckpt.get("state_dict")):
                raise WeightsError(f"{path.name} ({fmt}) has no 'state_dict'", "export the encoder again")
            return LoadedWeights(_unwrap_deo(ckpt["state_dict"]), fmt, **ident, meta=meta)
        if fmt == PRETRAIN_FORMAT:
            which = which or "teacher"
            key = f"{which}_encoder"
            if not _is_state_dict(ckpt.get(key)):
                other = "student" if which == "teacher" else "teacher"
                raise WeightsError(
                    f"pretraining checkpoint {path.name} has no '{key}'",
                    f"pick the other encoder with ?{other}",
                )
            sd = _unwrap_deo(ckpt[key])
            if which == "teacher":
                student = ckpt.get("student_encoder")
                sd = _teacher_with_student_rgb(sd, _unwrap_deo(student) if _is_state_dict(student) else None)
            return LoadedWeights(sd, fmt, **ident, which=which, meta=meta)
        raise WeightsError(
            f"{path.name} has deo format {fmt!r}, which this deo does not know",
            "upgrade deo or export the encoder again with this version",
        )
    # The official layout or a plain state dict.
    which_key = which or "student"
    for key in (which_key, "state_dict", "model"):
        if _is_state_dict(ckpt.get(key)):
            sd = dict(ckpt[key])
            if key == "teacher":
                sd = _teacher_with_student_rgb(
                    _strip_official(sd), _strip_official(ckpt.get("student") or {})
                )
                return LoadedWeights(sd, "official", which="teacher")
            return LoadedWeights(
                _strip_official(sd), "official", which="student" if key == "student" else None
            )
    if _is_state_dict(ckpt):
        stripped = _strip_official(ckpt)
        fmt = (
            "official"
            if len(stripped) != len(ckpt) or any(OFFICIAL_MODULE in k for k in ckpt)
            else "state_dict"
        )
        return LoadedWeights(stripped, fmt)
    keys = ", ".join(repr(k) for k in list(ckpt)[:4])
    raise WeightsError(
        f"{path.name} holds no encoder weights (top-level keys: {keys})",
        "pass a file written by deo pretrain/export or the official DEO_swin_b.pth",
    )


def load_encoder_state(
    encoder: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str = "the file",
    *,
    model_name: str | None = None,
    option: str = "--model",
) -> None:
    """Copy ``state_dict`` into ``encoder`` after checking every key and shape.

    Missing parameters, shape mismatches and files that share no key with the model raise one
    :class:`WeightsError` line naming the first offending key and the model. Extra keys in the
    file (heads, classifier) are ignored and logged. ``model_name`` and ``option`` word the
    messages (defaults: the encoder's name and ``--model``).
    """
    name = model_name or getattr(encoder, "name", type(encoder).__name__)
    own = encoder.state_dict()
    params = {k for k, _ in encoder.named_parameters()}
    common = [k for k in own if k in state_dict]
    if not common:
        first = next(iter(state_dict), None)
        raise WeightsError(
            f"{source} holds no {name} weights (none of its {len(state_dict)} keys, e.g. {first!r}, is a "
            f"{name} key such as {next(iter(own))!r})",
            f"pass a file written for {name}, or check {option}",
        )
    for key in common:
        want, got = tuple(own[key].shape), tuple(state_dict[key].shape)
        if want != got:
            raise WeightsError(
                f"{source} does not fit {name}: {key} has shape {got} in the file but {want} in the model",
                f"check that {option} matches the checkpoint (width, window size, bands)",
            )
    missing = [k for k in own if k in params and k not in state_dict]
    if missing:
        raise WeightsError(
            f"{source} lacks {len(missing)} of {name}'s weights (first: {missing[0]})",
            f"pass a complete checkpoint, or check that {option} matches it",
        )
    extra = [k for k in state_dict if k not in own]
    if extra:
        log.info("%s: ignoring %d keys not in %s (first: %s)", source, len(extra), name, extra[0])
    encoder.load_state_dict({k: state_dict[k] for k in common}, strict=False)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def encoder_meta(encoder: nn.Module) -> dict:
    """The identity fields every deo checkpoint carries: model name, kwargs, manifests, version."""
    from deo_cli import __version__

    spec = getattr(encoder, "spec", None)
    if spec is None:
        raise ValueError("encoder has no spec; build it with deo_cli.models.build_encoder")
    return {
        "model": spec.name,
        "model_kwargs": dict(encoder.model_kwargs),
        "manifest": encoder.manifest.to_dict(),
        "rgb_manifest": encoder.rgb_manifest.to_dict(),
        "deo_version": __version__,
    }


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary name beside ``path``, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_encoder(encoder: nn.Module, path: str | os.PathLike, **meta) -> Path:
    """Write ``encoder`` in deo's ``encoder-v1`` format (atomically); ``meta`` adds fields
    such as ``recipe=`` (a plain dict) or ``source_checkpoint=``."""
    body = {"deo_format": ENCODER_FORMAT, **encoder_meta(encoder)}
    clash = set(meta) & (set(body) | {"state_dict"})
    if clash:
        raise ValueError(f"save_encoder: meta keys {sorted(clash)} are reserved")
    body["state_dict"] = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    body.update(meta)
    return atomic_torch_save(body, path)


def load_encoder(weights: str | os.PathLike, *, which: str | None = None, **overrides) -> nn.Module:
    """:func:`deo_cli.models.build.load_encoder`, importable beside the other weight helpers."""
    from deo_cli.models.build import load_encoder as _load_encoder

    return _load_encoder(weights, which=which, **overrides)
