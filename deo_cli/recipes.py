"""Recipes: typed, strict run configurations resolved once and saved beside every output.

A recipe is a tree of dataclasses (the *schema*: every key with its type and default). A run
resolves it once, with this precedence (later wins)::

    schema defaults  <  YAML file (--recipe)  <  repeated --set a.b=value  <  explicit CLI flags

Unknown keys are errors with a did-you-mean; values are checked against the schema types.
A YAML file may start from another with ``extends: other.yaml`` (path relative to the file).
The resolved recipe is written next to the outputs with :func:`save_recipe` (and can be fed
back with ``--recipe`` to reproduce the run); :func:`recipe_hash` stamps it into output tags.

Only builders read recipe fields; constructors of models, losses and datasets take plain
arguments (docs/design.md §7.4, habit 4).

The command schemas live at the bottom of this module, one section per command.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from deo_cli.errors import RecipeError
from deo_cli.io.atomic import write_text_atomic

T = TypeVar("T")

#: Folder of the recipes that ship with deo (``recipes/`` at the repository root).
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


# ---------------------------------------------------------------------------------------------
# Mechanism
# ---------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, tuple, Sequence):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _bad(key: str, tp: Any, value: Any) -> RecipeError:
    return RecipeError(
        f"recipe key {key!r} expects {_type_name(tp)}, got {value!r}",
        f"fix it in the recipe file or pass --set {key}=VALUE",
    )


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check/convert ``value`` to the schema type ``tp`` (``key`` is only for messages)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
            raise _bad(key, tp, value)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, a, value)
            except RecipeError as e:  # try the next member of the union
                errors.append(e)
        raise _bad(key, tp, value)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):
            low = {str(c).lower(): c for c in choices}
            if value.lower() in low:
                return low[value.lower()]
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise RecipeError(
            f"recipe key {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}",
            f"did you mean {close[0]!r}?" if close else "choose one of those values",
        )
    if origin in (list, tuple):
        args = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _bad(key, tp, value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise RecipeError(
                    f"recipe key {key!r} expects {len(args)} values, got {len(value)} ({value!r})",
                    f"pass exactly {len(args)} values, e.g. --set {key}=[{', '.join('...' for _ in args)}]",
                )
            return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, tp, value)
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _bad(key, tp, value)
        return _build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _bad(key, tp, value)
    if tp is int:
        if isinstance(value, bool):
            raise _bad(key, tp, value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise _bad(key, tp, value) from None
            if f.is_integer():
                return int(f)
        raise _bad(key, tp, value)
    if tp is float:
        if isinstance(value, bool):
            raise _bad(key, tp, value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _bad(key, tp, value) from None
        raise _bad(key, tp, value)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise _bad(key, tp, value)
    raise TypeError(f"unsupported recipe type {tp!r} for {key}")  # a schema bug, not a user error


def _unknown_key(prefix: str, key: str, valid: Sequence[str]) -> RecipeError:
    full = prefix + key
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"did you mean {prefix + close[0]!r}? V" if close else "V"
    where = f"under {prefix[:-1]!r}" if prefix else "at the top level"
    return RecipeError(
        f"unknown recipe key {full!r}",
        f"{hint}alid keys {where}: {', '.join(valid)}",
    )


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key(prefix, str(key), list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(prefix + name, hints[name], data[name])
        elif f.default is not dataclasses.MISSING and not dataclasses.is_dataclass(f.default):
            # defaults go through the same coercion (an int default of a float key becomes float)
            kwargs[name] = _coerce(prefix + name, hints[name], f.default)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise RecipeError(
            f"invalid recipe section {prefix[:-1] or cls.__name__!r}: {e}", "fix the value"
        ) from e


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is not None and not isinstance(nxt, dict):  # never drop a value silently
            key = ".".join(parts[: i + 1])
            raise RecipeError(
                f"recipe key {key!r} is {nxt!r}, a single value, so {dotted!r} cannot be set in it",
                f"make {key!r} a section of keys (e.g. --set {key}.name={nxt})",
            )
        if nxt is None:
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _check_section_value(schema: type, item: str, key: str, value: Any, flags: Mapping[str, Any]) -> None:
    """``--set model=foo`` names a whole section (``model``: name and weights) with one value: a
    :class:`RecipeError` with the key that was meant (``--set model.name=foo`` or ``--model
    foo``), rather than a section silently replaced by the command's flags."""
    node: Any = schema
    parts = key.split(".")
    for p in parts:
        if not dataclasses.is_dataclass(node):
            return
        hints = _hints(node)
        if p not in hints or p not in {f.name for f in dataclasses.fields(node)}:
            return  # an unknown key: _build says so with a did-you-mean
        node = hints[p]
    if not dataclasses.is_dataclass(node) or isinstance(value, Mapping):
        return
    keys = [f.name for f in dataclasses.fields(node)]
    target = "name" if "name" in keys else keys[0]
    raw = item.split("=", 1)[1]
    also = f" or --{key} {raw}" if target == "name" and f"{key}.name" in flags else ""
    fix = (
        f"did you mean --set {key}.name={raw}{also}?"
        if target == "name"
        else f"set one of its keys, e.g. --set {key}.{target}={raw}"
    )
    raise RecipeError(f"--set {item} gives the section {key!r} (keys: {', '.join(keys)}) a single value", fix)


