"""What the search tells its searcher and its scheduler: trial arms, fidelity, the reference arm.

Three things Ray's stock pieces get wrong or lack for this project:

* **The multi-fidelity signal.** Ray 2.60's ``OptunaSearch.on_trial_complete`` tells Optuna
  that a trial ASHA stopped after 2 epochs is COMPLETE with its last value, so TPE models a
  2-epoch score as if it were a converged one. :class:`CovidSearch` reports each epoch as an
  Optuna intermediate value (``trial.report(value, step=epoch)``) and tells a trial that ended
  below full fidelity (or its own epoch budget) as PRUNED. Optuna's TPE ranks pruned trials
  below complete ones, by the step they reached and then their value, which is the right
  reading of an ASHA rung.
* **A warm start.** ``searcher.start_with`` in the search-space YAML lists configurations
  known to work; they are enqueued in the Optuna study (once per study, so a resumed search
  does not enqueue them again) and run first, marked ``arm: warm_start``.
* **A reference arm.** The hand recipe (``search_spaces/recipe.yaml``) runs as one trial of
  every search, marked ``arm: recipe``: it is the first suggestion, ASHA never stops it
  (:class:`ReferenceExemptASHA`), and it reaches the study only once it has finished, as a
  COMPLETE trial with its own parameters (when they lie inside the space), so the searcher
  learns from it without running the same configuration twice.

A trial's end is read from its last result: it reached full fidelity (``epoch`` at
``full_fidelity``, the scheduler's ``max_t``, or at the trial's own ``epochs`` where a space
that searches them gave it fewer: :func:`epoch_budget`), stopped itself by early stopping
(``early_stopped``), or else the scheduler stopped it. Everything here runs in the search
driver; the objective is ``best_<metric>``, the best validation value so far, which is what
the trial's checkpoint holds.
"""
from __future__ import annotations

import logging
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from covid_ray.artifacts.experiment import ARM_COLUMN, RECIPE_ARM, SEARCH_ARM, WARM_START_ARM

logger = logging.getLogger(__name__)

# In a trial's config (covid_ray.tune removes it before the trial's TrialConfig) and as
# trials.csv's column: one name for both.
ARM_KEY = ARM_COLUMN
RECIPE, WARM_START, SEARCH = RECIPE_ARM, WARM_START_ARM, SEARCH_ARM
ARMS = (RECIPE, WARM_START, SEARCH)
FIDELITY_ATTR = "epoch"


def trial_arm(config: dict) -> str:
    """``recipe``, ``warm_start`` or ``search`` (what a trial's config says it is)."""
    return str(config.get(ARM_KEY, SEARCH))


def epoch_budget(config: dict | None, full_fidelity: int) -> int:
    """The epochs a trial trains unless a scheduler stops it: ``full_fidelity``, or the trial's
    own ``epochs`` where a space that searches them gave it fewer."""
    own = (config or {}).get("epochs")
    return min(int(full_fidelity), int(own)) if own else int(full_fidelity)


def asha_exempt(config: dict | None) -> bool:
    """Whether ASHA leaves the trial alone: the reference (recipe) trial, which it never stops
    nor ranks other trials against."""
    return trial_arm(config or {}) == RECIPE


def stopped_by_scheduler(config: dict | None, epochs: int, *, early_stopped: bool, full_fidelity: int) -> bool:
    """Whether a trial that ended without error after ``epochs`` epochs was stopped by ASHA: below
    its epoch budget (:func:`epoch_budget`), not ended by its own early stopping, and not exempt
    (:func:`asha_exempt`). The one rule behind Optuna's PRUNED (:func:`end_state`), the
    console's "stopped" and ``trials.csv``'s ``stopped_early``."""
    return not asha_exempt(config) and not early_stopped and int(epochs) < epoch_budget(config, full_fidelity)


def end_state(result: dict | None, *, error: bool, full_fidelity: int) -> str:
    """``COMPLETE``, ``PRUNED`` or ``FAIL`` for a trial that ended with ``result`` as its last report.

    A trial that reached ``full_fidelity`` epochs, or its own epoch budget where that is fewer
    (a space that searches ``epochs``; Tune's results carry the trial's config), or that early
    stopping ended (it had converged by its own rule), is complete; one that ended below its
    budget without early stopping was stopped by the scheduler (:func:`stopped_by_scheduler`):
    pruned. An error with no usable result is a failure.
    """
    if error or not result or FIDELITY_ATTR not in result:
        return "FAIL"
    stopped = stopped_by_scheduler(result.get("config"), int(result[FIDELITY_ATTR]),
                                   early_stopped=bool(result.get("early_stopped", False)), full_fidelity=full_fidelity)
    return "PRUNED" if stopped else "COMPLETE"


