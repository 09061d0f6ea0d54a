"""``deo bench download --suite geobench``: fetch GEO-Bench v1, restartable and checksummed.

Where GEO-Bench v1 lives: the Hugging Face dataset ``recursix/geo-bench-1.0`` (CC-BY-SA-4.0;
what GEO-Bench's own ``geobench-download`` fetches). It holds one zip per task,
``classification_v1.0/<task>.zip`` and ``segmentation_v1.0/<task>.zip`` (e.g.
``classification_v1.0/m-bigearthnet.zip``, 6.56 GB), and a ``normalizer.json`` per benchmark;
about 65 GB to download and unzip, 57 GB once the zips are deleted. Each zip unpacks into
``<benchmark>/<task>/`` beside it, which is the layout :func:`deo_cli.data.geobench.open_task`
reads under ``$GEO_BENCH_DIR``. The hub publishes a SHA-256 for every LFS file (the zips) and
a git blob id for the small files; both are checked. The default revision is pinned so
results are reproducible.

Two kinds of source:

- ``hf://datasets/<owner>/<name>`` (the default): the file list and checksums come from the
  hub API and files are fetched with ``huggingface_hub`` (which resumes interrupted downloads);
- any ``http(s)://`` or ``file://`` base URL (a mirror): files are fetched with ``urllib`` from
  ``<base>/<path>``, and checksums come from a manifest beside them, ``SHA256SUMS`` or
  ``MD5SUMS`` in ``sha256sum`` format (``<hex>  <path>`` per line). A partial file is kept as
  ``<name>.part`` and resumed with an HTTP ``Range`` request (restarted from zero when the
  server ignores ranges).

A file whose checksum does not match is deleted and raises :class:`DataError`. Zips are
extracted only after every member name has been checked (no absolute paths, no ``..``, no
links), into a temporary folder that is then moved into place; a marker
``.<zip>.done`` records the finished archive so a rerun skips it.

This module imports neither torch nor rich and never prints; pass ``progress`` to observe.
"""

from __future__ import annotations

import hashlib
import http.client
import inspect
import json
import logging
import os
import re
import shutil
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from deo_cli.data.geobench import BENCHMARKS, GEO_BENCH_ENV, list_tasks, task_key
from deo_cli.errors import DataError

logger = logging.getLogger(__name__)

#: The Hugging Face dataset GEO-Bench's maintainers publish v1.0 in.
GEOBENCH_HF_REPO = "recursix/geo-bench-1.0"
#: ``main`` of that dataset since January 2024 ("removing seasonet and adding the segmentation
#: normalizers"); pass ``revision="main"`` to follow the branch instead.
GEOBENCH_HF_REVISION = "1e5754337032f097396db62cc15a5ff88f4618e8"
DEFAULT_BASE_URL = f"hf://datasets/{GEOBENCH_HF_REPO}"
#: Checksum manifests looked for beside a mirror's files, strongest first.
MANIFESTS = (("SHA256SUMS", "sha256"), ("MD5SUMS", "md5"))

#: ``progress(stage, path, done, total)``: stage is ``download``, ``verify`` or ``extract``;
#: ``path`` the file (relative to the source); ``total`` may be ``None``.
ProgressFn = Callable[[str, str, int, "int | None"], None]

_CHUNK = 1 << 20
_HINT_RERUN = "rerun the same command to resume; finished files are kept"


@dataclass(frozen=True)
class RemoteFile:
    """One file of the source: path relative to the base, size and whichever checksums exist."""

    path: str
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    git_sha1: str | None = None

    @property
    def checksum(self) -> tuple[str, str] | None:
        for kind in ("sha256", "md5", "git_sha1"):
            value = getattr(self, kind)
            if value:
                return kind, value.lower()
        return None