def recipe_to_dict(recipe: Any) -> dict:
    """The recipe as plain data (lists, not tuples), ready for YAML/JSON."""

    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(recipe)


def find_recipe(name: str | os.PathLike, command: str | None = None) -> Path:
    """A recipe path from a path, or from a name under ``recipes/`` (``tiny_cpu``, ``pretrain/tiny_cpu``)."""
    p = Path(name)
    if p.is_file():
        return p
    candidates = []
    stem = str(name)
    for suffix in ("", ".yaml", ".yml"):
        if command:
            candidates.append(RECIPES_DIR / command / f"{stem}{suffix}")
        candidates.append(RECIPES_DIR / f"{stem}{suffix}")
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(
        str(q.relative_to(RECIPES_DIR).with_suffix(""))
        for q in (RECIPES_DIR.rglob("*.yaml") if RECIPES_DIR.is_dir() else [])
    )
    close = difflib.get_close_matches(stem, shipped, n=1)
    hint = f"did you mean {close[0]!r}? P" if close else "P"
    raise RecipeError(
        f"recipe {stem!r} not found",
        f"{hint}ass a YAML path or one of: {', '.join(shipped) or '(none shipped)'}",
    )


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"recipe {path} extends itself", "remove the 'extends' cycle")
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}", "check the path") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe {path} is not valid YAML{where}", "fix the YAML syntax") from e
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys", "write key: value pairs")
    base = data.pop("extends", None)
    if base:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        data = _deep_merge(_load_yaml(base_path, (*seen, path)), data)
    return data


def parse_set(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ``("a.b", parsed)``; the value is parsed as a YAML scalar or list."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r} is not KEY=VALUE", "write e.g. --set optim.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {item!r} has no key", "write e.g. --set optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def build_recipe(
    schema: type[T],
    file: str | os.PathLike | None = None,
    sets: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    command: str | None = None,
) -> T:
    """Resolve a recipe: defaults < ``file`` < ``sets`` (``a.b=value``) < ``flags`` (dotted keys).

    Flags whose value is ``None`` were not given on the command line and are ignored.
    """
    tree: dict = {}
    if file is not None:
        tree = _load_yaml(find_recipe(file, command))
    for item in sets:
        key, value = parse_set(item)
        _check_section_value(schema, item, key, value, flags or {})
        _set_dotted(tree, key, value)
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    return _build(schema, tree)


def recipe_hash(recipe: Any) -> str:
    """A short, stable hash of the resolved recipe (for output tags and file names)."""
    blob = json.dumps(recipe_to_dict(recipe), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_recipe(recipe: Any, command: str = "") -> str:
    """YAML text of a resolved recipe, with a provenance header; loads back with ``--recipe``."""
    from deo_cli import __version__

    header = (
        f"# deo {__version__} resolved recipe{' for ' + command if command else ''}\n"
        f"# hash {recipe_hash(recipe)}; rerun with: deo {command or 'CMD'} --recipe THIS_FILE ...\n"
    )
    return header + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)


