"""Outputs appear whole or not at all.

Every output is written under a temporary name beside its destination and renamed into place
only when complete (``os.replace`` is atomic on one file system). A failure or Ctrl-C removes
the temporary file, so no half-written output is ever left where a user (or ``--resume``)
would take it for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from deo_cli.errors import OutputError, OutputExistsError, UsageError


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early, before any work, when ``path`` exists and ``overwrite`` is off."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"output {path} already exists", "pass --overwrite to replace it, or choose another -o"
        )
    if path.exists() and path.is_dir() and path.suffix.lower() not in (".zarr",) and overwrite:
        raise UsageError(f"output {path} is a folder", "give a file name for -o")
    ensure_folder(path.parent)
    return path


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) if needed; an :class:`OutputError` when it cannot be
    created, is a file or is not writable."""
    folder = Path(folder)
    fix = "choose an output folder you can write to"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:  # a file where the folder (or a parent) should be
        raise OutputError(f"cannot create the output folder {folder}: a file is in the way", fix) from e
    except OSError as e:
        raise OutputError(f"cannot create the output folder {folder} ({e.strerror or e})", fix) from e
    if not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write into {folder}", fix)
    return folder


def temp_path_for(path: str | os.PathLike, tag: str = "partial") -> Path:
    """A hidden temporary name beside ``path`` that keeps its suffix (GDAL picks drivers by it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{tag}-{os.getpid()}{path.suffix}")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON state, a recipe, a CSV) under a hidden temporary name beside
    ``path`` and rename it into place; on failure (a full disk) the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def commit(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Move a finished temporary file or folder into place."""
    tmp, path = Path(tmp), Path(path)
    if path.exists():
        if not overwrite:
            raise OutputExistsError(f"output {path} already exists", "pass --overwrite to replace it")
        if path.is_dir() and not path.is_symlink():
            old = temp_path_for(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
            return path
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, overwrite: bool = False, tag: str = "partial") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    >>> with atomic_output("mask.tif", overwrite=True) as tmp:
    ...     write_everything_to(tmp)
    """
    path = check_output(path, overwrite)
    tmp = temp_path_for(path, tag)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        for aux in tmp.parent.glob(tmp.name + ".*"):  # GDAL side files (.aux.xml, .ovr)
            _remove(aux)
        raise
    commit(tmp, path, overwrite=True)
    for aux in tmp.parent.glob(tmp.name + ".*"):
        _remove(aux)