@dataclass
class DownloadResult:
    """What :func:`download_geobench` did: files fetched and verified, files already complete,
    and the task folders now under ``dest``."""

    dest: Path
    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tasks: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def download_geobench(
    dest: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    base_url: str = DEFAULT_BASE_URL,
    progress: ProgressFn | None = None,
    *,
    revision: str | None = GEOBENCH_HF_REVISION,
    keep_archives: bool = False,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 60.0,
) -> DownloadResult:
    """Download GEO-Bench v1 (all tasks, or ``tasks``) into ``dest`` (default ``$GEO_BENCH_DIR``).

    Restartable: finished archives are skipped, partial ones resumed. Every file is checked
    against its published checksum before it is used; a mismatch deletes it and raises
    :class:`DataError`. ``retries`` interrupted transfers are resumed within one call.
    """
    dest_path = _resolve_dest(dest)
    dest_path.mkdir(parents=True, exist_ok=True)
    hub = _parse_hub(base_url)
    if hub is not None:
        repo, url_revision = hub
        files = _hub_listing(repo, url_revision or revision)
    else:
        files = _http_listing(base_url.rstrip("/"), timeout)
    chosen = _select(files, tasks)
    result = DownloadResult(dest=dest_path)
    for remote in chosen:
        if _is_complete(remote, dest_path):
            logger.info("%s: already downloaded", remote.path)
            result.skipped.append(remote.path)
            continue
        local = dest_path / remote.path
        local.parent.mkdir(parents=True, exist_ok=True)
        if hub is not None:
            repo, url_revision = hub
            _hub_fetch(repo, url_revision or revision, remote, dest_path, progress)
            _verify(local, remote, progress)
        else:
            part = local.with_name(local.name + ".part")
            url = base_url.rstrip("/") + "/" + urllib.parse.quote(remote.path)
            _http_fetch(url, part, remote, progress, retries, retry_wait, timeout)
            _verify(part, remote, progress)
            os.replace(part, local)
        if local.suffix.lower() == ".zip":
            extract_zip(local, local.parent, progress)
            _mark_done(remote, dest_path)
            if not keep_archives:
                local.unlink()
        result.fetched.append(remote.path)
        logger.info("%s: downloaded and verified", remote.path)
    result.tasks = list_tasks(dest_path)
    return result


def _resolve_dest(dest: str | os.PathLike | None) -> Path:
    if dest is not None:
        return Path(dest).expanduser()
    env = os.environ.get(GEO_BENCH_ENV)
    if not env:
        raise DataError(
            f"no destination for GEO-Bench: {GEO_BENCH_ENV} is not set",
            f"pass --dest FOLDER or set {GEO_BENCH_ENV} (GEO-Bench v1 needs about 65 GB while unzipping)",
        )
    return Path(env).expanduser()


# ---------------------------------------------------------------------------------------------
# Listings
# ---------------------------------------------------------------------------------------------


def _parse_hub(base_url: str) -> tuple[str, str | None] | None:
    """``hf://datasets/owner/name[@revision]`` -> (``owner/name``, revision); else ``None``."""
    if not base_url.startswith("hf://"):
        return None
    m = re.fullmatch(r"hf://datasets/([\w.-]+/[\w.-]+)(?:@([\w./-]+))?/?", base_url)
    if not m:
        raise DataError(
            f"cannot read the source {base_url!r}",
            f"use hf://datasets/OWNER/NAME (default {DEFAULT_BASE_URL}) or an http(s):// mirror",
        )
    return m.group(1), m.group(2)


def _hub_errors() -> tuple[type[BaseException], ...]:
    try:
        import huggingface_hub.errors as hub_errors
    except ImportError:  # pragma: no cover - huggingface_hub < 0.24
        import huggingface_hub.utils as hub_errors  # type: ignore[no-redef]

    extra = tuple(
        getattr(hub_errors, n)
        for n in ("HTTPError", "HfHubHTTPError", "HFValidationError")
        if hasattr(hub_errors, n)
    )
    return (OSError, *extra)


def _hub_listing(repo: str, revision: str | None) -> list[RemoteFile]:
    import huggingface_hub

    try:
        entries = list(
            huggingface_hub.HfApi().list_repo_tree(
                repo, recursive=True, repo_type="dataset", revision=revision
            )
        )
    except _hub_errors() as err:
        raise DataError(
            f"cannot list the Hugging Face dataset {repo} ({type(err).__name__}: {err})",
            "check the network (and HF_ENDPOINT / HF_HUB_OFFLINE), or pass a mirror URL as the source",
        ) from None
    files = []
    for entry in entries:
        path = getattr(entry, "path", None)
        if path is None or not hasattr(entry, "blob_id"):
            continue  # a folder
        lfs = getattr(entry, "lfs", None)
        sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
        files.append(
            RemoteFile(
                path=path,
                size=int(entry.size) if getattr(entry, "size", None) is not None else None,
                sha256=sha256,
                git_sha1=None if sha256 else getattr(entry, "blob_id", None),
            )
        )
    return files


