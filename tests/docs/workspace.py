"""The folder the README's commands run in: its placeholder files made from ../shared/data.

README commands name files a user would have (``scene.tif``, ``imgs/``, ``classes.yaml``...).
:func:`build_workspace` makes each from the real Sentinel-2 data beside the checkout, puts a
Hugging Face cache where ``--weights default`` and the default optical teacher find their files
(a tiny checkpoint in the official DEO layout under the pinned revision; a random DINOv3 ViT-B/16
in timm's layout), a ``$GEO_BENCH_DIR`` with the brick-kiln fixture, and serves a GEO-Bench
mirror on 127.0.0.1 for ``deo bench download`` and a STAC API on 127.0.0.1 for ``deo embed --stac``
(the OSCD Paris dates as items, also saved as ``items.json``). Each command runs in its own folder
(:meth:`Workspace.folder`) that links to these, so commands that write the same output name
(``change.tif``) do not collide, while ``runs/`` is shared so one command can use another's run.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import rasterio

from tests.docs.readme import ROOT

#: The files every command folder links to (made once in ``inputs/``).
PLACEHOLDERS = (
    "scene.tif",
    "a.tif",
    "b.tif",
    "before.tif",
    "after.tif",
    "big.vrt",
    "imgs",
    "labels",
    "classes.yaml",
    "pairs.csv",
    "fmow_sentinel.csv",
    "items.json",
)

#: eo-learn's land-cover classes present in the patch (eolearn_testeopatch/SOURCE.md).
LULC = {1: ("cultivated land", "#ffff00"), 2: ("forest", "#054907"), 3: ("grassland", "#ffa500"),
        4: ("shrubland", "#806000"), 8: ("artificial surface", "#dc143c")}  # fmt: skip


@dataclass
class Workspace:
    root: Path
    env: dict
    ctx: dict = field(default_factory=dict)
    servers: list = field(default_factory=list)
    done: dict = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        """A fresh folder for one command, with the placeholders, ``runs/``, ``recipes/`` and
        ``../shared`` reachable as a user at the repository root would have them."""
        d = self.root / "cmd" / name
        d.mkdir(parents=True, exist_ok=True)
        links = {p: self.root / "inputs" / p for p in PLACEHOLDERS}
        links.update({"runs": self.root / "runs", "recipes": ROOT / "recipes"})
        for name_, target in links.items():
            if not (d / name_).exists():
                (d / name_).symlink_to(target)
        return d

    def run(self, text: str, folder: Path, timeout: float) -> subprocess.CompletedProcess:
        """``text`` through bash in ``folder`` with the workspace's environment."""
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", text],
            cwd=folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_once(self, text: str, name: str, timeout: float) -> tuple[Path, subprocess.CompletedProcess]:
        """``text`` in the folder ``name``, run once per session: a README command and a test of
        the same line (tests/docs/test_design_lines.py) share one run and its outputs."""
        if text not in self.done:
            folder = self.folder(name)
            self.done[text] = (folder, self.run(text, folder, timeout))
        return self.done[text]

    def close(self) -> None:
        for s in self.servers:
            s.httpd.shutdown()
            s.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_workspace(root: Path, shared_data: Path) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cmd").mkdir(exist_ok=True)
    (root / "runs").mkdir(exist_ok=True)
    # ../shared/data as seen from a command folder (root/cmd/NAME/../shared is root/cmd/shared)
    if not (root / "cmd" / "shared").exists():
        (root / "cmd" / "shared").symlink_to(shared_data.parent)
    inputs = root / "inputs"
    inputs.mkdir(exist_ok=True)
    _scenes(inputs, shared_data)
    _labels(inputs, shared_data)
    _manifest(inputs, shared_data)
    _user_model(root / "runs" / "t" / "model.pt")
    hf = root / "hf"
    _official_weights(hf)
    _teacher_weights(hf)
    gb = root / "geobench"
    _geobench(gb, shared_data)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HOME": str(hf),
        "HF_HUB_OFFLINE": "1",
        "GEO_BENCH_DIR": str(gb),
        "RANK": "0",
        "MASTER": "127.0.0.1",
        "COLUMNS": "200",
        "PYTHONWARNINGS": "ignore",
    }
    ws = Workspace(root, env)
    mirror = _mirror(root / "mirror")
    ws.servers.append(mirror)
    stac = _stac(inputs, root / "stac-api", shared_data)
    ws.servers.append(stac)
    import torch

    ws.ctx = {
        "port": free_port(),
        "mirror": mirror.url,
        "stac": stac.url,
        "cuda": torch.cuda.is_available(),
        # runs/ of every command folder is root/runs
        "last_checkpoint": lambda run: f"{run}/{max((root / run).glob('checkpoint-*.pt')).name}",
    }
    return ws


