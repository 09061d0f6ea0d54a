"""Acquisition dates: metadata, names that carry the sensing time, OSCD's dates.txt; never the
processing time of an old-style Sentinel-2 tile name."""

import logging

import numpy as np

from deo_cli.io.raster import open_scene
from deo_cli.io.scenedate import acquisition_time
from tests.conftest import write_raster

OLD_TILE = "S2A_OPER_MSI_L1C_TL_EPA__20160706T155721_A000849_T30UWU_B02.tif"


def test_old_style_tile_names_carry_the_processing_time_not_the_acquisition(caplog):
    with caplog.at_level(logging.INFO, logger="deo_cli.io.scenedate"):
        when, why = acquisition_time([f"/data/x/{OLD_TILE}"])
    assert when is None and why.startswith("unknown:") and "processing time" in why
    assert sum("processing time" in r.getMessage() for r in caplog.records) == 1
    # the product's validity start, the datastrip's sensing start, or the metadata give it
    product = "S2A_OPER_PRD_MSIL1C_PDMC_20160706T155721_R051_V20150704T105006_20150704T105006.SAFE"
    assert acquisition_time([f"/d/{product}/GRANULE/g/IMG_DATA/{OLD_TILE}"])[0] == "2015-07-04T10:50:06Z"
    ds = "S2A_OPER_MSI_L1C_DS_EPA__20160706T155721_S20150704T104026_N02.04"
    assert acquisition_time([f"/d/{ds}/{OLD_TILE}"])[0] == "2015-07-04T10:40:26Z"
    tags = {"DATATAKE_1_DATATAKE_SENSING_START": "2015-07-04T10:50:06.027Z"}
    assert acquisition_time([OLD_TILE], tags) == (
        "2015-07-04T10:50:06Z",
        "metadata DATATAKE_1_DATATAKE_SENSING_START",
    )


def test_compact_names_and_other_dates_are_the_sensing_time():
    safe = "S2B_MSIL2A_20200101T103000_N0213_R108_T31UDQ_20200102T120000.SAFE"
    assert acquisition_time([f"/d/{safe}/T31UDQ_20200101T103000_B04_10m.jp2"])[0] == "2020-01-01T10:30:00Z"
    assert acquisition_time(["/d/T22LHH_20171015T133221_B02.tif"])[0] == "2017-10-15T13:32:21Z"
    assert acquisition_time(["/d/oscd_paris_20161130_l1c.tif"])[0] == "2016-11-30T00:00:00Z"
    assert acquisition_time(["/d/20240101_runs/scene.tif"]) == (
        None,
        "unknown: no date in the metadata or the names",
    )


def test_oscd_folders_take_the_dates_file(tmp_path, shared_data):
    """The OSCD aguasclaras first date is named by its processing time (2016-12-27); it was
    acquired on 2015-09-16 (dates.txt); the scene says so."""
    city = shared_data / "oscd_subset" / "images" / "aguasclaras"
    first = open_scene(city / "imgs_1")
    assert first.datetime == "2015-09-16T00:00:00Z"
    assert acquisition_time(first.paths)[1] == "OSCD aguasclaras/dates.txt"
    assert open_scene(city / "imgs_2").datetime == "2017-10-15T13:32:21Z"  # a compact band file
    # the same old-style files without the OSCD layout: unknown
    folder = tmp_path / "scene"
    folder.mkdir()
    for band in ("B02", "B03"):
        write_raster(folder / OLD_TILE.replace("B02", band), np.ones((1, 8, 8), np.uint16))
    assert open_scene(folder).datetime is None
