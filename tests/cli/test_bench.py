"""`deo bench` end to end through the CLI: GEO-Bench classification and segmentation, OSCD,
throughput, resume, and the one-line errors (tiny model, random weights, 1-2 epochs)."""

import csv
import json

import pytest
from typer.testing import CliRunner

from deo_cli.bench.results import COLUMNS, GEOBENCH2_COLUMNS, GEOBENCH2_METRICS
from deo_cli.cli.app import app
from deo_cli.recipes import BenchRecipe, build_recipe
from deo_cli.sensors import DEO_S2_MANIFEST
from tests.data.make_geobench_task import write_geobench_task

runner = CliRunner()
TINY = ["-m", "deo_swin_test", "-w", "random", "--num-workers", "0", "--set", "bootstrap=200"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def gb_root(tmp_path, shared_data):
    """A GEO_BENCH_DIR holding the real brick_kiln fixture as classification_v1.0/m-brick-kiln."""
    root = tmp_path / "geobench"
    (root / "classification_v1.0").mkdir(parents=True)
    (root / "classification_v1.0" / "m-brick-kiln").symlink_to(shared_data / "geobench_brick_kiln_fixture")
    return root


def bench(*args):
    result = runner.invoke(app, ["bench", *args])
    return result


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_leaderboard_matches(out):
    """results_and_parameters.csv: GEO-Bench-2's columns, one row per results.csv row."""
    rows = read_csv(out / "results.csv")
    lb = read_csv(out / "results_and_parameters.csv")
    assert rows and len(lb) == len(rows) and list(lb[0]) == list(GEOBENCH2_COLUMNS)
    for x, r in zip(lb, rows):
        assert (x["backbone"], x["dataset"], x["Seed"], x["partition"], x["protocol"]) == (
            r["model"], r["dataset"], r["seed"], r["partition"], r["protocol"]
        )  # fmt: skip
        assert x["test metric"] == r["value"] and x["batch_size"] == r["batch_size"] and x["lr"] == r["lr"]
        assert x["Metric"] == GEOBENCH2_METRICS.get(r["metric"], r["metric"])
        assert x["experiment_name"].endswith(f"-limit{r['limit']}" if r["limit"] else r["recipe_hash"] + (
            "" if r["suite"] == "geobench" else f"-{r['suite']}"
        ))  # fmt: skip
    return lb


def assert_one_line(result, code, *needles):
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_geobench_brick_kiln_linear_and_knn(gb_root, tmp_path, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(gb_root))
    out = tmp_path / "run"
    r = bench("--suite", "geobench", "--tasks", "m-brick-kiln", "--protocol", "all", "--limit", "5", *TINY,
              "--set", "linear.epochs=2", "-o", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "results.csv")
    assert list(rows[0]) == list(COLUMNS)
    assert [(x["protocol"], x["metric"]) for x in rows] == [
        ("linear", "overall_accuracy"),
        ("knn", "overall_accuracy"),
    ]
    for row in rows:
        assert (
            row["model"] == "deo_swin_test"
            and row["weights"] == "random"
            and row["dataset"] == "m-brick-kiln"
        )
        assert row["task"] == "classification" and row["partition"] == "default" and row["seed"] == "0"
        # the reader's 13 named S2 bands, taken by name in DEO's order (docs/method.md §3.1)
        assert row["bands"].split(",") == list(DEO_S2_MANIFEST.bands)
        assert row["image_size"] == "64" and row["normalization"] == "band_stats-zscore"
        # the partition: train, valid and test all list the fixture's 5 samples
        assert (row["n_train"], row["n_val"], row["n_test"], row["limit"]) == ("5", "5", "5", "5")
        assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"])
        assert row["paper_value"] == ""  # brick-kiln is not in the paper
    # all five labels are 0 (SOURCE.md): every neighbour votes 0
    assert float(rows[1]["value"]) == 1.0
    assert rows[0]["lr"] == "0.001" and rows[0]["epochs"] == "2" and rows[0]["best_epoch"] in ("0", "1")
    assert json.loads((out / "results.json").read_text())[1]["value"] == 1.0
    recipe = build_recipe(BenchRecipe, file=out / "recipe.yaml")
    assert recipe.tasks == ["m-brick-kiln"] and recipe.linear.epochs == 2 and recipe.protocol == "all"
    log = (out / "run.log").read_text()
    assert "m-brick-kiln (classification, 2 classes)" in log and "knn seed 0" in log
    assert "m-brick-kiln" in r.stdout and "OA" in r.stdout
    lb = assert_leaderboard_matches(out)  # a --limit run too, its rows marked as a smoke run
    assert [x["protocol"] for x in lb] == ["linear", "knn"] and lb[0]["experiment_name"].endswith("-limit5")


def test_geobench_segmentation_task_upernet(tmp_path):
    written = write_geobench_task(tmp_path / "gb", "m-tiny-seg", kind="segmentation", size=32, n_samples=6)
    out = tmp_path / "run"
    r = bench("--suite", "geobench", "--data", str(tmp_path / "gb"), "--tasks", "m-tiny-seg", *TINY,
              "--set", "segmentation.epochs=1", "--set", "segmentation.warmup_epochs=0", "-o", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    (row,) = read_csv(out / "results.csv")
    assert (row["dataset"], row["task"], row["protocol"], row["metric"]) == (
        "m-tiny-seg",
        "segmentation",
        "upernet",
        "miou",
    )
    part = written.partitions["default"]
    assert (int(row["n_train"]), int(row["n_val"]), int(row["n_test"])) == tuple(
        len(part[s]) for s in ("train", "valid", "test")
    )
    assert row["bands"].split(",") == list(DEO_S2_MANIFEST.bands)  # 12-band S2 task without B10
    assert row["image_size"] == "32" and row["best_epoch"] == "0" and row["lr"] == "0.0001"
    assert 0.0 <= float(row["value"]) <= 1.0 and 0.0 <= float(row["val_value"]) <= 1.0
    assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"])
    (lb,) = assert_leaderboard_matches(out)
    assert lb["Metric"] == "Multiclass_Jaccard_Index" and lb["test metric"] == row["value"]


def test_oscd_subset_f1_rows(shared_data, tmp_path):
    out = tmp_path / "oscd"
    r = bench("--suite", "oscd", "--data", str(shared_data / "oscd_subset"), *TINY,
              "--set", "oscd.chip_size=192", "-b", "4", "-o", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "results.csv")
    cities = ["aguasclaras", "bercy", "bordeaux", "paris"]
    methods = ["zero-shot", "cva", "everything"]  # no --head: no supervised rows
    assert {x["partition"] for x in rows} == {*cities, "labelled"}  # the subset has no test labels
    assert [x["protocol"] for x in rows if x["partition"] == "labelled" and x["metric"] == "f1"] == methods
    pooled = {x["protocol"]: x for x in rows if x["partition"] == "labelled" and x["metric"] == "f1"}
    f1 = pooled["zero-shot"]
    assert f1["weights"] == "random" and f1["dataset"] == "oscd" and f1["task"] == "change_detection"
    assert f1["n_test"] == "4" and f1["paper_value"] == "0.604" and pooled["cva"]["paper_value"] == ""
    # deo_swin_test stages 1-3 (detect-change's default levels): 16 + 32 + 64 channels
    assert f1["image_size"] == "192" and f1["feature_dim"] == "112"
    assert float(f1["ci_low"]) <= float(f1["value"]) <= float(f1["ci_high"])
    # the trivial mask: recall 1, precision the change fraction, AUC 0.5
    every = {(x["partition"], x["metric"]): float(x["value"]) for x in rows if x["protocol"] == "everything"}
    for c in cities:
        assert every[(c, "recall")] == 1.0 and every[(c, "auc")] == 0.5
        assert every[(c, "precision")] == pytest.approx(every[(c, "change_fraction")])
    # deo's default threshold flags 0.75 % of each city (a percentile) and beats the trivial F1 pooled
    flagged = [
        float(x["value"]) for x in rows if x["metric"] == "flagged_fraction" and x["protocol"] == "cva"
    ]
    assert (
        all(0.006 < v < 0.009 for v in flagged) and float(pooled["cva"]["value"]) > every[("labelled", "f1")]
    )
    log = (out / "run.log").read_text()
    assert all(f"oscd {c}:" in log for c in cities)
    assert all(k in r.stdout for k in ("best-thr. F1", "AUC", "cva", "everything", "all (labelled)"))
    lb = assert_leaderboard_matches(out)
    assert lb[0]["experiment_name"].endswith("-oscd")


def test_oscd_table_per_city_and_method_with_a_head(tmp_path):
    """A synthetic OSCD folder with a planted change: every method's row per city, the
    supervised rows of a head (and a warning for the city it was trained on); CVA's AUC ~ 1."""
    from deo_cli.tasks.change.train import run_change_train
    from tests.tasks.change.test_change_train import train_recipe, write_oscd

    data = write_oscd(tmp_path / "data")
    head = run_change_train(train_recipe(data, "train_cities=alpha", "epochs=1"), tmp_path / "run").head
    out = tmp_path / "bench"
    r = bench("--suite", "oscd", "--data", str(data), "--tasks", "alpha,beta", "--head", str(head), *TINY,
              "--set", "oscd.chip_size=32", "-o", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "results.csv")
    cells = {(x["partition"], x["protocol"], x["metric"]): float(x["value"] or "nan") for x in rows}
    methods = ["zero-shot", "supervised", "cva", "everything"]
    for city in ("alpha", "beta", "selected"):
        for m in methods:
            for metric in (
                "f1",
                "precision",
                "recall",
                "iou",
                "auc",
                "best_f1",
                "flagged_fraction",
                "change_fraction",
            ):
                assert (city, m, metric) in cells, (city, m, metric)
        assert cells[(city, "cva", "auc")] > 0.99  # a bright new block in every band
        assert cells[(city, "cva", "best_f1")] > 0.95
        assert cells[(city, "everything", "auc")] == 0.5
    assert cells[("alpha", "supervised", "threshold")] == 0.5  # the head's threshold
    squeezed = " ".join(r.stderr.split())
    assert "was trained on alpha: its rows there are no test" in squeezed
    table = [ln for ln in r.stdout.splitlines() if "│" in ln]
    assert len(table) == 3 * len(methods)  # 2 cities and the pooled rows, one per method
    assert sum(" cva " in ln for ln in table) == 3 and sum("all (selected)" in ln for ln in table) == 4


def test_resume_skips_finished_rows(gb_root, tmp_path):
    out = tmp_path / "run"
    args = ["--suite", "geobench", "--data", str(gb_root), "--tasks", "m-brick-kiln", *TINY,
            "--set", "linear.epochs=1", "--set", "linear.augment=none", "-o", str(out)]  # fmt: skip
    r = bench(*args, "--seeds", "0")
    assert r.exit_code == 0, r.output
    first = read_csv(out / "results.csv")
    r = bench(*args, "--seeds", "0")
    assert_one_line(r, 1, "already holds benchmark results", "--resume")
    r = bench(*args, "--seeds", "0,1", "--resume")
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "results.csv")
    assert [x["seed"] for x in rows] == ["0", "1"] and rows[0] == first[0]  # seed 0 untouched
    assert "1 row(s) written, 1 unit(s) skipped" in r.stdout
    assert len(json.loads((out / "results.json").read_text())) == 2
    r = bench(*args, "--seeds", "0,1", "--resume")
    assert r.exit_code == 0 and "0 row(s) written, 2 unit(s) skipped" in r.stdout
    assert read_csv(out / "results.csv") == rows
    r = bench(*args, "--seeds", "1", "--overwrite")
    assert r.exit_code == 0 and [x["seed"] for x in read_csv(out / "results.csv")] == ["1"]


def test_throughput_rows(tmp_path):
    out = tmp_path / "tp"
    r = bench("--suite", "throughput", *TINY, "-b", "2", "--image-size", "32",
              "--set", "throughput.warmup=1", "--set", "throughput.iterations=2", "-o", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "results.csv")
    assert [x["metric"].split(":")[0] for x in rows] == ["images_per_s", "peak_memory_mib"]
    assert all(x["image_size"] == "32" and x["batch_size"] == "2" and x["n_test"] == "4" for x in rows)
    assert float(rows[0]["value"]) > 0 and float(rows[1]["value"]) > 10
    lb = assert_leaderboard_matches(out)
    assert [x["Metric"].split(":")[0] for x in lb] == ["images_per_s", "peak_memory_mib"]


def test_default_out_folder_and_resume_of_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "--suite",
        "throughput",
        *TINY,
        "-b",
        "1",
        "--image-size",
        "32",
        "--set",
        "throughput.iterations=1",
    ]
    r = bench(*args)
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "bench-results").glob("throughput-*")
    assert {p.name for p in run.iterdir()} == {
        "results.csv",
        "results.json",
        "results_and_parameters.csv",
        "recipe.yaml",
        "run.log",
    }
    r = bench(*args, "--resume")
    assert r.exit_code == 0 and "0 row(s) written, 1 unit(s) skipped" in r.stdout
    assert len(read_csv(run / "results.csv")) == 2