def save_recipe(recipe: Any, path: str | os.PathLike, command: str = "") -> Path:
    """Write the resolved recipe to ``path`` atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, dump_recipe(recipe, command))


def recipe_path_for(output: str | os.PathLike) -> Path:
    """Where the resolved recipe of an output file goes: ``emb.tif`` -> ``emb.recipe.yaml``.

    For an output folder (or a ``.zarr`` store) it goes inside: ``out/recipe.yaml``.
    """
    output = Path(output)
    if output.suffix.lower() == ".zarr" or output.is_dir() or not output.suffix:
        return output / "recipe.yaml"
    return output.with_name(output.stem + ".recipe.yaml")


# ---------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = str  # "auto", "cpu", "cuda", "cuda:1", "mps"


@dataclass
class ModelSection:
    """Which encoder to use and its weights (``--model``, ``--weights``)."""

    name: str = "deo_swin_b"
    #: ``default`` (the model's official release), ``random``, a local file, ``hf://REPO/FILE[@REV]``
    #: or an https URL. A checkpoint from ``deo pretrain`` loads too.
    weights: str = "default"


@dataclass
class RuntimeSection:
    """Where and how to compute."""

    device: Device = "auto"
    precision: Precision = "auto"
    batch_size: int = 16
    #: Processes reading rasters. ``auto``: none (the main process reads) for inference on a
    #: CPU with at most 4 cores, where workers take cores from the forward pass; 2 otherwise
    #: (:func:`deo_cli.runtime.resolve_num_workers`).
    num_workers: int | Literal["auto"] = "auto"
    seed: int = 0
    #: Chips per forward call (inference): a batch is run in slices of this many. 0 = auto:
    #: on the CPU as many chips as keep the model's finest feature map within 3.2 MB, at most
    #: 4 (Swin-T and Swin-B: 2; ViT-B/8: 1; ViT-B/16, ViT-S/16 and the tiny models: 4), the whole
    #: batch on GPUs (:func:`deo_cli.infer.runner.default_micro_batch`).
    micro_batch: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.micro_batch < 0:
            raise ValueError("micro_batch must be >= 0 (0 = auto)")
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError("num_workers must be >= 0 or auto")


@dataclass
class InputSection:
    """How scenes are read (``--band-names``, ``--nodata``, ``--allow-no-crs``, ``--unit``)."""

    band_names: str | None = None
    nodata: float | None = None
    allow_no_crs: bool = False
    #: ``auto`` infers the unit from the values and checks it against the model's manifest.
    unit: Literal["auto", "dn", "reflectance", "byte"] = "auto"
    #: Resampling of coarser bands onto the finest grid (and of a second date onto the first).
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"
    #: Scene-level value the max-scaled (RGB) bands are divided by, in scene units; None: the
    #: 99.9th percentile of the scene's valid RGB values (deo_cli.data.normalize.scene_rgb_max).
    rgb_max: float | None = None
    #: Only this part of each scene: [xmin, ymin, xmax, ymax] in ``bounds_crs`` (default: the
    #: scene's CRS), widened to whole pixels; empty: the whole scene.
    bounds: list[float] = field(default_factory=list)
    #: CRS of ``bounds`` (e.g. EPSG:4326 for longitude/latitude); None: the scene's own.
    bounds_crs: str | None = None

    def __post_init__(self):
        if self.bounds and (
            len(self.bounds) != 4 or not (self.bounds[0] < self.bounds[2] and self.bounds[1] < self.bounds[3])
        ):
            raise ValueError("bounds must be [xmin, ymin, xmax, ymax] with xmin < xmax and ymin < ymax")
        if self.bounds_crs is not None:
            from rasterio.crs import CRS
            from rasterio.errors import CRSError

            try:
                CRS.from_user_input(self.bounds_crs)
            except CRSError as e:
                raise ValueError(f"bounds_crs {self.bounds_crs!r} is not a CRS (e.g. EPSG:4326)") from e


@dataclass
class TilingSection:
    """Chips cut from a scene for a model (``--chip-size``, ``--overlap``)."""

    chip_size: int | None = None  # None: the model's input size
    overlap: int | None = None  # None: a quarter of the chip
    #: Weights for blending overlapping chips: ``cosine`` falls to ~0 at the chip edge,
    #: ``linear`` likewise, ``center`` keeps only each chip's central part.
    blend: Literal["cosine", "linear", "center"] = "cosine"
    #: Features whose footprint has more than this fraction of nodata are written as nodata.
    max_nodata_fraction: float = 0.5

    def __post_init__(self):
        if self.chip_size is not None and self.chip_size < 8:
            raise ValueError("chip_size must be >= 8")
        if self.overlap is not None and self.overlap < 0:
            raise ValueError("overlap must be >= 0")
        if self.chip_size is not None and self.overlap is not None and self.overlap * 2 >= self.chip_size:
            raise ValueError("overlap must be less than half the chip size")
        if not 0.0 <= self.max_nodata_fraction <= 1.0:
            raise ValueError("max_nodata_fraction must be within 0-1")


# ---------------------------------------------------------------------------------------------
# deo embed
# ---------------------------------------------------------------------------------------------


@dataclass
class EmbedOutputSection:
    pool: Literal["none", "mean", "cls"] = "none"
    dtype: Literal["float32", "float16", "int8"] = "float32"
    #: ZSTD: the COG of a 625 x 625 x 384 embedding is written in 10 s instead of 19 s with
    #: DEFLATE (both at level 1 with the predictor), at the same size; ``deflate`` for readers
    #: built without ZSTD (GDAL < 2.3).
    compress: Literal["deflate", "zstd", "lzw", "none"] = "zstd"
    #: ``auto``: from -o (``.zarr`` -> zarr, a chip pool -> parquet, else a COG).
    format: Literal["auto", "cog", "zarr", "parquet"] = "auto"


@dataclass
class EmbedRecipe:
    """``deo embed``: dense embedding rasters or chip vectors."""

    model: ModelSection = field(default_factory=ModelSection)
    #: Feature level (0-based stage/block index) or ``default`` (the model's documented choice).
    layer: str = "default"
    input: InputSection = field(default_factory=InputSection)
    tiling: TilingSection = field(default_factory=TilingSection)
    output: EmbedOutputSection = field(default_factory=EmbedOutputSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    #: Processes (one per GPU; gloo on CPU), each computing a band of output rows.
    gpus: int = 1

    def __post_init__(self):
        if self.gpus < 1:
            raise ValueError("gpus must be >= 1")


# ---------------------------------------------------------------------------------------------
# deo segment / deo detect-change / deo bench (filled in by their issues)
# ---------------------------------------------------------------------------------------------


@dataclass
class SegmentDataSection:
    """Training data of ``deo segment train`` (one of: images + labels, pairs, geobench_task)."""

    #: Image rasters: a folder, a glob or one file.
    images: str | None = None
    #: Label rasters matched to ``images`` by file name (``_label``/``_mask`` suffixes allowed).
    labels: str | None = None
    #: CSV with ``image``, ``label`` and optional ``split`` (train/val/test) columns.
    pairs: str | None = None
    #: A GEO-Bench segmentation task (name or folder), instead of rasters.
    geobench_task: str | None = None
    #: GEO-Bench root folder (default: $GEO_BENCH_DIR).
    geobench_root: str | None = None
    #: YAML file with class values, names, colours, ignore index and output nodata.
    classes: str | None = None
    #: Label value that marks unlabelled pixels in the label rasters (besides their nodata).
    label_nodata: float | None = None
    #: Share held out for validation when the pairs carry no split column: whole images when
    #: there are at least 1/val_fraction of them, else chips (deterministic, seeded).
    val_fraction: float = 0.2
    #: Overlap of neighbouring training chips (px).
    chip_overlap: int = 0
    #: ``flips``: random flips and 90-degree rotations of training chips.
    augment: Literal["none", "flips"] = "flips"

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be within [0, 1)")
        if self.chip_overlap < 0:
            raise ValueError("chip_overlap must be >= 0")


@dataclass
class SegmentTrainRecipe:
    """``deo segment train``: frozen encoder + UPerNet/linear head (docs/method.md §3.1)."""

    model: ModelSection = field(default_factory=ModelSection)
    head: Literal["upernet", "linear"] = "upernet"
    input: InputSection = field(default_factory=InputSection)
    chip_size: int | None = None
    epochs: int = 50
    warmup_epochs: int = 5
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    ignore_index: int | None = None
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    data: SegmentDataSection = field(default_factory=SegmentDataSection)
    #: UPerNet width (512 in the paper, docs/method.md §3.1); smaller for quick experiments.
    head_channels: int = 512
    #: Cross-entropy weight per class (in class-table order); empty: unweighted.
    class_weights: list[float] = field(default_factory=list)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.head_channels < 1:
            raise ValueError("head_channels must be >= 1")


@dataclass
class SegmentOutputSection:
    compress: Literal["deflate", "zstd", "lzw", "none"] = "deflate"


@dataclass
class SegmentPredictRecipe:
    """``deo segment predict``: a class mask COG from a trained head."""

    input: InputSection = field(default_factory=InputSection)
    tiling: TilingSection = field(default_factory=TilingSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    output: SegmentOutputSection = field(default_factory=SegmentOutputSection)


@dataclass
class ChangeRecipe:
    """``deo detect-change``: change score, mask and polygons from two dates."""

    model: ModelSection = field(default_factory=ModelSection)
    #: Score without a head: ``zero-shot`` (cosine distance of DEO features) or ``cva`` (change
    #: vector analysis, the spectral baseline: ``deo_cli.tasks.change.cva``; only the model's band
    #: manifest is used, no weights). With ``--head`` the score is the head's P(change).
    method: Literal["zero-shot", "cva"] = "zero-shot"
    #: Zero-shot feature level(s): ``default`` (Swin: levels 0-2 averaged on the stride-4 grid;
    #: ViT: deo embed's level; ``deo_cli.tasks.change.model.default_change_layers``), ``last``, an
    #: index, or a comma-separated list of indices whose distances are averaged.
    layer: str = "default"
    input: InputSection = field(default_factory=InputSection)
    tiling: TilingSection = field(default_factory=TilingSection)
    #: ``auto``: ``fixed`` when a threshold is given, ``percentile`` when a percentile is, else
    #: the head's threshold (supervised) or ``deo_cli.tasks.change.threshold.DEFAULT_METHOD``
    #: (zero-shot, cva); the rules are described in ``deo_cli.tasks.change.threshold``.
    threshold_method: Literal[
        "auto", "otsu", "otsu-log", "kittler", "triangle", "mad", "percentile", "fixed"
    ] = "auto"
    threshold: float | None = None
    percentile: float | None = None
    #: k of the ``mad`` rule (median + k * 1.4826 * MAD); null: ``DEFAULT_MAD_K``.
    mad_k: float | None = None
    #: Polygons smaller than this (CRS units squared) are dropped.
    min_area: float = 0.0
    #: Polygons covering fewer input-grid pixels than this are dropped (a mask pixel on the
    #: stride-4 embedding grid covers 16): 2 drops single input pixels, which were speckle in
    #: the OSCD comparison (``deo_cli.tasks.change.predict.write_polygons``); 0 or 1 keeps every
    #: one.
    min_pixels: int = 2
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    #: Zero-shot score grid: ``embedding`` (the level's grid, transform scaled by its stride,
    #: like deo embed) or ``input`` (bilinearly upsampled to the first date's grid).
    #: Supervised heads always write the input grid.
    output_grid: Literal["embedding", "input"] = "embedding"
    #: Polygon simplification tolerance (CRS units); 0 keeps pixel edges.
    simplify: float = 0.0
    compress: Literal["deflate", "zstd", "lzw", "none"] = "deflate"

    def __post_init__(self):
        if self.percentile is not None and not 0.0 <= self.percentile <= 100.0:
            raise ValueError("percentile must be within 0-100")
        if self.min_area < 0 or self.simplify < 0 or self.min_pixels < 0:
            raise ValueError("min_area, min_pixels and simplify must be >= 0")
        if self.mad_k is not None and self.mad_k < 0:
            raise ValueError("mad_k must be >= 0")


@dataclass
class ChangeTrainRecipe:
    """``deo detect-change train``: siamese head on OSCD-format pairs."""

    model: ModelSection = field(default_factory=ModelSection)
    finetune: bool = False
    #: Training defaults (chip 96 px, 20 epochs, lr 1e-3 after 1 warm-up epoch, batch 8, a
    #: 16-channel UPerNet): the best pooled F1 leave-one-city-out on the four OSCD cities of the
    #: shared data among the settings compared (``benchmarks/oscd_change.py``; README, change
    #: section: 64 px chips 0.088, 64 px with 64 channels 0.080, 96 px 0.159-0.169), about 25 s per
    #: city on 2 CPU cores. The paper-style head (50 epochs, lr 1e-4, 512 channels) took 35 min on
    #: 2 cores and scored about half the F1 of the small head on unseen cities.
    chip_size: int = 96
    epochs: int = 20
    lr: float = 1e-3
    runtime: RuntimeSection = field(default_factory=lambda: RuntimeSection(batch_size=8))
    #: OSCD-format folder (images/<city>/imgs_1, imgs_2; train_labels/<city>/cm/<city>-cm.tif).
    data: str | None = None
    #: Cities to train on (default: every labelled city not in test_cities).
    train_cities: list[str] = field(default_factory=list)
    #: Cities scored after training with the streaming prediction path (F1/IoU in metrics.json).
    test_cities: list[str] = field(default_factory=list)
    input: InputSection = field(default_factory=InputSection)
    head: Literal["upernet", "linear"] = "upernet"
    head_channels: int = 16
    #: How the two dates' features meet, per level: ``diff`` = |f1 - f2| (symmetric in the
    #: dates), ``concat`` = [f1, f2] (twice the channels; order-aware).
    fusion: Literal["diff", "concat"] = "diff"
    #: Cross-entropy weights (no change, change); empty: (1, sqrt(no-change / change pixels)).
    class_weights: list[float] = field(default_factory=list)
    #: Channels of the full-resolution branch on the two dates' per-pixel ``|x1 - x2|`` that
    #: refines the head's logits (:class:`deo_cli.tasks.change.model.PixelDiffHead`); 0: off.
    pixel_channels: int = 32
    warmup_epochs: float = 1
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    #: Share of the training chips held out (deterministically) for model selection and for
    #: choosing the P(change) threshold.
    val_fraction: float = 0.2
    #: How far the validation F1-best P(change) threshold is pulled toward 0.5 (0: keep it;
    #: 1: 0.5, the default: validation chips come from the training cities and the optimum did
    #: not transfer to held-out cities; ``deo_cli.tasks.change.train.transfer_threshold``).
    threshold_shrink: float = 1.0
    chip_overlap: int = 0
    augment: Literal["none", "flips"] = "flips"

    def __post_init__(self):
        if self.epochs < 1 or self.head_channels < 1:
            raise ValueError("epochs and head_channels must be >= 1")
        if self.pixel_channels < 0:
            raise ValueError("pixel_channels must be >= 0 (0: off)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be within (0, 1)")
        if not 0.0 <= self.threshold_shrink <= 1.0:
            raise ValueError("threshold_shrink must be within [0, 1] (0: validation optimum, 1: 0.5)")


@dataclass
class BenchLinearSection:
    """Linear probe on cached frozen features (classification; docs/method.md §3.1).

    ``lr: null`` takes the paper's per-task value (1e-3 BigEarthNet/So2Sat, 1e-2 EuroSAT).
    Warm-up, cosine floor and AdamW's default weight decay are read in the authors' evaluation
    code (the same schedule as segmentation). ``augment: flips`` caches features of the four
    flips of every training image (the paper trains with random flips); ``pool: mean`` averages
    the last feature map without the final norm (as the paper's code), ``model`` uses the
    encoder's own pooled vector.
    """

    epochs: int = 50
    warmup_epochs: float = 5
    batch_size: int = 64
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    augment: Literal["none", "flips"] = "flips"
    pool: Literal["mean", "model"] = "mean"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


@dataclass
class BenchSegmentationSection:
    """Frozen encoder + segmentation head through ``fit_dense`` (docs/method.md §3.1).

    The paper's effective batch is 64 (16 x 4 gradient-accumulation steps); ``fit_dense`` does
    not accumulate, so the default is 16 per step (set 64 where memory allows).
    """

    head: Literal["upernet", "linear"] = "upernet"
    epochs: int = 50
    warmup_epochs: float = 5
    batch_size: int = 16
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    augment: Literal["none", "flips"] = "flips"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


@dataclass
class BenchKnnSection:
    """kNN on L2-normalised pooled features (cosine similarity), a fast extra protocol."""

    k: int = 5

    def __post_init__(self):
        if self.k < 1:
            raise ValueError("k must be >= 1")


@dataclass
class BenchOscdSection:
    """Change detection on OSCD per city with ``deo detect-change``'s own scorers (zero-shot
    cosine distance on the input grid, the CVA baseline, a trained head when ``head`` is set)
    and threshold rule per city (``deo_cli.bench.oscd``)."""

    #: Feature levels whose distances are averaged; empty: ``deo detect-change``'s default level.
    layers: list[int] = field(default_factory=list)
    #: Chip size and overlap in pixels; null: the model's input size and a quarter of it.
    chip_size: int | None = None
    overlap: int | None = None
    #: A change head from ``deo detect-change train``: adds the supervised rows.
    head: str | None = None
    #: Threshold rule of the zero-shot and CVA scores (``auto``: detect-change's default).
    threshold_method: Literal["auto", "otsu", "otsu-log", "kittler", "triangle", "mad", "percentile"] = "auto"
    mad_k: float | None = None
    percentile: float | None = None


@dataclass
class BenchThroughputSection:
    """Timing of the encoder forward: ``warmup`` untimed, then ``iterations`` timed batches."""

    warmup: int = 5
    iterations: int = 20
    #: ``ms`` feeds the multispectral stem, ``rgb`` the RGB stem.
    input: Literal["ms", "rgb"] = "ms"

    def __post_init__(self):
        if self.warmup < 0 or self.iterations < 1:
            raise ValueError("warmup must be >= 0 and iterations >= 1")


@dataclass
class BenchRecipe:
    """``deo bench``: suites of the paper's frozen-encoder protocols (docs/method.md §3)."""

    suite: Literal["geobench", "oscd", "throughput"] = "geobench"
    tasks: list[str] = field(default_factory=list)
    model: ModelSection = field(default_factory=ModelSection)
    protocol: Literal["paper", "linear", "knn", "upernet", "all"] = "paper"
    partition: str = "default"
    seeds: list[int] = field(default_factory=lambda: [0])
    limit: int | None = None
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    #: GEO-Bench folder or one task folder (default: $GEO_BENCH_DIR); the OSCD folder for oscd.
    data: str | None = None
    #: Input size in pixels; null: the paper's size per task (docs/method.md §3.1), the model's
    #: input size for throughput.
    image_size: int | None = None
    #: ``task``: per-task z-score from band_stats.json (the paper); ``model``: the model's
    #: band manifest (DEO's pretraining normalisation, RGB max-scaled per image).
    normalization: Literal["task", "model"] = "task"
    #: Bootstrap resamples of the test samples for the 95 % interval.
    bootstrap: int = 1000
    linear: BenchLinearSection = field(default_factory=BenchLinearSection)
    segmentation: BenchSegmentationSection = field(default_factory=BenchSegmentationSection)
    knn: BenchKnnSection = field(default_factory=BenchKnnSection)
    oscd: BenchOscdSection = field(default_factory=BenchOscdSection)
    throughput: BenchThroughputSection = field(default_factory=BenchThroughputSection)

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError("image_size must be >= 8")
        if self.bootstrap < 0:
            raise ValueError("bootstrap must be >= 0")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")


