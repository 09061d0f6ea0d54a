import numpy as np
import pytest

from deo_cli.data.oscd import list_cities, official_split, open_pair, read_change_label, select_cities
from deo_cli.errors import DataError


def test_cities_pairs_and_labels(shared_data):
    root = shared_data / "oscd_subset"
    cities = list_cities(root)
    assert [c.name for c in cities] == ["aguasclaras", "bercy", "bordeaux", "paris"]
    paris = select_cities(cities, "paris")[0]
    assert (paris.date_before, paris.date_after) == ("2016-11-30", "2017-11-07")
    before, after = open_pair(paris)
    assert before.grid.same_as(after.grid) and before.crs.to_epsg() == 4326
    lab = read_change_label(paris, (before.height, before.width))
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1}
    assert lab.sum() == 458  # the file's 2s (change), SOURCE.md: very imbalanced
    split = official_split(root)
    assert "paris" in split["train"] and "montpellier" in split["test"]


def test_errors(shared_data, tmp_path):
    with pytest.raises(DataError, match="not an OSCD folder"):
        list_cities(tmp_path)
    with pytest.raises(DataError, match="city rome not found"):
        select_cities(list_cities(shared_data / "oscd_subset"), "paris,rome")
