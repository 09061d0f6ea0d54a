"""Recipes: typed, strict run configurations resolved once and saved beside every output.

A recipe is a tree of dataclasses (the *schema*: every key with its type and default). A run
resolves it once, with this precedence (later wins)::

    schema defaults  <  YAML file (--recipe)  <  repeated --set a.b=value  <  explicit CLI flags

Unknown keys are errors with a did-you-mean; values are checked against the schema types.
A YAML file may start from another with ``extends: other.yaml`` (path relative to the file).
The resolved recipe is written next to the outputs with :func:`save_recipe` (and can be fed
back with ``--recipe`` to reproduce the run); :func:`recipe_hash` stamps it into output tags.

Only builders read recipe fields; constructors of models, losses and datasets take plain
arguments (STYLE.md habit 4).

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
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(
            f"recipe key {key!r} must be one of {', '.join(map(repr, choices))}, got {value!r}",
            f"{hint}set a valid value",
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
            return [_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value))]
        item = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
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
    hint = f"did you mean {prefix + close[0]!r}? " if close else ""
    where = f"under {prefix[:-1]!r}" if prefix else "at the top level"
    return RecipeError(
        f"unknown recipe key {full!r}",
        f"{hint}valid keys {where}: {', '.join(valid)}",
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
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ validation
        raise RecipeError(f"invalid recipe section {prefix[:-1] or cls.__name__!r}: {e}", "fix the value") from e


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
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


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
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise RecipeError(
        f"recipe {stem!r} not found",
        f"{hint}pass a YAML path or one of: {', '.join(shipped) or '(none shipped)'}",
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(dump_recipe(recipe, command))
    os.replace(tmp, path)
    return path


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
    num_workers: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
