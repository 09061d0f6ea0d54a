"""Result rows: torchgeo-bench columns first, typed round trip, JSON copy, resume keys, GEO-Bench-2 view."""

import csv
import json

import pytest

from deo_cli.bench.results import (
    COLUMNS,
    GEOBENCH2_COLUMNS,
    KEY_COLUMNS,
    TORCHGEO_BENCH_COLUMNS,
    ResultsStore,
    geobench2_rows,
    summarize,
    unit_key,
)


def _row(**kw):
    base = {
        "suite": "geobench",
        "model": "deo_swin_test",
        "weights": "random",
        "dataset": "m-eurosat",
        "task": "classification",
        "protocol": "linear",
        "partition": "default",
        "seed": 0,
        "bands": "B04,B03,B02",
        "image_size": 64,
        "normalization": "band_stats-zscore",
        "metric": "overall_accuracy",
        "value": 0.5,
        "ci_low": 0.4,
        "ci_high": 0.6,
        "n_test": 10,
        "lr": 0.01,
        "batch_size": 64,
        "weight_decay": 0.01,
        "paper_value": 0.97,
    }
    base.update(kw)
    return base


def test_columns_start_with_torchgeo_bench_and_keys_are_columns():
    assert COLUMNS[:12] == (
        "model",
        "dataset",
        "task",
        "metric",
        "value",
        "partition",
        "seed",
        "bands",
        "image_size",
        "normalization",
        "ci_low",
        "ci_high",
    )
    assert TORCHGEO_BENCH_COLUMNS == COLUMNS[:12]
    assert set(KEY_COLUMNS) <= set(COLUMNS) and len(set(COLUMNS)) == len(COLUMNS)


def test_append_round_trip_json_copy_and_done(tmp_path):
    store = ResultsStore(tmp_path / "run")
    store.append([_row(), _row(seed=1, value=0.7)])
    store.append([_row(dataset="m-so2sat", value=float("nan"), paper_value=None)])
    with store.csv_path.open() as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == COLUMNS and len(lines) == 4  # one header, then rows
    rows = store.rows()
    assert rows[0]["seed"] == 0 and rows[0]["image_size"] == 64 and rows[0]["value"] == 0.5
    assert rows[0]["bands"] == "B04,B03,B02"  # a comma inside a cell survives
    assert rows[2]["value"] is None and rows[2]["paper_value"] is None  # NaN and None -> empty
    assert json.loads(store.json_path.read_text()) == rows
    assert store.done() == {unit_key(r) for r in rows} and len(store.done()) == 3
    assert unit_key(_row(metric="iou", value=0.1)) in store.done()  # the metric is no part of the key
    with pytest.raises(ValueError, match="unknown result columns"):
        store.append([{**_row(), "colour": "red"}])


def test_geobench2_view_and_clear(tmp_path):
    store = ResultsStore(tmp_path)
    store.append([_row(), _row(protocol="knn"), _row(metric="micro_f1", dataset="m-bigearthnet", limit=5)])
    store.append([_row(suite="oscd", dataset="oscd", protocol="zero-shot", metric="f1", lr=None)])
    lb = list(csv.DictReader(store.geobench2_path.open()))
    assert tuple(lb[0]) == GEOBENCH2_COLUMNS
    assert len(lb) == 4  # one for one with results.csv, every suite
    assert [x["Metric"] for x in lb] == ["Overall_Accuracy", "Overall_Accuracy", "Multilabel_F1_Score", "f1"]
    assert [x["protocol"] for x in lb] == ["linear", "knn", "linear", "zero-shot"]
    assert all(x["frozen_or_full_ft"] == "frozen" for x in lb)
    assert float(lb[0]["test metric"]) == 0.5 and lb[0]["Seed"] == "0" and lb[3]["lr"] == ""
    assert lb[0]["experiment_name"] == "deo-bench-deo_swin_test-None"
    assert lb[2]["experiment_name"].endswith("-limit5")  # a smoke run, no leaderboard entry
    assert lb[3]["experiment_name"].endswith("-oscd") and lb[3]["dataset"] == "oscd"
    assert geobench2_rows([_row(metric="miou")])[0]["Metric"] == "Multiclass_Jaccard_Index"
    assert geobench2_rows([_row(metric="micro_f1")])[0]["Metric"] == "Multilabel_F1_Score"
    store.clear()
    assert not any(p.exists() for p in (store.csv_path, store.json_path, store.geobench2_path))


def test_summarize_averages_seeds():
    rows = [_row(value=0.5, ci_low=0.4, ci_high=0.6), _row(seed=1, value=0.7, ci_low=0.6, ci_high=0.8)]
    rows.append(_row(protocol="knn", value=0.9))
    s = summarize(rows)
    assert [x.protocol for x in s] == ["linear", "knn"]
    assert s[0].seeds == 2 and s[0].value == pytest.approx(0.6) and s[0].ci_low == pytest.approx(0.5)
    assert s[0].std == pytest.approx(0.1414, abs=1e-3) and s[0].paper_value == 0.97
    assert s[1].seeds == 1 and s[1].std == 0.0