# ---------------------------------------------------------------------------------------------
# deo pretrain (numbers: docs/method.md §2.2-2.9)
# ---------------------------------------------------------------------------------------------


@dataclass
class PretrainModelSection:
    name: str = "deo_swin_b"
    #: Stochastic depth; None keeps the model's default (0.5 for Swin-B, docs/method.md §2.5).
    drop_path: float | None = None
    #: Student initialisation: ``random`` (the paper, §2.1) or weights as for ``--weights``.
    init: str = "random"
    #: Width of the multispectral self-distillation space (SimDINO ``z_dim`` 256, docs/method.md §2.5).
    ms_dim: int = 256
    #: Hidden width of the 3-layer projection heads (2048, docs/method.md §2.5).
    head_hidden_dim: int = 2048
    #: Keep stochastic depth active in the EMA teacher's forward: the official code never puts its
    #: teacher in eval mode (docs/method.md §2.6). False runs the teacher in eval mode.
    ema_drop_path: bool = True


@dataclass
class TeacherSection:
    """The frozen optical teacher (docs/method.md §2.7)."""

    name: str = "vit_base_patch16_dinov3"
    weights: str = "default"
    #: 0-based blocks whose normed patch tokens are distilled; empty: (8, 11) base, (15, 23) large.
    layers: list[int] = field(default_factory=list)


