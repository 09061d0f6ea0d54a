"""The paper's numbers and per-task settings, looked up under any task spelling."""

from deo_cli.bench.paper import PAPER_RESULTS, paper_result
from deo_cli.bench.tasks import PAPER_TASKS, is_known_task, task_setting, unknown_task_error


def test_paper_numbers_method_md_3_2():
    assert paper_result("m-eurosat").value == 97.0
    assert paper_result("m-bigearthnet").metric == "micro_f1"
    assert paper_result("m-so2sat").value == 52.23
    assert paper_result("m-cashew-plantation").value == 68.56  # the paper's name for m-cashew-plant
    assert paper_result("m-chesapeake-landcover").value == 72.47
    assert paper_result("m-SA-crop-type", "0.10x_train").value == 28.98
    assert paper_result("m-bigearthnet", "0.10x_train").value == 51.89
    assert paper_result("oscd").value == 60.4 and "fine-tunes" in paper_result("oscd").note
    assert paper_result("m-brick-kiln") is None and paper_result("m-eurosat", "0.10x_train") is None
    assert len(PAPER_RESULTS) == 16


def test_task_settings_method_md_3_1():
    sizes = {k: s.image_size for k, s in PAPER_TASKS.items()}
    assert sizes == {
        "bigearthnet": 120,
        "so2sat": 32,
        "eurosat": 64,
        "cashew-plant": 256,
        "sa-crop-type": 256,
        "chesapeake": 256,
        "pv4ger-seg": 320,
        "nz-cattle": 500,
    }
    assert task_setting("m-eurosat", "classification").lr == 1e-2
    assert task_setting("m-bigearthnet", "classification", True).lr == 1e-3
    kiln = task_setting("m-brick-kiln", "classification")
    assert not kiln.from_paper and kiln.image_size is None and kiln.metric == "overall_accuracy"
    assert task_setting("m-tiny", "classification", multilabel=True).metric == "micro_f1"
    assert task_setting("m-tiny-seg", "segmentation").metric == "miou"


def test_unknown_task_did_you_mean():
    assert (
        is_known_task("eurosat") and is_known_task("m-cashew-plantation") and not is_known_task("m-eurosatt2")
    )
    err = unknown_task_error("m-eurosatt")
    assert (
        "unknown GEO-Bench task 'm-eurosatt'" in err.one_line()
        and "Did you mean 'm-eurosat'?" in err.one_line()
    )
    assert "'m-tiny-seg'" in unknown_task_error("m-tiny-sge", ["m-tiny-seg"]).one_line()
    assert "Did you mean" not in unknown_task_error("zzzzzz").one_line()


def test_shipped_bench_recipes():
    from deo_cli.recipes import BenchRecipe, build_recipe, recipe_to_dict

    # recipes/bench/paper.yaml writes down the schema defaults (docs/method.md §3.1): nothing differs
    paper = build_recipe(BenchRecipe, file="paper", command="bench")
    assert recipe_to_dict(paper) == recipe_to_dict(BenchRecipe())
    smoke = build_recipe(BenchRecipe, file="smoke_cpu", command="bench")
    assert smoke.model.weights == "random" and smoke.limit == 8 and smoke.runtime.device == "cpu"
