"""Search-space YAML: the shipped files load, and every mistake names file and key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from covid_ray.search_space import (
    SearchSpaceError,
    check_trial_configs,
    load_search_space,
    parse_search_space,
    reference_config,
)

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "metric": "val_macro_f1",
    "fixed": {"image_size": 64, "epochs": 4},
    "space": {"model": {"choice": ["seed_cnn", "resnet18"]}, "lr": {"loguniform": [1e-4, 1e-2]}},
}


def write(tmp_path, doc) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_shipped_search_spaces_load():
    quick = load_search_space(ROOT / "search_spaces" / "quick.yaml")
    assert quick.num_samples >= 8 and quick.scheduler["type"] == "asha"
    assert {"model", "lr", "weight_decay", "class_weights", "rotation", "batch_size"} <= set(quick.space)
    full = load_search_space(ROOT / "search_spaces" / "full.yaml")
    assert set(full.space["model"]["choice"]) == {
        "seed_cnn", "resnet18", "resnet50", "efficientnet_b0", "densenet121", "mobilenet_v3_small"
    }
    assert full.fixed["image_size"] == 224 and full.max_epochs == 50 and full.resources["workers_per_trial"] > 1


def test_defaults_and_param_space(tmp_path):
    ss = load_search_space(write(tmp_path, GOOD))
    assert (ss.metric, ss.mode, ss.scheduler["max_t"]) == ("val_macro_f1", "max", 4)
    space = ss.param_space()
    assert space["image_size"] == 64 and hasattr(space["lr"], "sample")


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"metirc": "x"}, "unknown top-level key 'metirc'"),
        ({"space": {"lr": {"loguniform": [1e-4, 1e-2]}, "learning_rate": {"uniform": [0, 1]}}}, "unknown parameter space.learning_rate"),
        ({"space": {"lr": {"gaussian": [0, 1]}}}, "space.lr: unknown distribution 'gaussian'"),
        ({"space": {"lr": {"loguniform": [0, 1]}}}, "space.lr.loguniform must be [low, high] with 0 < low < high"),
        ({"space": {"lr": {"uniform": [2, 1]}}}, "space.lr.uniform must be [low, high]"),
        ({"space": {"lr": {"uniform": [0, 1], "loguniform": [1, 2]}}}, "space.lr must have exactly one distribution"),
        ({"space": {"model": {"choice": ["resnet18", "vgg99"]}}}, "unknown model(s) ['vgg99']"),
        ({"space": {"model": {"choice": []}}}, "space.model.choice must be a non-empty list"),
        ({"space": {}}, "'space' must name at least one parameter"),
        ({"space": {}, "num_samples": 3}, "an empty space is a one-configuration run: num_samples 1"),
        ({"scheduler": {"type": "asha", "patience": 3}}, "unknown key scheduler.patience"),
        ({"scheduler": {"type": "asha", "max_t": 10}}, "scheduler.max_t (10) exceeds fixed.epochs (4)"),
        ({"fixed": {"image_size": 64, "epochs": 4, "data": "/x"}}, "fixed.data is set by the search itself"),
        ({"mode": "maximize"}, "mode must be 'max' or 'min'"),
        ({"fixed": {"epochs": 4, "lr": 0.1}}, "lr is both fixed and searched"),
        ({"searcher": {"start_with": [{"lr": 0.5}]}}, "searcher.start_with[0].lr = 0.5 lies outside space.lr"),
        ({"searcher": {"start_with": [{"model": "vgg"}]}}, "searcher.start_with[0].model = 'vgg' lies outside"),
        ({"searcher": {"start_with": [{"epochs": 3}]}}, "searcher.start_with[0].epochs is not a searched parameter"),
        ({"searcher": {"start_with": {"lr": 1e-3}}}, "searcher.start_with must be a list of non-empty mappings"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path, patch, message):
    path = write(tmp_path, {**GOOD, **patch})
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_class_multiplier_keys_are_allowed():
    ss = parse_search_space({**GOOD, "space": {**GOOD["space"], "class_mult.COVID": {"uniform": [1, 2]}}})
    assert "class_mult.COVID" in ss.space


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SearchSpaceError, match="search space not found"):
        load_search_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        load_search_space(bad)


def test_the_recipe_is_one_configuration_at_the_profiles_size_and_budget():
    recipe = load_search_space(ROOT / "search_spaces" / "recipe.yaml")
    quick = load_search_space(ROOT / "search_spaces" / "quick.yaml")
    ref = reference_config(recipe, quick)
    assert {k: ref[k] for k in ("model", "optimizer", "lr", "weight_decay", "batch_size", "lr_factor", "lr_patience",
                                "early_stop_patience", "class_weights", "rotation", "hflip")} == {
        "model": "seed_cnn", "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-5, "batch_size": 32,
        "lr_factor": 0.1, "lr_patience": 3, "early_stop_patience": 5, "class_weights": "none",
        "rotation": 10.0, "hflip": 0.5}
    assert (ref["image_size"], ref["epochs"]) == (quick.fixed["image_size"], quick.max_epochs)
    # every searched parameter has a value (no unresolved domain reaches the trial), none sampled
    assert set(quick.space) <= set(ref)
    assert (ref["class_mult.COVID"], ref["brightness"], ref["crop_scale_min"]) == (1.0, 0.0, 1.0)
    check_trial_configs(quick, ref)
    with pytest.raises(SearchSpaceError, match="a recipe is one configuration"):
        reference_config(quick, quick)


def test_bad_values_fail_up_front_naming_the_config(tmp_path):
    doc = {**GOOD, "fixed": {**GOOD["fixed"], "optimizer": "adamm"}}
    with pytest.raises(SearchSpaceError, match=r"fixed \+ a sample of the space: optimizer must be one of"):
        check_trial_configs(load_search_space(write(tmp_path, doc)))
    doc = {**GOOD, "fixed": {**GOOD["fixed"], "weight_decay": "1e-5"}}  # YAML reads 1e-5 as text
    with pytest.raises(SearchSpaceError, match="weight_decay.*1.0e-3"):
        check_trial_configs(load_search_space(write(tmp_path, doc)))
    ss = load_search_space(write(tmp_path, GOOD))
    with pytest.raises(SearchSpaceError, match=r"the recipe \(reference trial\): batch_size must be >= 1"):
        check_trial_configs(ss, {"model": "seed_cnn", "batch_size": 0})
