"""Pieces of the pretraining loop that need no data: loss wiring, teacher names, resumed recipes."""

import pytest

from deo_cli.errors import UsageError
from deo_cli.recipes import PretrainRecipe, build_recipe
from deo_cli.train.loop import _recipe_changes, build_loss, resolve_teacher_name


@pytest.mark.parametrize(
    "batch, world, chunks, n",
    [(64, 4, 1, 4), (256, 1, 4, 4), (4, 1, 1, 1), (128, 2, 2, 4)],
)
def test_coding_rate_uses_per_gpu_covariance(batch, world, chunks, n):
    # docs/method.md §2.6: per-GPU covariance over 64 samples, N = GPUs; one GPU with 256 = 4 chunks, N = 4.
    recipe = build_recipe(PretrainRecipe, "deo_swin_b", sets=[f"batch_size={batch}"], command="pretrain")
    loss = build_loss(recipe, world)
    assert (loss.coding_rate.chunks, loss.coding_rate.world_size, loss.coding_rate.eps) == (chunks, n, 0.05)
    assert all(w == 1.0 for w in loss.weights.values())  # docs/method.md §2.8


def test_zero_weights_switch_terms_off():
    recipe = build_recipe(PretrainRecipe, sets=["loss.distill_patch=0", "loss.distill_cls=0"])
    loss = build_loss(recipe, 1)
    assert [t for t in loss.weights if loss.active(t)] == ["compression", "coding_rate"]


def test_teacher_names():
    assert resolve_teacher_name("vit_base_patch16_dinov3") == "dinov3_vitb16"  # the schema default
    assert resolve_teacher_name("dinov3_vitb16") == "dinov3_vitb16"
    assert resolve_teacher_name("test_dinov3_tiny") == "test_dinov3_tiny"
    with pytest.raises(UsageError, match="unknown teacher"):
        resolve_teacher_name("dinov4")


def test_recipe_changes_ignore_run_length():
    old = {"seed": 0, "max_steps": 3, "data": {"num_workers": 1, "path": "a"}, "optim": {"lr": 1.0}}
    new = {"seed": 0, "max_steps": 9, "data": {"num_workers": 4, "path": "b"}, "optim": {"lr": 2.0}}
    assert _recipe_changes(old, new) == ["data.path", "optim.lr"]
