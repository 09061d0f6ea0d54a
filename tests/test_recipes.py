from pathlib import Path

import pytest
import yaml

from deo_cli.errors import RecipeError
from deo_cli.recipes import (
    RECIPES_DIR,
    EmbedRecipe,
    PretrainRecipe,
    build_recipe,
    recipe_hash,
    recipe_path_for,
    save_recipe,
)


def test_precedence_defaults_file_set_flags(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim: {lr: 1.0e-3, min_lr: 2.0e-6}\nepochs: 7\nbatch_size: 8\n")
    r = build_recipe(
        PretrainRecipe, f, sets=["optim.lr=2e-4", "epochs=9"], flags={"epochs": 11, "seed": None}
    )
    assert r.optim.min_lr == 2e-6  # file
    assert r.optim.lr == 2e-4  # --set beats the file ("2e-4" is a YAML string: coerced)
    assert r.epochs == 11  # explicit flag beats --set
    assert r.batch_size == 8 and r.seed == 0  # file, default (None flags are "not given")
    assert r.optim.weight_decay == 0.04  # untouched default (docs/method.md §2.9)


def test_unknown_key_did_you_mean(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("optim: {lrr: 1}\n")
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optim.lrr'. Did you mean 'optim.lr'\?"):
        build_recipe(PretrainRecipe, f)
    with pytest.raises(RecipeError, match="unknown recipe key 'epoch'"):
        build_recipe(PretrainRecipe, sets=["epoch=3"])


@pytest.mark.parametrize(
    "item, match",
    [
        ("optim.lr=fast", "expects float"),
        ("epochs=2.5", "expects int"),
        ("compile=maybe", "expects bool"),
        ("precision=fp64", "must be one of"),
        ("crops.global_scale=[0.4]", "expects 2 values"),
        (
            "optim=3",
            "gives the section 'optim' .* a single value. Set one of its keys, e.g. --set optim.lr=3",
        ),
        ("noequals", "not KEY=VALUE"),
    ],
)
def test_type_errors(item, match):
    with pytest.raises(RecipeError, match=match):
        build_recipe(PretrainRecipe, sets=[item])


def test_a_section_given_one_value_is_never_dropped():
    """``--set model=foo`` with a flag under ``model`` (``--weights``) used to become
    ``model: {weights: ...}``: the asked model silently replaced by the default."""
    flags = {"model.name": None, "model.weights": "random"}
    with pytest.raises(RecipeError, match="Did you mean --set model.name=foo or --model foo"):
        build_recipe(EmbedRecipe, sets=["model=foo"], flags=flags)
    with pytest.raises(RecipeError, match="'model' is 'foo', a single value"):  # from a YAML file
        from deo_cli.recipes import _set_dotted

        _set_dotted({"model": "foo"}, "model.weights", "random")
    r = build_recipe(EmbedRecipe, sets=["model={name: deo_swin_t}"], flags=flags)
    assert (r.model.name, r.model.weights) == ("deo_swin_t", "random")


def test_validation_in_post_init():
    with pytest.raises(RecipeError, match="overlap must be less than half"):
        build_recipe(EmbedRecipe, sets=["tiling.chip_size=224", "tiling.overlap=120"])


def test_extends_and_roundtrip(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("epochs: 5\noptim: {lr: 1.0e-4, momentum: 0.99}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\noptim: {lr: 3.0e-4}\n")
    r = build_recipe(PretrainRecipe, child)
    assert (r.epochs, r.optim.lr, r.optim.momentum) == (5, 3e-4, 0.99)
    out = save_recipe(r, tmp_path / "run" / "recipe.yaml", "pretrain")
    text = out.read_text()
    assert text.startswith("# deo ") and recipe_hash(r) in text
    assert isinstance(yaml.safe_load(text)["crops"]["global_scale"], list)
    again = build_recipe(PretrainRecipe, out)
    assert again == r and recipe_hash(again) == recipe_hash(r)


def test_recipe_hash_changes_with_values():
    assert recipe_hash(PretrainRecipe()) != recipe_hash(build_recipe(PretrainRecipe, sets=["seed=1"]))


def test_missing_recipe_names_shipped_ones(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        build_recipe(PretrainRecipe, tmp_path / "nope.yaml")


def test_recipe_path_for():
    assert recipe_path_for("out/emb.tif") == Path("out/emb.recipe.yaml")
    assert recipe_path_for("out/emb.zarr") == Path("out/emb.zarr/recipe.yaml")


def test_shipped_recipes_are_valid():
    for path in sorted(RECIPES_DIR.glob("pretrain/*.yaml")):
        build_recipe(PretrainRecipe, path)
