"""Zero-shot OSCD scoring: counts of ``score > Otsu`` against the label, nodata left out; the plan."""

import numpy as np
import pytest

from deo_cli.bench.oscd import change_counts, plan_oscd
from deo_cli.errors import DataError, UsageError
from deo_cli.recipes import BenchRecipe, build_recipe


def test_change_counts_with_otsu_and_nodata():
    rng = np.random.default_rng(0)
    score = rng.normal(0.1, 0.01, (40, 50))
    label = np.zeros((40, 50), np.uint8)
    label[10:20, 10:20] = 1
    score[10:20, 10:20] = 0.8  # the changed block scores high
    score[30:35, 0:5] = 0.8  # a false alarm
    label[0:2, 0:2] = 1  # a missed change
    score[39, :] = np.nan  # nodata: neither counted nor thresholded
    label[39, :] = 1
    (tp, fp, fn), thr = change_counts(score, label)
    assert 0.15 < thr < 0.75
    assert (tp, fp, fn) == (100, 25, 4)


def test_plan_cities_and_errors(shared_data):
    root = shared_data / "oscd_subset"
    plan = plan_oscd(
        build_recipe(BenchRecipe, flags={"suite": "oscd", "data": str(root), "model.name": "deo_swin_test"})
    )
    # the subset holds only training labels: every labelled city, detect-change's default levels
    assert [c.name for c in plan.cities] == ["aguasclaras", "bercy", "bordeaux", "paris"]
    assert plan.partition == "labelled" and plan.layers == [0, 1, 2]
    flags = {
        "suite": "oscd",
        "data": str(root),
        "model.name": "deo_swin_test",
        "tasks": "paris,bercy",
        "limit": 1,
    }
    plan = plan_oscd(build_recipe(BenchRecipe, sets=["oscd.layers=[0,3]"], flags=flags))
    assert (
        [c.name for c in plan.cities] == ["paris"] and plan.partition == "selected" and plan.layers == [0, 3]
    )
    with pytest.raises(UsageError, match="out of range"):
        plan_oscd(build_recipe(BenchRecipe, sets=["oscd.layers=[7]"], flags=flags))
    with pytest.raises(DataError, match="rome not found"):
        plan_oscd(build_recipe(BenchRecipe, flags={**flags, "tasks": "rome"}))
