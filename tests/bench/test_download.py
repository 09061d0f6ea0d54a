"""GEO-Bench download against a local HTTP server on 127.0.0.1 (and a faked hub): resume,
checksums, safe extraction. No real network."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import threading
import urllib.parse
import zipfile
from pathlib import Path

import pytest

from deo_cli.bench import download as dl
from deo_cli.bench.download import download_geobench, extract_zip, file_digest
from deo_cli.data.geobench import open_task
from deo_cli.errors import DataError
from tests.data.make_geobench_task import write_geobench_task

# ---------------------------------------------------------------------------------------------
# A small file server with HTTP Range support and injectable connection drops
# ---------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        rel = urllib.parse.unquote(self.path.lstrip("/"))
        srv.log.append((rel, self.headers.get("Range")))
        path = srv.root / rel
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cuts.get(rel)
        if cut:  # drop the connection after `cut` bytes, the first len(cuts[rel]) times
            srv.cuts[rel] = cut[1:]
            self.wfile.write(body[: cut[0]])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class FileServer:
    def __init__(self, root: Path):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.root = root
        self.httpd.log = []
        self.httpd.cuts = {}
        self.httpd.ranges = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def requests(self, rel: str) -> list[str | None]:
        return [r for p, r in self.httpd.log if p == rel]


@pytest.fixture
def mirror(tmp_path):
    """A GEO-Bench-like mirror: two task zips and a SHA256SUMS manifest, served on 127.0.0.1."""
    src = tmp_path / "src"
    write_geobench_task(src, "m-brick-kiln", kind="classification", n_samples=4, size=8)
    write_geobench_task(src, "m-cashew-plant", kind="segmentation", n_samples=4, size=8)
    root = tmp_path / "www"
    for bench, task in (("classification_v1.0", "m-brick-kiln"), ("segmentation_v1.0", "m-cashew-plant")):
        (root / bench).mkdir(parents=True)
        with zipfile.ZipFile(root / bench / f"{task}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted((src / bench / task).iterdir()):
                zf.write(f, f"{task}/{f.name}")
    (root / "segmentation_v1.0" / "normalizer.json").write_text('{"m-cashew-plant": {}}')
    write_manifest(root)
    server = FileServer(root)
    server.thread.start()
    yield server, root
    server.httpd.shutdown()
    server.httpd.server_close()


def write_manifest(root: Path, kind: str = "sha256", corrupt: str | None = None) -> None:
    lines = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.parent != root:
            digest = hashlib.new(kind, f.read_bytes()).hexdigest()
            rel = f.relative_to(root).as_posix()
            if rel == corrupt:
                digest = "0" * len(digest)
            lines.append(f"{digest}  {rel}")
    name = "SHA256SUMS" if kind == "sha256" else "MD5SUMS"
    for old in ("SHA256SUMS", "MD5SUMS"):
        (root / old).unlink(missing_ok=True)
    (root / name).write_text("\n".join(lines) + "\n")


ZIP = "classification_v1.0/m-brick-kiln.zip"
SEG_ZIP = "segmentation_v1.0/m-cashew-plant.zip"


# ---------------------------------------------------------------------------------------------
# Mirror (urllib) path
# ---------------------------------------------------------------------------------------------


def test_download_verifies_extracts_and_opens(mirror, tmp_path):
    server, _ = mirror
    dest = tmp_path / "geobench"
    events = []
    result = download_geobench(dest, base_url=server.url, progress=lambda *e: events.append(e), retry_wait=0)
    assert sorted(result.fetched) == sorted([ZIP, SEG_ZIP, "segmentation_v1.0/normalizer.json"])
    assert [p.name for p in result.tasks] == ["m-brick-kiln", "m-cashew-plant"]
    assert not (dest / ZIP).exists() and (dest / "classification_v1.0" / ".m-brick-kiln.zip.done").is_file()
    assert not list(dest.rglob("*.part")) and not list(dest.rglob("*.extracting"))
    task = open_task("m-cashew-plantation", root=dest)
    assert task.kind == "segmentation" and task.load_sample("sample_000").label.shape == (8, 8)
    assert open_task("m-brick-kiln", root=dest).load_sample("sample_001").label == 1
    stages = {e[0] for e in events}
    assert stages == {"download", "verify", "extract"}

    # A rerun finds everything complete: only the manifest is fetched again.
    server.httpd.log.clear()
    again = download_geobench(dest, base_url=server.url, retry_wait=0)
    assert again.fetched == [] and sorted(again.skipped) == sorted(result.fetched)
    assert [p for p, _ in server.httpd.log] == ["SHA256SUMS"]


def test_download_selected_tasks_only(mirror, tmp_path):
    server, _ = mirror
    dest = tmp_path / "geobench"
    result = download_geobench(dest, tasks=["cashew_plantation"], base_url=server.url, retry_wait=0)
    assert result.fetched == [SEG_ZIP]
    assert server.requests(ZIP) == []
    with pytest.raises(DataError, match=r"no task\(s\) \['m-eurosat'\].*m-brick-kiln"):
        download_geobench(dest, tasks=["m-eurosat"], base_url=server.url)


def test_resume_after_interrupted_download(mirror, tmp_path):
    server, root = mirror
    dest = tmp_path / "geobench"
    size = (root / ZIP).stat().st_size
    server.httpd.cuts[ZIP] = [1000]
    with pytest.raises(DataError, match="1000 bytes saved.*resume"):
        download_geobench(dest, tasks=["m-brick-kiln"], base_url=server.url, retries=0, retry_wait=0)
    part = dest / (ZIP + ".part")
    assert part.stat().st_size == 1000 and not (dest / "classification_v1.0" / "m-brick-kiln").exists()

    # The next call resumes at byte 1000 with a Range request and completes.
    result = download_geobench(dest, tasks=["m-brick-kiln"], base_url=server.url, retries=0, retry_wait=0)
    assert result.fetched == [ZIP]
    assert server.requests(ZIP) == [None, "bytes=1000-"]
    assert not part.exists()
    assert open_task(dest / "classification_v1.0" / "m-brick-kiln").load_sample("sample_003").label == 0
    assert size > 1000


def test_retries_resume_within_one_call(mirror, tmp_path):
    server, _ = mirror
    dest = tmp_path / "geobench"
    server.httpd.cuts[ZIP] = [700, 300]
    result = download_geobench(dest, tasks=["m-brick-kiln"], base_url=server.url, retries=3, retry_wait=0)
    assert result.fetched == [ZIP]
    assert server.requests(ZIP) == [None, "bytes=700-", "bytes=1000-"]


def test_server_without_ranges_restarts_from_zero(mirror, tmp_path):
    server, root = mirror
    dest = tmp_path / "geobench"
    server.httpd.ranges = False
    server.httpd.cuts[ZIP] = [500]
    result = download_geobench(dest, tasks=["m-brick-kiln"], base_url=server.url, retries=1, retry_wait=0)
    assert result.fetched == [ZIP]
    assert server.requests(ZIP) == [None, "bytes=500-"]  # asked to resume, got the whole file
    assert (dest / "classification_v1.0" / "m-brick-kiln" / "task_specs.pkl").is_file()


def test_checksum_mismatch_deletes_and_raises(mirror, tmp_path):
    server, root = mirror
    dest = tmp_path / "geobench"
    write_manifest(root, corrupt=ZIP)
    with pytest.raises(DataError, match="checksum mismatch for classification_v1.0/m-brick-kiln.zip"):
        download_geobench(dest, tasks=["m-brick-kiln"], base_url=server.url, retry_wait=0)
    assert not list((dest / "classification_v1.0").iterdir())  # no zip, no .part, no task folder
    write_manifest(root)
    assert download_geobench(dest, tasks=["m-brick-kiln"], base_url=server.url).fetched == [ZIP]


def test_md5_manifest_and_missing_manifest(mirror, tmp_path):
    server, root = mirror
    write_manifest(root, kind="md5")
    result = download_geobench(tmp_path / "a", tasks=["m-brick-kiln"], base_url=server.url)
    assert result.fetched == [ZIP]
    (root / "MD5SUMS").unlink()
    with pytest.raises(DataError, match="no checksum manifest"):
        download_geobench(tmp_path / "b", base_url=server.url)


def test_file_url_mirror(mirror, tmp_path):
    _, root = mirror
    result = download_geobench(tmp_path / "c", tasks=["m-cashew-plant"], base_url=root.as_uri())
    assert result.fetched == [SEG_ZIP] and [p.name for p in result.tasks] == ["m-cashew-plant"]


def test_destination_defaults_to_geo_bench_dir(mirror, tmp_path, monkeypatch):
    server, _ = mirror
    monkeypatch.delenv("GEO_BENCH_DIR", raising=False)
    with pytest.raises(DataError, match="GEO_BENCH_DIR is not set"):
        download_geobench(base_url=server.url)
    monkeypatch.setenv("GEO_BENCH_DIR", str(tmp_path / "env"))
    assert download_geobench(tasks=["m-brick-kiln"], base_url=server.url).dest == tmp_path / "env"
    assert (tmp_path / "env" / "classification_v1.0" / "m-brick-kiln").is_dir()


# ---------------------------------------------------------------------------------------------
# Safe extraction
# ---------------------------------------------------------------------------------------------


def _zip_with(tmp_path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16  # a symbolic link
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    "members,link",
    [
        ({"ok/a.txt": b"1", "../evil.txt": b"x"}, None),
        ({"ok/a.txt": b"1", "/tmp/evil_abs.txt": b"x"}, None),
        ({"ok/a.txt": b"1", "ok/../../evil.txt": b"x"}, None),
        ({"ok/a.txt": b"1", "C:/evil.txt": b"x"}, None),
        ({"ok/a.txt": b"1"}, "ok/link"),
    ],
)
def test_extract_rejects_unsafe_members(tmp_path, members, link):
    archive = _zip_with(tmp_path, members, link)
    target = tmp_path / "out" / "inner"
    target.mkdir(parents=True)
    with pytest.raises(DataError, match="unsafe path|symbolic link"):
        extract_zip(archive, target)
    assert list(target.iterdir()) == []  # nothing extracted, not even the safe member
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_extract_flat_archive_goes_into_its_own_folder(tmp_path):
    archive = tmp_path / "m-flat.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("task_specs.pkl", b"x")
        zf.writestr("default_partition.json", b"{}")
    created = extract_zip(archive, tmp_path)
    assert created == [tmp_path / "m-flat"]
    assert sorted(p.name for p in (tmp_path / "m-flat").iterdir()) == [
        "default_partition.json",
        "task_specs.pkl",
    ]


def test_extract_archive_holding_its_benchmark_folder(tmp_path):
    target = tmp_path / "classification_v1.0"
    target.mkdir()
    archive = target / "m-x.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("classification_v1.0/m-x/task_specs.pkl", b"x")
    assert extract_zip(archive, target) == [target / "m-x"]
    assert (target / "m-x" / "task_specs.pkl").read_bytes() == b"x"


def test_unsafe_member_in_downloaded_zip_is_refused(mirror, tmp_path):
    server, root = mirror
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m-brick-kiln/task_specs.pkl", b"x")
        zf.writestr("../../escaped.txt", b"x")
    (root / ZIP).write_bytes(buf.getvalue())
    write_manifest(root)
    dest = tmp_path / "geobench"
    with pytest.raises(DataError, match="unsafe path"):
        download_geobench(dest, tasks=["m-brick-kiln"], base_url=server.url)
    assert not (tmp_path / "escaped.txt").exists() and not (dest / "escaped.txt").exists()
    assert not (dest / "classification_v1.0" / "m-brick-kiln").exists()


# ---------------------------------------------------------------------------------------------
# Hub path (huggingface_hub faked: same listing and download calls, no network)
# ---------------------------------------------------------------------------------------------


class _Lfs:
    def __init__(self, sha256: str):
        self.sha256 = sha256


class _RepoFile:
    def __init__(self, path: str, data: bytes, lfs: bool):
        self.path = path
        self.size = len(data)
        self.blob_id = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        self.lfs = _Lfs(hashlib.sha256(data).hexdigest()) if lfs else None


def test_hub_source_checks_lfs_sha256_and_git_blob_ids(mirror, tmp_path, monkeypatch):
    import huggingface_hub

    _, root = mirror
    files = {
        ZIP: ((root / ZIP).read_bytes(), True),
        "segmentation_v1.0/normalizer.json": (b'{"a": 1}', False),
        "README.md": (b"# GEO-Bench", False),
    }
    calls = []

    class FakeApi:
        def list_repo_tree(self, repo_id, recursive=False, repo_type=None, revision=None, **kw):
            calls.append(("list", repo_id, revision, repo_type))
            return [_RepoFile(p, d, lfs) for p, (d, lfs) in files.items()]

    served = {p: d for p, (d, _) in files.items()}

    def fake_download(repo_id, filename, *, repo_type=None, revision=None, local_dir=None, **kw):
        calls.append(("get", repo_id, filename, revision))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(served[filename])
        return str(out)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    dest = tmp_path / "hub"
    result = download_geobench(dest)
    assert calls[0] == ("list", "recursix/geo-bench-1.0", dl.GEOBENCH_HF_REVISION, "dataset")
    assert sorted(result.fetched) == [ZIP, "segmentation_v1.0/normalizer.json"]  # README.md is not data
    assert [p.name for p in result.tasks] == ["m-brick-kiln"]
    assert (
        file_digest(dest / "segmentation_v1.0/normalizer.json", "git_sha1")
        == _RepoFile("x", b'{"a": 1}', False).blob_id
    )

    # A corrupted transfer is deleted and reported.
    served[ZIP] = served[ZIP][:-10] + b"0123456789"
    with pytest.raises(DataError, match="checksum mismatch"):
        download_geobench(tmp_path / "hub2", base_url="hf://datasets/recursix/geo-bench-1.0@main")
    assert calls[-1] == ("get", "recursix/geo-bench-1.0", ZIP, "main")
    assert not (tmp_path / "hub2" / ZIP).exists()