# ---------------------------------------------------------------------------------------------
# Placeholder files
# ---------------------------------------------------------------------------------------------


def _scenes(inputs: Path, shared: Path) -> None:
    """``scene.tif``, ``a.tif`` (eo-learn scene 2), ``b.tif`` (scene 3): 13-band reflectance
    GeoTIFFs; ``before.tif``/``after.tif``: the OSCD Paris pair as 13-band GeoTIFFs; ``big.vrt``."""
    from tests.tasks.segment.test_segment import write_eolearn

    for name, scene in (("scene.tif", 2), ("a.tif", 2), ("b.tif", 3)):
        image, _ = write_eolearn(shared, inputs / f".eolearn{scene}", scene=scene)
        if not (inputs / name).exists():
            os.link(image, inputs / name)
    for name, folder in (("before.tif", "imgs_1"), ("after.tif", "imgs_2")):
        _stack(sorted((shared / "oscd_subset" / "images" / "paris" / folder).glob("*.tif")), inputs / name)
    _vrt(inputs / "scene.tif", inputs / "big.vrt")


def _stack(files: list[Path], out: Path) -> None:
    """Single-band files of one grid -> one multi-band GeoTIFF, band descriptions from the names."""
    with rasterio.open(files[0]) as ref:
        profile = {"driver": "GTiff", "width": ref.width, "height": ref.height, "crs": ref.crs,
                   "transform": ref.transform, "count": len(files), "dtype": ref.dtypes[0]}  # fmt: skip
    with rasterio.open(out, "w", **profile) as dst:
        for i, f in enumerate(files, 1):
            with rasterio.open(f) as src:
                dst.write(src.read(1, out_shape=(profile["height"], profile["width"])), i)
            dst.set_band_description(i, f.stem.rsplit("_", 1)[-1])


def _vrt(path: Path, out: Path) -> None:
    """A GDAL VRT over ``path`` (GDAL's own CreateCopy into the VRT driver)."""
    import rasterio.shutil

    if not out.exists():
        rasterio.shutil.copy(path, out, driver="VRT")


def _labels(inputs: Path, shared: Path) -> None:
    """``imgs/`` + ``labels/`` (the five eo-learn scenes of the patch and its land-cover map,
    matched by name), ``pairs.csv`` naming the same pairs, ``classes.yaml`` with names and colours."""
    from tests.tasks.segment.test_segment import write_eolearn

    pairs = []
    for scene in range(5):
        image, label = write_eolearn(shared, inputs / f".eolearn{scene}", scene=scene)
        for sub, src in (("imgs", image), ("labels", label)):
            (inputs / sub).mkdir(exist_ok=True)
            if not (inputs / sub / f"patch{scene}.tif").exists():
                os.link(src, inputs / sub / f"patch{scene}.tif")
        pairs.append([str(image), str(label)])
    with open(inputs / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        w.writerows(pairs)
    lines = ["classes:", *(f'  {v}: {{name: "{n}", color: "{c}"}}' for v, (n, c) in LULC.items())]
    (inputs / "classes.yaml").write_text("\n".join([*lines, "ignore_index: 0"]) + "\n")


def _manifest(inputs: Path, shared: Path) -> None:
    """``fmow_sentinel.csv``: a pretraining manifest (``ms_path``) over the BigEarthNet patches."""
    folders = sorted(p for p in (shared / "bigearthnet_s2_example").iterdir() if p.is_dir())
    with open(inputs / "fmow_sentinel.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ms_path"])
        w.writerows([[str(p)] for p in folders])


def _user_model(path: Path) -> None:
    """``runs/t/model.pt``: a deo_swin_t encoder file as ``deo pretrain export`` writes it."""
    if path.exists():
        return
    import torch

    from deo_cli.models import build_encoder
    from deo_cli.models.weights import save_encoder

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_encoder(build_encoder("deo_swin_t", weights=None), path)