def _http_listing(base: str, timeout: float) -> list[RemoteFile]:
    for name, kind in MANIFESTS:
        try:
            with urllib.request.urlopen(f"{base}/{name}", timeout=timeout) as resp:
                text = resp.read().decode("utf-8")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                continue
            raise DataError(f"cannot read {base}/{name}: HTTP {err.code}", _HINT_RERUN) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            if isinstance(err, FileNotFoundError) or isinstance(
                getattr(err, "reason", None), FileNotFoundError
            ):
                continue  # file:// mirror without this manifest
            raise DataError(f"cannot reach {base} ({err})", "check the URL and the network") from None
        return _parse_manifest(text, kind, f"{base}/{name}")
    raise DataError(
        f"the mirror {base} has no checksum manifest ({' or '.join(n for n, _ in MANIFESTS)})",
        "add one beside the files (e.g. `sha256sum */*.zip > SHA256SUMS`), deo does not use unverified data",
    )


def _parse_manifest(text: str, kind: str, where: str) -> list[RemoteFile]:
    digits = 64 if kind == "sha256" else 32
    files = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(rf"([0-9a-fA-F]{{{digits}}})\s+\*?(\S.*)", line)
        if not m:
            raise DataError(
                f"{where} line {lineno} is not '<{kind}>  <path>'", "fix the manifest of the mirror"
            )
        files.append(RemoteFile(path=m.group(2).strip().lstrip("./"), **{kind: m.group(1).lower()}))
    return files


def _in_benchmark(path: str) -> bool:
    top = path.split("/", 1)[0]
    return "/" in path and (top in BENCHMARKS or top.endswith("_v1.0"))


def _task_of(path: str) -> tuple[str, str] | None:
    """(benchmark, task) of a file in a benchmark folder, e.g. ``segmentation_v1.0/m-x.zip``."""
    if not _in_benchmark(path):
        return None
    parts = PurePosixPath(path).parts
    if len(parts) == 2:
        name = parts[1]
        if not name.lower().endswith(".zip"):
            return None  # normalizer.json and other benchmark-level files
        return parts[0], name[: -len(".zip")]
    return parts[0], parts[1]


def _select(files: list[RemoteFile], tasks: Sequence[str] | None) -> list[RemoteFile]:
    in_bench = [f for f in files if _in_benchmark(f.path)]
    if not in_bench:
        raise DataError(
            "the source lists no GEO-Bench v1 files (classification_v1.0/, segmentation_v1.0/)",
            "check the source URL",
        )
    if not tasks:
        return sorted(in_bench, key=lambda f: f.path)
    by_task: dict[str, list[RemoteFile]] = {}
    for f in in_bench:
        bt = _task_of(f.path)
        if bt is not None:
            by_task.setdefault(task_key(bt[1]), []).append(f)
    chosen: list[RemoteFile] = []
    unknown = []
    for name in tasks:
        hit = by_task.get(task_key(name))
        if hit is None:
            unknown.append(name)
        else:
            chosen.extend(f for f in hit if f not in chosen)
    if unknown:
        have = sorted({_task_of(f.path)[1] for fs in by_task.values() for f in fs})  # type: ignore[index]
        raise DataError(
            f"GEO-Bench has no task(s) {unknown} (it has: {', '.join(have)})", "pass task names as listed"
        )
    return sorted(chosen, key=lambda f: f.path)


