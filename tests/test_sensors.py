import pytest

from deo_cli.errors import BandError
from deo_cli.sensors import (
    BAND_SETS,
    DEO_RGB_MANIFEST,
    DEO_S2_MANIFEST,
    S2_BANDS,
    BandManifest,
    band_name_from_filename,
    canonical_band_name,
    match_bands,
    resolve_bands,
)


@pytest.mark.parametrize(
    "label, name",
    [
        ("B4", "B04"),
        ("b04", "B04"),
        ("B04", "B04"),
        ("red", "B04"),
        ("nir08", "B8A"),
        ("B08A", "B8A"),
        ("04 - Red", "B04"),  # GEO-Bench descriptions
        ("08A - Vegetation Red Edge", "B8A"),
        ("10 - SWIR - Cirrus", "B10"),
        ("01 - VH.Real", None),  # GEO-Bench so2sat Sentinel-1 band, not B01
        ("swir16", "B11"),
        ("R", "red"),
        ("4", None),  # a bare number is an index, not a band
        ("band_1", None),
        ("", None),
    ],
)
def test_canonical_band_name(label, name):
    assert canonical_band_name(label) == name


@pytest.mark.parametrize(
    "filename, name",
    [
        ("T31UDQ_20171107T105229_B8A.tif", "B8A"),
        ("B04.jp2", "B04"),
        ("S2A_MSIL2A_20170613T101031_87_48_B01.tif", "B01"),
        ("T31UDQ_20171107T105229_B04_10m.jp2", "B04"),
        ("S2A_OPER_MSI_L1C_TL_EPA__20161227T091305_A001222_T22LHH_B12.tif", "B12"),
        ("scene.tif", None),
        ("labels.tif", None),
        ("B13.tif", None),
    ],
)
def test_band_from_filename(filename, name):
    assert band_name_from_filename(filename) == name


def test_band_sets_and_deo_input():
    assert resolve_bands("S2") == ("B04", "B03", "B02", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    assert resolve_bands("s2") == resolve_bands("S2")
    assert len(BAND_SETS["S2_L1C"]) == 13 and "B10" in BAND_SETS["S2_L1C"].bands
    assert len(BAND_SETS["S2_L2A"]) == 12 and "B10" not in BAND_SETS["S2_L2A"].bands
    assert resolve_bands("B4, b03 ,blue") == ("B04", "B03", "B02")
    assert DEO_S2_MANIFEST.bands == resolve_bands("S2")
    # every S2 band has a wavelength and native GSD
    assert all(b.wavelength_nm > 400 and b.gsd_m in (10, 20, 60) for b in S2_BANDS.values())
    assert S2_BANDS["B8A"].gsd_m == 20 and S2_BANDS["B04"].gsd_m == 10


def test_resolve_bands_errors():
    with pytest.raises(BandError, match="(?i)did you mean 'S2'"):
        resolve_bands("S3")
    with pytest.raises(BandError, match="twice"):
        resolve_bands("B04,red")


def test_deo_statistics_match_method_md():
    # docs/method.md §2.3: RGB in max-scaled space, B5..B12 SatMAE statistics in DN
    assert DEO_S2_MANIFEST.mean[:3] == (0.41820, 0.42148, 0.39913)
    assert DEO_S2_MANIFEST.std[3] == 948.982 and DEO_S2_MANIFEST.mean[-1] == 1247.919
    assert DEO_S2_MANIFEST.max_scaled == ("B04", "B03", "B02")
    assert DEO_S2_MANIFEST.unit == "dn" and DEO_RGB_MANIFEST.unit == "any"


def test_manifest_roundtrip_and_validation():
    d = DEO_S2_MANIFEST.to_dict()
    assert BandManifest.from_dict(d) == DEO_S2_MANIFEST
    with pytest.raises(ValueError):
        BandManifest("x", ("B04",), "dn", (0.0,), (0.0,))
    with pytest.raises(ValueError):
        BandManifest("x", ("B04",), "furlongs", (0.0,), (1.0,))


def test_match_bands_by_common_name():
    idx, missing = match_bands(("red", "green", "blue", "B05"), ("B02", "B03", "B04"))
    assert idx == [2, 1, 0] and missing == ["B05"]
