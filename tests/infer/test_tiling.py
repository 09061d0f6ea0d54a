"""Tile plans, blend windows, nodata fill and the streaming stitcher (numpy only)."""

import numpy as np
import pytest

from deo_cli.infer.tiling import (
    RowStitcher,
    TilePlan,
    blend_ramp,
    blend_window,
    edge_index,
    fill_invalid,
    invalid_fraction,
    plan_window,
)


@pytest.mark.parametrize("h,w", [(1, 1), (7, 300), (224, 224), (1000, 333), (37, 16), (200, 96)])
@pytest.mark.parametrize("chip,stride,overlap", [(224, 16, 64), (64, 4, 16), (32, 4, 0), (224, 32, 64)])
def test_plan_aligns_chips_to_the_feature_grid_and_covers_the_scene(h, w, chip, stride, overlap):
    plan = TilePlan.create(h, w, chip, stride, overlap)
    assert plan.out_height == -(-h // stride) and plan.out_width == -(-w // stride)
    window = plan_window(plan, "cosine")
    ramps = (window[:, plan.n // 2] / window[plan.n // 2, plan.n // 2], window[plan.n // 2])
    for starts, size, ramp in (
        (plan.row_starts, plan.out_height, ramps[0]),
        (plan.col_starts, plan.out_width, ramps[1]),
    ):
        assert all(s % stride == 0 for s in starts)  # chip feature grids lie on the output grid
        size_px = size * stride
        if plan.chip_size - 2 * plan.overlap < size_px <= plan.chip_size:
            assert starts == [0]  # fits one chip, not with O px to spare: at the origin
        else:
            assert starts[0] == -plan.overlap
        steps = set(np.diff(starts))
        assert steps <= {plan.step}
        # the windows of the chips sum to exactly 1 on every output pixel: the scene starts m
        # feature px inside the first chip and ends >= m px inside the last one (or a single
        # chip along this axis has a flat window)
        fs = np.array(starts) // stride
        total = np.zeros(size + 2 * plan.n)
        for f in fs:
            total[f + plan.n : f + 2 * plan.n] += ramp
        np.testing.assert_allclose(total[plan.n : plan.n + size], 1.0, atol=1e-6)
        # and no chip is superfluous: the one before the last does not already cover the end
        if len(fs) > 1:
            assert fs[-2] + plan.n - plan.m < size
            np.testing.assert_allclose(ramp, blend_ramp(plan.n, plan.m, "cosine"), atol=1e-6)
        else:
            assert (ramp == 1.0).all()


@pytest.mark.parametrize("chip,stride", [(224, 16), (224, 32), (64, 4)])
def test_a_scene_of_exactly_one_chip_is_one_chip_at_the_origin(chip, stride):
    plan = TilePlan.create(chip, chip, chip, stride)  # default overlap: a quarter of the chip
    assert plan.overlap > 0 and len(plan) == 1
    (only,) = plan.chips()
    assert (only.y, only.x, only.fy, only.fx) == (0, 0, 0, 0)
    # one chip: a flat window, whatever the blend, so the stitched map is the chip's own map
    for blend in ("cosine", "linear", "center"):
        assert (plan_window(plan, blend) == 1.0).all()
    # one pixel more and the scene is tiled with overlapping chips as before
    assert TilePlan.create(chip + stride, chip, chip, stride).shape == (2, 1)


def test_plan_rounds_overlap_to_the_stride_and_rejects_bad_chip_sizes():
    plan = TilePlan.create(500, 500, 224, 16)  # default overlap: a quarter (56) -> 64
    assert plan.overlap == 64 and plan.n == 14 and plan.m == 4
    with pytest.raises(ValueError, match="multiple of the feature stride 16"):
        TilePlan.create(500, 500, 200, 16)


def test_chip_plan_starts_at_the_origin_without_overlap():
    plan = TilePlan.create(100, 130, 32, 4, overlap=0, pad_start=False)
    assert plan.row_starts == [0, 32, 64, 96] and plan.col_starts == [0, 32, 64, 96, 128]


def test_small_scene_is_one_chip_per_axis():
    plan = TilePlan.create(20, 30, 224, 16)
    assert plan.shape == (1, 1) and plan.chips()[0].y == -64


@pytest.mark.parametrize("blend", ["cosine", "linear", "center"])
@pytest.mark.parametrize("n,m", [(14, 4), (16, 5), (8, 2)])
def test_neighbouring_windows_sum_to_one_in_the_overlap(blend, n, m):
    r = blend_ramp(n, m, blend)
    t = n - m
    total = np.zeros(3 * t + m)
    for k in range(3):
        total[k * t : k * t + n] += r
    inner = total[m : 2 * t + m]  # where two chips overlap or one has full weight
    np.testing.assert_allclose(inner, 1.0, atol=1e-12)
    assert r.max() == 1.0 and r[0] <= r[m // 2] and (r > 0).all() == (blend != "center")


def test_weights_fall_toward_the_chip_edge():
    w = blend_window(14, 4, "cosine")
    assert w[7, 7] == 1.0 and w[0, 7] < w[1, 7] < w[2, 7] < w[3, 7] < 1.0
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1, ::-1])


def test_edge_index_replicates_edges():
    np.testing.assert_array_equal(edge_index(-3, 8, 4), [0, 0, 0, 0, 1, 2, 3, 3])


def test_fill_invalid_replicates_the_edge_of_a_rectangular_valid_area():
    rng = np.random.default_rng(0)
    inner = rng.normal(size=(2, 5, 6)).astype(np.float32)
    data = np.zeros((2, 12, 11), np.float32)
    valid = np.zeros((12, 11), bool)
    data[:, 3:8, 2:8] = inner
    valid[3:8, 2:8] = True
    data[:, ~valid] = 1e6  # garbage under nodata must not survive
    filled = fill_invalid(data.copy(), valid)
    expected = inner[:, edge_index(-3, 12, 5)][:, :, edge_index(-2, 11, 6)]
    np.testing.assert_array_equal(filled, expected)


def test_fill_invalid_with_holes_uses_valid_values_only():
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 1, (1, 20, 20)).astype(np.float32)
    valid = rng.uniform(size=(20, 20)) > 0.4
    valid[5] = False  # a fully invalid row
    data[:, ~valid] = -99.0
    out = fill_invalid(data.copy(), valid)
    assert out.min() >= 0.0
    np.testing.assert_array_equal(out[:, valid], data[:, valid])


def test_invalid_fraction_counts_only_in_scene_pixels():
    valid = np.ones((8, 8), bool)
    valid[:4, :2] = False
    inside = np.ones((8, 8), bool)
    inside[:, 6:] = False  # outside the scene
    f = invalid_fraction(valid, inside, 4)
    np.testing.assert_allclose(f, [[0.5, 0.0], [0.0, 0.0]])
    inside[:, :] = False
    assert (invalid_fraction(valid, inside, 4) == 1.0).all()


def _stitch(plan, chips_values, rows=None, block_rows=16, blend="cosine", channels=3):
    got = {}

    def emit(r0, data):
        got[r0] = data.copy()

    st = RowStitcher(plan, channels, emit, blend=blend, block_rows=block_rows, rows=rows)
    for chip in plan.chips(rows):
        st.add(chip, chips_values(chip), np.zeros((plan.n, plan.n), np.float32))
    st.close()
    return got, st


def test_stitcher_reproduces_a_field_and_releases_aligned_blocks():
    plan = TilePlan.create(300, 170, 32, 4, 8)
    field = np.random.default_rng(0).normal(size=(3, plan.out_height, plan.out_width)).astype(np.float32)
    pad = np.pad(field, ((0, 0), (plan.n, plan.n), (plan.n, plan.n)), mode="edge")

    def values(chip):  # a model that is exactly translation invariant: stitching must be exact
        return pad[:, chip.fy + plan.n : chip.fy + 2 * plan.n, chip.fx + plan.n : chip.fx + 2 * plan.n]

    got, st = _stitch(plan, values)
    assert sorted(got) == list(range(0, plan.out_height, 16))
    out = np.concatenate([got[k] for k in sorted(got)], axis=1)
    np.testing.assert_allclose(out, field, atol=1e-5)
    # memory: the buffer holds block_rows + n (+1) rows, whatever the scene height
    assert st.capacity == 16 + plan.n + 1


def test_stitcher_row_range_gives_the_same_rows():
    plan = TilePlan.create(200, 90, 32, 4, 8)
    rng = np.random.default_rng(2)
    vals = {c.index: rng.normal(size=(3, plan.n, plan.n)).astype(np.float32) for c in plan.chips()}
    full, _ = _stitch(plan, lambda c: vals[c.index])
    part, _ = _stitch(plan, lambda c: vals[c.index], rows=(16, 48))
    assert sorted(part) == [16, 32]
    for k in part:
        np.testing.assert_array_equal(part[k], full[k])


def test_stitcher_marks_mostly_nodata_pixels_nan():
    plan = TilePlan.create(64, 64, 32, 4, 8)
    got = {}
    st = RowStitcher(plan, 1, lambda r, d: got.setdefault(r, d), max_nodata_fraction=0.5)
    for chip in plan.chips():
        inv = np.zeros((plan.n, plan.n), np.float32)
        if chip.row == 0 and chip.col == 0:
            inv[:] = 0.75  # this chip's footprint is mostly nodata
        st.add(chip, np.ones((1, plan.n, plan.n), np.float32), inv)
    st.close()
    out = np.concatenate([got[k] for k in sorted(got)], axis=1)[0]
    assert np.isnan(out).any() and np.nanmax(out) == 1.0