@dataclass
class PretrainDataSection:
    """Training data (``--data``, ``--bands``)."""

    path: str | None = None
    bands: str = "S2"
    band_names: str | None = None
    nodata: float | None = None
    #: Manifest columns (CSV/Parquet): the multispectral path and an optional co-registered RGB path.
    ms_column: str = "ms_path"
    rgb_column: str = "rgb_path"
    #: Scenes larger than this many pixels a side are sampled by random windows of this size.
    window_size: int = 256
    #: Random windows drawn from each large scene per epoch.
    windows_per_scene: int = 16
    #: Windows with more nodata than this fraction are skipped.
    max_nodata_fraction: float = 0.5
    #: Use only this many samples (the paper's --data_split 500000), 0 = all.
    limit: int = 0
    num_workers: int = 8
    #: Unit of the multispectral values: ``auto`` infers it (DN or 0-1 reflectance) from the data.
    unit: Literal["auto", "dn", "reflectance"] = "auto"


@dataclass
class CropsSection:
    """Multi-crop and augmentations (docs/method.md §2.4); blur/solarize probabilities per crop kind."""

    global_number: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = field(default_factory=lambda: (0.4, 1.0))
    local_number: int = 10
    local_size: int = 96
    local_scale: tuple[float, float] = field(default_factory=lambda: (0.05, 0.4))
    hflip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_kernel: int = 23
    blur_sigma: tuple[float, float] = field(default_factory=lambda: (0.1, 2.0))
    #: Gaussian-blur probability for (global 1, global 2, each local crop).
    blur_p: tuple[float, float, float] = field(default_factory=lambda: (1.0, 0.1, 0.5))
    #: Solarize probability for (global 1, global 2, each local crop).
    solarize_p: tuple[float, float, float] = field(default_factory=lambda: (0.0, 0.2, 0.0))
    #: Range of the solarize threshold (Kornia ``thresholds=0.5`` draws it from (0, 1), docs/method.md §2.4).
    solarize_threshold: tuple[float, float] = field(default_factory=lambda: (0.0, 1.0))
    #: Half-width of Kornia's random addition before solarizing (its default ``additions=0.1``).
    solarize_addition: float = 0.1