def test_missing_data_and_unknown_names_are_one_line(gb_root, tmp_path, monkeypatch):
    out = tmp_path / "never"
    monkeypatch.delenv("GEO_BENCH_DIR", raising=False)
    r = bench("--suite", "geobench", *TINY, "-o", str(out))
    assert_one_line(r, 1, "GEO_BENCH_DIR is not set", "deo bench download --suite geobench")
    monkeypatch.setenv("GEO_BENCH_DIR", str(tmp_path / "nowhere"))
    r = bench("--suite", "geobench", "--tasks", "m-eurosat", *TINY, "-o", str(out))
    assert_one_line(r, 1, "does not exist", "deo bench download --suite geobench --tasks m-eurosat")
    monkeypatch.setenv("GEO_BENCH_DIR", str(gb_root))
    r = bench("--suite", "geobench", "--tasks", "m-eurosat", *TINY, "-o", str(out))
    assert_one_line(r, 1, "'m-eurosat' not found", "deo bench download --suite geobench --tasks m-eurosat")
    r = bench("--suite", "geobench", "--tasks", "m-brick-kilm", *TINY, "-o", str(out))
    assert_one_line(r, 2, "unknown GEO-Bench task 'm-brick-kilm'", "Did you mean 'm-brick-kiln'?")
    r = bench("--suite", "geobnch", *TINY, "-o", str(out))
    assert_one_line(r, 2, "unknown benchmark suite 'geobnch'", "Did you mean 'geobench'?")
    r = bench(
        "--suite", "geobench", "--partition", "0.10x_train", *TINY, "--tasks", "m-brick-kiln", "-o", str(out)
    )
    assert_one_line(r, 1, "has no partition '0.10x_train'", "default")
    r = bench(
        "--suite", "geobench", "--protocol", "upernet", *TINY, "--tasks", "m-brick-kiln", "-o", str(out)
    )
    assert_one_line(r, 2, "runs protocol 'upernet'")
    r = bench("--suite", "oscd", *TINY, "-o", str(out))
    assert_one_line(r, 2, "needs --data")
    r = bench("--suite", "throughput", *TINY, "-w", str(tmp_path / "missing.pt"), "-o", str(out))
    assert r.exit_code == 1 and "missing.pt" in r.stderr and "Traceback" not in r.output
    r = bench("--suite", "throughput", *TINY, "--resume", "--overwrite", "-o", str(out))
    assert_one_line(r, 2, "--resume and --overwrite contradict")
    assert not out.exists()  # nothing is created before the inputs check out


def test_geobench_without_tasks_runs_what_is_on_disk_and_names_the_missing(gb_root, tmp_path, monkeypatch):
    """No --tasks: every task under $GEO_BENCH_DIR runs; the paper's missing tasks are one warning
    with the download command; a folder with no task is one error with that command."""
    monkeypatch.setenv("GEO_BENCH_DIR", str(gb_root))
    out = tmp_path / "run"
    r = bench("--suite", "geobench", "--limit", "5", *TINY, "--set", "linear.epochs=1", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert {x["dataset"] for x in read_csv(out / "results.csv")} == {"m-brick-kiln"}
    squeezed = "".join(r.stderr.split())  # rich wraps log lines at the terminal's width
    assert squeezed.count("8ofthepaper's8GEO-Benchtasksarenotunder") == 1, r.stderr
    assert "deobenchdownload--suitegeobench--tasksm-bigearthnet," in squeezed
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("GEO_BENCH_DIR", str(empty))
    r = bench("--suite", "geobench", "--limit", "5", *TINY, "-o", str(tmp_path / "run2"))
    assert_one_line(r, 1, "no GEO-Bench task is under", "deo bench download --suite geobench --tasks")
    assert not (tmp_path / "run2").exists()