# ---------------------------------------------------------------------------------------------
# Transfers
# ---------------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def _http_fetch(
    url: str,
    part: Path,
    remote: RemoteFile,
    progress: ProgressFn | None,
    retries: int,
    retry_wait: float,
    timeout: float,
) -> None:
    """Fetch ``url`` into ``part``, resuming what ``part`` already holds."""
    failures = 0
    while True:
        start = part.stat().st_size if part.exists() else 0
        if remote.size is not None and start > remote.size:
            part.unlink()
            start = 0
        if remote.size is not None and start == remote.size:
            return
        headers = {"User-Agent": "deo-cli (GEO-Bench download)"}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout
            ) as resp:
                status = getattr(resp, "status", None)
                mode = "ab"
                if start and status != 206:
                    logger.info("%s: the server ignored the resume request; starting again", remote.path)
                    start, mode = 0, "wb"
                elif start and not _range_starts_at(resp.headers.get("Content-Range"), start):
                    start, mode = 0, "wb"
                    part.unlink(missing_ok=True)
                    continue
                if not start:
                    mode = "wb"
                length = resp.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                total = start + expected if expected is not None else remote.size
                got = 0
                with open(part, mode) as fh:
                    while True:
                        chunk = resp.read(_CHUNK)
                        if not chunk:
                            break
                        fh.write(chunk)
                        got += len(chunk)
                        if progress:
                            progress("download", remote.path, start + got, total)
                if expected is not None and got < expected:
                    raise _Interrupted(f"connection closed after {start + got} of {total} bytes")
                return
        except urllib.error.HTTPError as err:
            if err.code == 416 and start:
                return  # nothing left to fetch: the checksum decides
            if err.code in (401, 403, 404, 410):
                raise DataError(f"cannot download {url}: HTTP {err.code}", "check the source URL") from None
            error: Exception = err
        except (_Interrupted, urllib.error.URLError, OSError, http.client.HTTPException) as err:
            error = err
        failures += 1
        saved = part.stat().st_size if part.exists() else 0
        if failures > retries:
            raise DataError(
                f"download of {remote.path} failed after {failures} attempt(s) ({error}); {saved} bytes saved",
                _HINT_RERUN,
            )
        logger.warning("%s: %s; resuming (attempt %d of %d)", remote.path, error, failures + 1, retries + 1)
        time.sleep(retry_wait * failures)


def _range_starts_at(content_range: str | None, start: int) -> bool:
    m = re.match(r"bytes\s+(\d+)-", content_range or "")
    return bool(m) and int(m.group(1)) == start


def _hub_fetch(
    repo: str, revision: str | None, remote: RemoteFile, dest: Path, progress: ProgressFn | None
) -> None:
    import huggingface_hub

    kwargs: dict = {"repo_type": "dataset", "revision": revision, "local_dir": dest}
    tqdm_class = _progress_tqdm(remote.path, progress)
    if (
        tqdm_class is not None
        and "tqdm_class" in inspect.signature(huggingface_hub.hf_hub_download).parameters
    ):
        kwargs["tqdm_class"] = tqdm_class
    try:
        huggingface_hub.hf_hub_download(repo, remote.path, **kwargs)
    except _hub_errors() as err:
        raise DataError(
            f"download of {remote.path} from {repo} failed ({type(err).__name__}: {err})", _HINT_RERUN
        ) from None


def _progress_tqdm(path: str, progress: ProgressFn | None):
    """A silent tqdm class that reports huggingface_hub's byte counts to ``progress``."""
    if progress is None:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with huggingface_hub
        return None

    class _Report(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._total = kwargs.get("total")

        def update(self, n=1):
            self._done += n or 0
            progress("download", path, self._done, self._total)
            return super().update(n)

    return _Report


# ---------------------------------------------------------------------------------------------
# Checksums, completion markers
# ---------------------------------------------------------------------------------------------


def file_digest(path: Path, kind: str, progress: ProgressFn | None = None, label: str = "") -> str:
    """Hex digest of ``path``: ``sha256``, ``md5`` or ``git_sha1`` (git's blob id)."""
    size = path.stat().st_size
    if kind == "git_sha1":
        h = hashlib.sha1(f"blob {size}\0".encode())
    else:
        h = hashlib.new(kind)
    done = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress("verify", label or path.name, done, size)
    return h.hexdigest()


def _verify(path: Path, remote: RemoteFile, progress: ProgressFn | None) -> None:
    check = remote.checksum
    if check is None:
        path.unlink(missing_ok=True)
        raise DataError(f"{remote.path} has no published checksum", "deo does not use unverified data")
    kind, expected = check
    if remote.size is not None and path.stat().st_size != remote.size:
        got_size = path.stat().st_size
        path.unlink(missing_ok=True)
        raise DataError(
            f"{remote.path} is {got_size} bytes, the source says {remote.size}; the damaged file was deleted",
            _HINT_RERUN,
        )
    got = file_digest(path, kind, progress, remote.path)
    if got != expected:
        path.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {remote.path}: {kind} {got}, expected {expected}; the damaged file was deleted",
            _HINT_RERUN,
        )


