"""Which scenes each shard of a job array and each rank takes."""

import pytest

from deo_cli.errors import UsageError
from deo_cli.infer.schedule import balance, parse_shard, scene_mode, shard_of


def test_parse_shard():
    assert parse_shard("0/2") == (0, 2) and parse_shard(" 7 / 8 ") == (7, 8) and parse_shard(None) is None
    with pytest.raises(UsageError, match=r"--shard 2/2 is out of range.*0\.\.1"):
        parse_shard("2/2")
    with pytest.raises(UsageError, match="--shard 3 is not K/N"):
        parse_shard("3")
    with pytest.raises(UsageError, match="is not K/N"):
        parse_shard("/4")  # an unset $SLURM_ARRAY_TASK_ID


@pytest.mark.parametrize("n_items,n", [(48, 2), (10, 3), (5, 8), (1, 1)])
def test_shards_are_disjoint_cover_the_list_and_depend_on_it_alone(n_items, n):
    parts = [shard_of(n_items, (k, n)) for k in range(n)]
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(n_items)) == shard_of(n_items, None)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # as even as the count allows
    assert parts == [shard_of(n_items, (k, n)) for k in range(n)]  # the same every time


def test_balance_by_pixels():
    # one big scene and many small ones: the big one alone on a rank
    weights = [100, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    a, b = balance(weights, 2)
    assert a == [0] and b == list(range(1, 11))
    # equal scenes alternate between ranks in input order
    assert balance([4] * 6, 2) == [[0, 2, 4], [1, 3, 5]]
    parts = balance([5, 9, 3, 7, 1, 8, 2, 6, 4], 3)
    loads = [sum([5, 9, 3, 7, 1, 8, 2, 6, 4][i] for i in p) for p in parts]
    assert sorted(i for p in parts for i in p) == list(range(9)) and loads == [
        16,
        15,
        14,
    ]  # LPT (optimum: 15 each)
    assert balance([1, 2], 4) == [[1], [0], [], []]


def test_scene_mode_needs_a_scene_per_rank():
    assert not scene_mode(1, 2) and scene_mode(2, 2) and scene_mode(48, 8) and not scene_mode(5, 1)