class CovidSearch(OptunaSearch):
    """Optuna search (TPE or random sampler) with per-epoch reports, pruned trials, a warm start and a reference arm.

    Args:
        full_fidelity: the epoch count of a finished trial (the scheduler's ``max_t``).
        start_with: space points run first (``searcher.start_with``); keys not given are sampled.
        reference: the whole config of the reference trial (recipe), or None for no reference arm.
        **kwargs: passed to ``OptunaSearch`` (metric, mode, sampler, study_name, storage).
    """

    def __init__(self, *, full_fidelity: int, start_with: list[dict] | tuple = (), reference: dict | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self._full_fidelity = int(full_fidelity)
        self._start_with = [dict(p) for p in start_with]
        self._reference = None if reference is None else {**reference, ARM_KEY: RECIPE}
        self._reference_trial: str | None = None
        self._reference_steps: dict[int, float] = {}
        self._reported: dict[str, set[int]] = {}

    # -- the study

    def _setup_study(self, mode):
        super()._setup_study(mode)
        # Once per study: a resumed search loads the same study and must not queue them again.
        if self._start_with and not self._ot_study.trials:
            for point in self._start_with:
                self._ot_study.enqueue_trial(point, user_attrs={ARM_KEY: WARM_START})

    # -- Tune's calls

    def suggest(self, trial_id: str) -> dict | None:
        if self._reference is not None and self._reference_trial is None:
            self._reference_trial = trial_id
            return dict(self._reference)
        params = super().suggest(trial_id)
        if isinstance(params, dict):
            params[ARM_KEY] = self._ot_trials[trial_id].user_attrs.get(ARM_KEY, SEARCH)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric not in result or FIDELITY_ATTR not in result:
            return
        step, value = int(result[FIDELITY_ATTR]), float(result[self.metric])
        if trial_id == self._reference_trial:
            self._reference_steps[step] = value
            return
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        seen = self._reported.setdefault(trial_id, set())
        if step not in seen:  # a restarted worker group reports some epochs again
            self._ot_trials[trial_id].report(value, step)
            seen.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
            return
        if result and not error:
            # The result a scheduler stops a trial on reaches the searcher only here, not
            # through on_trial_result: it is the trial's last intermediate value.
            self.on_trial_result(trial_id, result)
        self._completed_trials.add(trial_id)
        if trial_id == self._reference_trial:
            self._tell_reference(result, error)
            return
        if trial_id not in self._ot_trials:
            return
        state = end_state(result, error=error, full_fidelity=self._full_fidelity)
        import optuna

        value = float(result[self.metric]) if state == "COMPLETE" and self.metric in (result or {}) else None
        if state == "COMPLETE" and value is None:
            state = "FAIL"
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value, state=optuna.trial.TrialState[state])
        except Exception as exc:  # noqa: BLE001 - e.g. a NaN value; Optuna's own message says which
            logger.warning("could not tell trial %s to Optuna: %s", trial_id, exc)

    def _tell_reference(self, result: dict | None, error: bool) -> None:
        """Add the finished reference trial to the study, when its parameters lie in the space."""
        import optuna

        if error or not result or self.metric not in result or not isinstance(self._space, dict):
            return
        params = {name: self._reference.get(name) for name in self._space}
        try:
            trial = optuna.trial.create_trial(
                params=params, distributions=self._space, value=float(result[self.metric]),
                intermediate_values=dict(self._reference_steps), user_attrs={ARM_KEY: RECIPE},
            )
        except ValueError as exc:  # a recipe value outside the searched ranges
            logger.info("the recipe trial is not added to the study (%s)", exc)
            return
        self._ot_study.add_trial(trial)


class ReferenceExemptASHA(ASHAScheduler):
    """ASHA that never stops (or ranks others against) the reference trial."""

    @staticmethod
    def _exempt(trial) -> bool:
        return asha_exempt(trial.config)

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._exempt(trial):
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._exempt(trial):
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if not self._exempt(trial):
            super().on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if not self._exempt(trial):
            super().on_trial_remove(tune_controller, trial)