def _marker(remote: RemoteFile, dest: Path) -> Path:
    local = dest / remote.path
    return local.with_name(f".{local.name}.done")


def _mark_done(remote: RemoteFile, dest: Path) -> None:
    check = remote.checksum
    _marker(remote, dest).write_text(
        json.dumps({"path": remote.path, "checksum": list(check) if check else None})
    )


def _is_complete(remote: RemoteFile, dest: Path) -> bool:
    local = dest / remote.path
    if local.suffix.lower() == ".zip":
        marker = _marker(remote, dest)
        if not marker.is_file():
            return False
        try:
            recorded = json.loads(marker.read_text()).get("checksum")
        except (OSError, ValueError):
            return False
        check = remote.checksum
        return check is not None and recorded == list(check)
    if not local.is_file():
        return False
    check = remote.checksum
    return check is not None and file_digest(local, check[0]) == check[1]


# ---------------------------------------------------------------------------------------------
# Safe extraction
# ---------------------------------------------------------------------------------------------


def _member_path(name: str, archive: Path) -> PurePosixPath:
    clean = name.replace("\\", "/")
    path = PurePosixPath(clean)
    if (
        not clean
        or clean.startswith("/")
        or path.is_absolute()
        or ".." in path.parts
        or re.match(r"^[A-Za-z]:", clean)
        or "\0" in clean
    ):
        raise DataError(
            f"{archive.name} contains an unsafe path {name!r}; nothing was extracted",
            "the archive is damaged or malicious; delete it and download again",
        )
    return path


def extract_zip(archive: Path, target: Path, progress: ProgressFn | None = None) -> list[Path]:
    """Extract ``archive`` into ``target`` safely; return the top-level entries it created.

    Every member is checked first (no absolute paths, ``..``, drive letters or symbolic
    links) and the archive must fit on the disk. Members go to a hidden temporary folder that
    is moved into place entry by entry, replacing leftovers of an earlier attempt. An archive
    whose files all sit at its top level is extracted into ``target/<archive stem>/``.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{archive} is not a readable zip ({err})", "delete it and download again") from None
    with zf:
        members = zf.infolist()
        paths = []
        for info in members:
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(
                    f"{archive.name} contains a symbolic link {info.filename!r}; nothing was extracted",
                    "the archive is damaged or malicious; delete it and download again",
                )
            paths.append(_member_path(info.filename, archive))
        total = sum(i.file_size for i in members)
        free = shutil.disk_usage(target).free
        if total > free:
            raise DataError(
                f"{archive.name} unpacks to {total / 1e9:.1f} GB but {target} has {free / 1e9:.1f} GB free",
                "free some space or choose another --dest",
            )
        if paths and all(len(p.parts) > 1 and p.parts[0] == target.name for p in paths):
            # zipped together with its benchmark folder: unpack beside, not inside, a second one
            paths = [PurePosixPath(*p.parts[1:]) for p in paths]
        flat = all(len(p.parts) == 1 for p in paths)
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".{archive.name}.extracting"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            for i, (info, path) in enumerate(zip(members, paths, strict=True), 1):
                out = tmp.joinpath(*path.parts)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                else:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
                if progress:
                    progress("extract", archive.name, i, len(members))
            moves = (
                [(tmp, target / archive.stem)]
                if flat
                else [(e, target / e.name) for e in sorted(tmp.iterdir())]
            )
            created = []
            for entry, final in moves:
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)
                elif final.exists() or final.is_symlink():
                    final.unlink()
                os.replace(entry, final)
                created.append(final)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise DataError(f"cannot extract {archive} ({err})", "delete it and download again") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return created
