"""What the searcher tells Optuna, driven by hand (no Ray cluster): pruned trials, warm start, the recipe."""
from __future__ import annotations

import optuna
import pytest
from ray import tune

from covid_ray.searcher import (
    ARM_KEY,
    RECIPE,
    SEARCH,
    WARM_START,
    CovidSearch,
    ReferenceExemptASHA,
    end_state,
    stopped_by_scheduler,
)

SPACE = {"lr": tune.loguniform(1e-4, 1e-2), "model": tune.choice(["seed_cnn", "resnet18"])}
METRIC = "best_val_macro_f1"


def make_search(tmp_path, **kw) -> CovidSearch:
    search = CovidSearch(
        metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
        study_name="s", storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}"),
        full_fidelity=6, **kw,
    )
    assert search.set_search_properties(None, None, dict(SPACE))
    return search


def result(epoch: int, value: float, **extra) -> dict:
    return {"epoch": epoch, METRIC: value, "training_iteration": epoch, **extra}


def study(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_a_trial_stopped_by_asha_reaches_optuna_as_pruned_with_its_epochs(tmp_path):
    search = make_search(tmp_path)
    config = search.suggest("t1")
    assert config[ARM_KEY] == SEARCH and set(config) == {"lr", "model", ARM_KEY}
    search.on_trial_result("t1", result(1, 0.30))
    search.on_trial_result("t1", result(2, 0.41))
    search.on_trial_result("t1", result(2, 0.41))  # a restarted worker group reports epoch 2 again
    # Tune hands the result ASHA stops a trial on to on_trial_complete only.
    search.on_trial_complete("t1", result(3, 0.45, early_stopped=False))

    (trial,) = study(tmp_path).trials
    assert trial.state == optuna.trial.TrialState.PRUNED  # not COMPLETE with a 3-epoch score
    assert trial.intermediate_values == {1: 0.30, 2: 0.41, 3: 0.45}
    assert trial.params["lr"] == pytest.approx(config["lr"])


def test_finished_and_early_stopped_trials_are_complete_with_their_best_value_and_errors_fail(tmp_path):
    search = make_search(tmp_path)
    for tid in ("full", "patience", "broken"):
        search.suggest(tid)
    for epoch, value in enumerate([0.2, 0.5, 0.45, 0.6, 0.6, 0.58], start=1):
        search.on_trial_result("full", result(epoch, max(0.2, value)))
    search.on_trial_complete("full", result(6, 0.6))
    search.on_trial_result("patience", result(1, 0.3))
    search.on_trial_complete("patience", result(3, 0.35, early_stopped=True))
    search.on_trial_complete("broken", None, error=True)

    by_state = {t.number: t for t in study(tmp_path).trials}
    assert by_state[0].state == optuna.trial.TrialState.COMPLETE and by_state[0].value == 0.6
    assert by_state[1].state == optuna.trial.TrialState.COMPLETE and by_state[1].value == 0.35
    assert by_state[2].state == optuna.trial.TrialState.FAIL


def test_warm_start_points_run_first_and_are_labelled(tmp_path):
    points = [{"model": "resnet18", "lr": 1e-3}, {"model": "seed_cnn"}]
    search = make_search(tmp_path, start_with=points)
    first, second, third = (search.suggest(t) for t in ("a", "b", "c"))
    assert first == {"model": "resnet18", "lr": 1e-3, ARM_KEY: WARM_START}
    assert second["model"] == "seed_cnn" and second[ARM_KEY] == WARM_START  # lr sampled
    assert third[ARM_KEY] == SEARCH
    # A resumed search loads the same study: the portfolio is not queued a second time.
    again = make_search(tmp_path, start_with=points)
    assert again.suggest("d")[ARM_KEY] == SEARCH


def test_the_recipe_is_suggested_first_and_told_to_the_study_only_when_it_ends(tmp_path):
    recipe = {"model": "seed_cnn", "lr": 1e-3, "epochs": 30, "early_stop_patience": 5}
    search = make_search(tmp_path, reference=recipe)
    assert search.suggest("r") == {**recipe, ARM_KEY: RECIPE}
    assert search.suggest("s")[ARM_KEY] == SEARCH
    search.on_trial_result("r", result(1, 0.4))
    search.on_trial_result("r", result(2, 0.55))
    assert len(study(tmp_path).trials) == 1  # only the sampled trial so far
    search.on_trial_complete("r", result(7, 0.55, early_stopped=True))

    (added,) = [t for t in study(tmp_path).trials if t.user_attrs.get(ARM_KEY) == RECIPE]
    assert added.state == optuna.trial.TrialState.COMPLETE and added.value == 0.55
    assert added.params == {"model": "seed_cnn", "lr": 1e-3}
    assert added.intermediate_values == {1: 0.4, 2: 0.55, 7: 0.55}  # the last result, given at the end


def test_a_recipe_outside_the_space_is_not_added_to_the_study(tmp_path):
    search = make_search(tmp_path, reference={"model": "densenet121", "lr": 1e-3})
    search.suggest("r")
    search.on_trial_complete("r", result(6, 0.5))
    assert study(tmp_path).trials == []


def test_end_state_rules():
    assert end_state(result(6, 0.5), error=False, full_fidelity=6) == "COMPLETE"
    assert end_state(result(2, 0.5), error=False, full_fidelity=6) == "PRUNED"
    assert end_state(result(2, 0.5, early_stopped=True), error=False, full_fidelity=6) == "COMPLETE"
    assert end_state(result(2, 0.5), error=True, full_fidelity=6) == "FAIL"
    assert end_state(None, error=False, full_fidelity=6) == "FAIL"
    # A space that searches epochs: a trial that trained its own (fewer) epochs was not pruned.
    assert end_state({**result(2, 0.5), "config": {"epochs": 2}}, error=False, full_fidelity=6) == "COMPLETE"
    assert end_state({**result(2, 0.5), "config": {"epochs": 4}}, error=False, full_fidelity=6) == "PRUNED"
    assert end_state({**result(6, 0.5), "config": {"epochs": 9}}, error=False, full_fidelity=6) == "COMPLETE"


def test_stopped_by_scheduler_is_below_budget_without_early_stopping_and_never_the_recipe():
    searched, recipe = {ARM_KEY: SEARCH}, {ARM_KEY: RECIPE}
    assert stopped_by_scheduler(searched, 3, early_stopped=False, full_fidelity=16)
    assert not stopped_by_scheduler(searched, 16, early_stopped=False, full_fidelity=16)
    assert not stopped_by_scheduler(searched, 3, early_stopped=True, full_fidelity=16)
    # The recipe below the search's budget (its own patience or epochs) is never "stopped by ASHA".
    assert not stopped_by_scheduler(recipe, 3, early_stopped=False, full_fidelity=16)
    # A trial whose own (searched) epochs are fewer than the budget finished them.
    assert not stopped_by_scheduler({ARM_KEY: SEARCH, "epochs": 3}, 3, early_stopped=False, full_fidelity=16)
    assert stopped_by_scheduler({ARM_KEY: SEARCH, "epochs": 8}, 3, early_stopped=False, full_fidelity=16)


class _Trial:
    def __init__(self, trial_id, arm):
        self.trial_id, self.config = trial_id, {ARM_KEY: arm}


def test_asha_never_stops_the_recipe_trial():
    asha = ReferenceExemptASHA(time_attr="epoch", metric=METRIC, mode="max", max_t=8, grace_period=1,
                               reduction_factor=2)
    good, recipe = _Trial("good", SEARCH), _Trial("recipe", RECIPE)
    asha.on_trial_add(None, good)
    asha.on_trial_add(None, recipe)
    assert asha.on_trial_result(None, good, {"epoch": 1, METRIC: 0.9}) == "CONTINUE"
    # Far below the rung's cutoff, and past max_t: a searched trial would be stopped.
    for epoch in (1, 2, 4, 9):
        assert asha.on_trial_result(None, recipe, {"epoch": epoch, METRIC: 0.01}) == "CONTINUE"
    bad = _Trial("bad", SEARCH)
    asha.on_trial_add(None, bad)
    assert asha.on_trial_result(None, bad, {"epoch": 1, METRIC: 0.01}) == "STOP"
    asha.on_trial_complete(None, recipe, {"epoch": 9, METRIC: 0.01})
