"""The CVA baseline: per-pixel RMS of the normalised difference, one RGB scale for both dates,
through the same streaming path as the zero-shot score."""

import numpy as np
import pytest
import torch

from deo_cli.data.oscd import list_cities, open_pair, read_change_label
from deo_cli.models import get_model_spec
from deo_cli.recipes import InputSection
from deo_cli.tasks.change.cva import CVA_RANGE, CvaChange, same_scale
from deo_cli.tasks.change.evaluate import ScoreCurve
from deo_cli.tasks.change.pair import open_dates, prepare_dates
from deo_cli.tasks.change.score import change_score_array
from tests.infer.helpers import S2_BANDS, smooth_scene
from tests.tasks.change.test_change_train import write_oscd

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cva_forward_is_the_rms_band_difference():
    m = CvaChange(get_model_spec("deo_swin_test"))
    x = torch.zeros(2, 20, 8, 8)
    x[1, 10:, 2, 3] = 2.0  # every band of the second date's pixel (2, 3) moves by 2
    x[1, 10:15, 5, 5] = 1.0  # half the bands of another by 1
    y = m(x)
    assert y.shape == (2, 1, 8, 8) and m.stride == 1 and m.channels == 1
    assert float(y[1, 0, 2, 3]) == pytest.approx(2.0) and float(y[1, 0, 5, 5]) == pytest.approx(np.sqrt(0.5))
    assert float(y[0].abs().max()) == 0.0 and float(y[1, 0, 0, 0]) == 0.0
    assert m.score_range == CVA_RANGE and m.weights_uri is None


def test_same_scale_gives_the_second_date_the_first_dates_rgb_scale(make_raster):
    a = smooth_scene(48, 48, seed=3)
    b = a.copy()
    b[:3, :12, :12] = 20000  # a bright new roof raises the second date's RGB 99.9th percentile
    pa = make_raster("a.tif", a, descriptions=S2_BANDS)
    pb = make_raster("b.tif", b, descriptions=S2_BANDS)
    spec = get_model_spec("deo_swin_test")
    first, second, _ = open_dates(str(pa), str(pb), InputSection())
    ia, ib = prepare_dates(first, second, spec.manifest, spec.rgb_manifest, InputSection())
    assert ib.rgb_max > ia.rgb_max  # DEO's normalisation scales each date by its own maximum
    jb = same_scale(ia, ib)
    assert jb.rgb_max == ia.rgb_max and jb.normalizer.scale == ia.normalizer.scale
    m = CvaChange(spec, 32)
    with first, second:
        score, grid = change_score_array(first, second, m, chip_size=32, overlap=0)
    assert grid.transform == first.transform and score.shape == (48, 48)
    assert np.nanmax(score[20:, 20:]) == 0.0 and score[:12, :12].min() > 0.5  # only the roof differs


def test_cva_finds_a_planted_change_auc_near_one(tmp_path):
    root = write_oscd(tmp_path / "oscd", cities=("alpha",))
    (city,) = list_cities(root)
    before, after = open_pair(city)
    with before, after:
        score, _ = change_score_array(before, after, CvaChange(get_model_spec("deo_swin_test")))
    label = read_change_label(city, score.shape)
    curve = ScoreCurve(*CVA_RANGE).add(score, label)
    assert curve.auc() > 0.99 and curve.best_f1()[0] > 0.95