def _stac(inputs: Path, www: Path, shared: Path):
    """``items.json``: an ItemCollection of the two OSCD Paris dates as Sentinel-2 items of summer
    2024 (COGs made from the band files); and a STAC API on 127.0.0.1 serving the same items, for
    ``deo embed --stac URL --collection sentinel-2-l2a --bbox ... --datetime 2024-06/2024-08``."""
    from tests.io.stac_fixtures import paris_items, serve_items, write_item_collection

    if not (inputs / "items.json").exists():
        write_item_collection(paris_items(shared, inputs / ".stac"), inputs / "items.json")
    return serve_items(shared, www, make=paris_items)


# ---------------------------------------------------------------------------------------------
# Weights in a Hugging Face cache
# ---------------------------------------------------------------------------------------------


def _hf_file(hf: Path, repo: str, revision: str, filename: str) -> Path:
    """Where ``hf_hub_download(repo, filename, revision)`` finds a file offline; ``revision``
    ``main`` also gets its ref."""
    folder = hf / "hub" / f"models--{repo.replace('/', '--')}"
    commit = revision if len(revision) == 40 else "0" * 40
    if len(revision) != 40:
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / revision).write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _official_weights(hf: Path) -> None:
    """``DEO_swin_b.pth`` at deo's pinned revision, in the release's layout (torchvision's Swin-B,
    window 12, under ``feat_extr.``), with random weights: what ``--weights default`` finds."""
    import torch

    from deo_cli.models.registry import DEO_SWIN_B_WEIGHTS
    from deo_cli.models.weights import parse_hf_uri
    from tests.models.test_official_weights import SWIN_B, ReferenceDeo

    ref = parse_hf_uri(DEO_SWIN_B_WEIGHTS)
    path = _hf_file(hf, ref.repo_id, ref.revision, ref.filename)
    if not path.exists():
        torch.manual_seed(0)
        torch.save(ReferenceDeo(**SWIN_B).state_dict(), path)


def _teacher_weights(hf: Path) -> None:
    """timm's DINOv3 ViT-B/16 (the default optical teacher) with random weights, where
    ``timm.create_model(..., pretrained=True)`` finds it offline."""
    import timm
    import torch
    from safetensors.torch import save_file

    from deo_cli.models.teachers import DEFAULT_TEACHER, get_teacher_spec

    spec = get_teacher_spec(DEFAULT_TEACHER)
    path = _hf_file(hf, f"timm/{spec.timm_name}", "main", "model.safetensors")
    if path.exists():
        return
    torch.manual_seed(0)
    model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


# ---------------------------------------------------------------------------------------------
# GEO-Bench: $GEO_BENCH_DIR and a mirror to download from
# ---------------------------------------------------------------------------------------------


def _geobench(gb: Path, shared: Path) -> None:
    """The brick-kiln fixture (classification) and a generated m-cashew-plant (segmentation)."""
    from tests.data.make_geobench_task import write_geobench_task

    kiln = gb / "classification_v1.0" / "m-brick-kiln"
    kiln.parent.mkdir(parents=True, exist_ok=True)
    if not kiln.exists():
        kiln.symlink_to(shared / "geobench_brick_kiln_fixture")
    if not (gb / "segmentation_v1.0" / "m-cashew-plant").exists():
        write_geobench_task(gb, "m-cashew-plant", kind="segmentation", n_samples=8, size=32)


def _mirror(root: Path):
    """The tasks ``deo bench download`` names in the README, served on 127.0.0.1."""
    from tests.bench.test_download import FileServer, write_manifest
    from tests.data.make_geobench_task import write_geobench_task

    src, www = root / "src", root / "www"
    for task, kind in (("m-eurosat", "classification"), ("m-bigearthnet", "classification")):
        bench = f"{kind}_v1.0"
        zpath = www / bench / f"{task}.zip"
        if zpath.exists():
            continue
        write_geobench_task(src, task, kind=kind, n_samples=12, size=16, multilabel=task == "m-bigearthnet")
        zpath.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted((src / bench / task).iterdir()):
                zf.write(f, f"{task}/{f.name}")
    write_manifest(www)
    server = FileServer(www)
    server.thread.start()
    return server