@dataclass
class LossSection:
    """Weights of the loss terms (0 switches a term off) and the coding-rate epsilon (§2.6-2.8)."""

    compression: float = 1.0
    expansion: float = 1.0
    distill_cls: float = 1.0
    distill_patch: float = 1.0
    eps: float = 0.05
    #: Compute the coding rate on chunks of this many samples (the paper: 64 per GPU); 0 = the batch.
    expansion_chunk: int = 0


@dataclass
class OptimSection:
    """AdamW and schedules (docs/method.md §2.9); ``lr`` is for a global batch of 256 and scales linearly."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.996
    momentum_end: float = 1.0
    clip_grad: float = 3.0
    betas: tuple[float, float] = field(default_factory=lambda: (0.9, 0.999))
    fused: bool = True


@dataclass
class PretrainRecipe:
    """``deo pretrain``: the DEO objective (docs/method.md §2)."""

    seed: int = 0
    model: PretrainModelSection = field(default_factory=PretrainModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    data: PretrainDataSection = field(default_factory=PretrainDataSection)
    crops: CropsSection = field(default_factory=CropsSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    epochs: int = 100
    #: Per process (GPU); the paper: 64 x 4 GPUs = 256.
    batch_size: int = 64
    #: Stop after this many steps (0 = run all epochs); schedules keep their full length.
    max_steps: int = 0
    gpus: int = 1
    device: Device = "auto"
    precision: Precision = "auto"
    #: ``torch.compile`` the student: ``auto`` on CUDA only (inductor takes minutes on the CPU).
    compile: bool | Literal["auto"] = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    #: Record the dataset indices every process trained on in metrics.jsonl (checks data sharding).
    log_samples: bool = False
