"""Outputs appear whole or not at all, and one run at a time writes each.

Every output is written under a temporary name beside its destination and renamed into place
only when complete (``os.replace`` is atomic on one file system). A failure or Ctrl-C removes
the temporary file, so no half-written output is ever left where a user (or ``--resume``)
would take it for a finished one.

:func:`output_lock` keeps a second run off an output that a first one is writing: a hidden lock
file beside it (``.NAME.lock``) holds an exclusive ``flock`` for the run's lifetime and names
the holder (PID, host, start time) for the second run's one-line error. The kernel releases the
lock when its process dies, however it dies, so a lock left by a killed run is taken over (with
a warning naming that run). Temporary names carry the writing process's id
(:func:`temp_path_for`); :func:`remove_stale_temporaries`, called with the lock held, removes
those of processes that no longer run (a run killed while finishing its COG left them).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deo_cli.errors import OutputError, OutputExistsError, OutputLockedError, UsageError

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

log = logging.getLogger(__name__)

#: Tags of the temporary names deo's writers give an output (``.NAME.<tag>-<pid><suffix>``).
TEMP_TAGS = ("partial", "cog", "pyramid", "src", "old")


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
    # create (and remove) a file: permission bits do not tell (root passes os.access on /proc,
    # a read-only mount, a full disk)
    try:
        fd, probe = tempfile.mkstemp(prefix=".deo-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot create files in {folder} ({e.strerror or e})", fix) from e
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


# ---------------------------------------------------------------------------------------------
# One run per output
# ---------------------------------------------------------------------------------------------


def lock_path_for(path: str | os.PathLike) -> Path:
    """The hidden lock file of an output: ``emb.tif`` -> ``.emb.tif.lock``."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _holder_text(info: dict) -> str:
    parts = [f"PID {info.get('pid', '?')}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return " ".join(parts)


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _acquire(lock: Path, output: Path) -> int:
    fix = "choose an output folder you can write to"
    for _ in range(10):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {lock} ({e.strerror or e})", fix) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # a file system without locks: write without one rather than not at all
                log.debug("no lock on %s (%s)", lock, e.strerror or e)
                return fd
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{output} is being written by another deo run ({_holder_text(holder)})",
                "wait for that run to finish, or stop it first",
            ) from None
        if not _same_file(fd, lock):  # its holder removed it between our open and our lock
            os.close(fd)
            continue
        previous = _read_holder(fd)
        if previous and previous.get("pid") != os.getpid():
            log.warning(
                "taking over the lock of %s from a run that ended without releasing it (%s)",
                output.name,
                _holder_text(previous),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return fd
    raise OutputLockedError(f"cannot take the lock of {output}: other runs keep replacing it", "retry")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``path``'s lock file for the block; an :class:`OutputLockedError` naming the holder
    when another run holds it (see the module docstring). Creates the output's folder."""
    path = Path(path)
    ensure_folder(path.parent)
    lock = lock_path_for(path)
    if fcntl is None:
        yield lock
        return
    fd = _acquire(lock, path)
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # still holding the lock: a waiting run then sees a new file
        os.close(fd)


@contextlib.contextmanager
def outputs_locked(paths, clean=()) -> Iterator[None]:
    """Hold the lock of every output in ``paths`` (``None`` entries skipped) for the block, and
    remove the temporaries killed runs left of them and of the ``clean`` paths (previews and
    other side outputs): :func:`output_lock`, :func:`remove_stale_temporaries`."""
    paths = [Path(p) for p in paths if p is not None]
    with contextlib.ExitStack() as stack:
        for p in paths:
            stack.enter_context(output_lock(p))
        for p in [*paths, *(Path(c) for c in clean if c is not None)]:
            remove_stale_temporaries(p)
        yield


def pid_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of output ``path`` left by processes that no longer run.

    Those are the names :func:`temp_path_for` and :func:`write_text_atomic` give (``.emb.cog-123.tif``,
    ``.emb.pyramid-123.tif.ovr1.tif``, ``.emb.src-123.vrt``, ``.emb.recipe.yaml.tmp-123``):
    a run killed outright (``kill -9``, a lost node) leaves them. Call it with the output's lock
    held. The ``--resume`` state (``.emb.partial.tif`` and its sidecar, no process id) stays.
    """
    path = Path(path)
    stem = re.escape(path.stem)
    patterns = (
        re.compile(rf"^\.{stem}\.(?:{'|'.join(TEMP_TAGS)})-(\d+)(?:\.|$)"),
        re.compile(rf"^\.{stem}\..+\.tmp-(\d+)$"),
    )
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            for pat in patterns:
                m = pat.match(p.name)
                if m and int(m.group(1)) != os.getpid() and not pid_running(int(m.group(1))):
                    _remove(p)
                    removed.append(p)
                    break
    if removed:
        log.info(
            "removed %d temporary file(s) of %s left by a run that stopped: %s",
            len(removed),
            path.name,
            ", ".join(sorted(p.name for p in removed)),
        )
    return removed
