"""The OSCD suite's plan (cities, partition, levels, head) and its errors."""

import pytest

from deo_cli.bench.oscd import plan_oscd
from deo_cli.errors import DataError, UsageError, WeightsError
from deo_cli.recipes import BenchRecipe, build_recipe


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
    with pytest.raises(WeightsError, match="missing.pt not found"):
        plan_oscd(build_recipe(BenchRecipe, sets=["oscd.head=missing.pt"], flags=flags))
