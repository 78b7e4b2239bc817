"""What the ensemble is measured against on the test split: its best member and the hand recipe.

A search is worth its compute when its product beats what a person would have trained
without it. Two references, both compared with paired group-bootstrap intervals of the
difference in test macro-F1 (the same resamples for both models, see
:func:`ensemble.evaluate.compare`):

* the **best member**: the trial ranked first on validation, what one would deploy
  without an ensemble (:func:`best_member_comparison`);
* the **hand recipe**: the tutorial's recipe (seed_cnn, Adam lr 1e-3, ...), which a
  search runs as one of its trials and marks in ``trials.csv`` column ``arm`` with the
  value ``recipe`` (the other values: ``warm_start``, a portfolio configuration the
  searcher evaluated first; ``search``, sampled by the searcher). Its checkpoint is
  evaluated on val and test like a member (same probability cache) even when it is not
  among the top K (:func:`recipe_comparison`). A search without an ``arm`` column (an
  older one) ran without the recipe arm.

Verdicts (:func:`ensemble.evaluate.verdict`): a difference of 0 or less "did not beat";
a positive one "beat" when its whole 95% interval is above 0, else "no clear difference".
Nothing here is fitted; the test split is only evaluated.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covid_ray.artifacts.experiment import ARM_COLUMN, RECIPE_ARM, Experiment
from covid_ray.metrics import Resamples, accuracy, macro_f1

from ensemble.evaluate import compare, evaluate_probs, member_entry
from ensemble.members import SplitProbs, member_probabilities
from ensemble.select import Member, Selection, load_trial

logger = logging.getLogger(__name__)



def _ci_text(ci: list) -> str:
    if not ci or any(v is None or v != v for v in ci):
        return "no interval"
    return f"95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def find_recipe(trials: pd.DataFrame) -> tuple[dict | None, str]:
    """The ``arm == "recipe"`` row of ``trials.csv``, or None and why there is none."""
    if ARM_COLUMN not in trials.columns:
        return None, ("trials.csv has no `arm` column: this search ran without the hand-recipe reference arm "
                      "(a search from before the arm existed)")
    rows = trials[trials[ARM_COLUMN].astype(str).str.strip() == RECIPE_ARM].drop_duplicates("trial_id")
    if rows.empty:
        return None, "no trial of this search has arm = recipe: it ran without the hand-recipe reference arm"
    row = rows.iloc[0].to_dict()
    if len(rows) > 1:
        logger.warning("%d trials have arm = recipe; comparing with the first, %s", len(rows), row["trial_id"])
    return row, ""


def _recipe_member(row: dict, selection: Selection, experiment: Experiment, metric: str) -> tuple[Member, int | None]:
    """The recipe trial as a member: the selected one when it is in the ensemble, else loaded here."""
    trial_id = str(row["trial_id"])
    for i, member in enumerate(selection.members):
        if member.trial_id == trial_id:
            return member, i
    checkpoint = str(row.get("checkpoint", "")).strip()
    if not checkpoint:
        status = str(row.get("status", "")).strip() or "unknown status"
        error = str(row.get("error", "")).strip()
        raise ValueError(f"the recipe trial {trial_id} has no checkpoint ({status}{': ' + error if error else ''})")
    score = pd.to_numeric(pd.Series([row.get(f"best_{metric}")]), errors="coerce").iloc[0]
    return load_trial(row, float(score), experiment.classes), None


def recipe_comparison(
    experiment: Experiment,
    selection: Selection,
    trials: pd.DataFrame,
    probs: dict[str, SplitProbs],
    ensemble_test: np.ndarray,
    weights: np.ndarray,
    resamples: Resamples,
    *,
    manifest: pd.DataFrame,
    metric: str,
    cache_dir: str | Path,
    data_cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The ``recipe`` block of metrics.json: the recipe trial on test, and the ensemble minus it.

    Args:
        probs: the members' val and test probabilities (reused when the recipe is one).
        ensemble_test: the ensemble's test probabilities as evaluated.
        weights: the members' weights (the recipe's is recorded when it is one).

    Never raises for a missing or unusable recipe checkpoint: the block then says
    ``present: false`` with the reason, and the build goes on.
    """
    row, note = find_recipe(trials)
    if row is None:
        return {"present": False, "note": note}
    trial_id = str(row["trial_id"])
    try:
        member, index = _recipe_member(row, selection, experiment, metric)
        if index is not None:
            val, test = probs["val"].probs[index], probs["test"].probs[index]
        else:
            own = member_probabilities([member], experiment, manifest, ("val", "test"),
                                       cache_dir=cache_dir, data_cache_dir=data_cache_dir)
            val, test = own["val"].probs[0], own["test"].probs[0]
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
        reason = f"checkpoint lacks key {exc}" if isinstance(exc, KeyError) else str(exc)
        logger.warning("the recipe trial %s cannot be evaluated: %s", trial_id, reason)
        return {"present": False, "trial_id": trial_id, "checkpoint": str(row.get("checkpoint", "")),
                "note": f"the recipe trial {trial_id} could not be evaluated: {reason}"}
    labels = probs["test"].labels
    entry = member_entry(member, float(weights[index]) if index is not None else 0.0,
                         evaluate_probs(labels, test, experiment.classes, resamples=resamples), metric)
    diff = compare(labels, ensemble_test, test, resamples)
    verdict = diff.pop("verdict")
    return {
        "present": True,
        **entry,
        "arm": RECIPE_ARM,
        "in_ensemble": index is not None,
        "val": {"macro_f1": macro_f1(probs["val"].labels, val), "accuracy": accuracy(probs["val"].labels, val)},
        "ensemble_minus_recipe": diff,
        "verdict": verdict,
        "summary": recipe_sentence(verdict, diff, trial_id, synthetic=experiment.synthetic),
    }


def recipe_sentence(verdict: str, diff: dict, trial_id: str, *, synthetic: bool) -> str:
    """The plain-words verdict on the search against the hand recipe."""
    d, ci = diff["macro_f1"], _ci_text(diff["ci95"])
    tag = " (synthetic data)" if synthetic else ""
    if verdict == "beat":
        return (f"The search beat the hand recipe{tag}: the ensemble's test macro-F1 is {d:+.4f} above the "
                f"recipe trial {trial_id}'s ({ci}, entirely above 0).")
    if verdict == "no clear difference":
        return (f"No clear difference between the search and the hand recipe{tag}: the ensemble's test macro-F1 "
                f"is {d:+.4f} above the recipe trial {trial_id}'s, but the {ci} includes 0.")
    better = " The recipe is clearly better." if diff["ci95"][1] is not None and diff["ci95"][1] < 0 else ""
    return (f"The search did not beat the hand recipe{tag}: ensemble minus recipe trial {trial_id} test "
            f"macro-F1 is {d:+.4f} ({ci}).{better}")


def best_member_comparison(selection: Selection, test: SplitProbs, ensemble_test: np.ndarray,
                           resamples: Resamples, weights: np.ndarray, *, synthetic: bool,
                           fell_back: bool = False) -> dict[str, Any]:
    """The ``vs_best_member`` block: the ensemble minus the member ranked first on validation, on test.

    ``fell_back``: the validation guard replaced the ensemble by one member (the sentence says so).
    """
    top = selection.members[0]
    diff = compare(test.labels, ensemble_test, test.probs[0], resamples)
    verdict = diff.pop("verdict")
    d, ci = diff["macro_f1"], _ci_text(diff["ci95"])
    tag = " (synthetic data)" if synthetic else ""
    who = f"{top.model_name} trial {top.trial_id} (ranked first on validation)"
    if np.count_nonzero(weights) == 1 and weights[0] > 0:  # the "ensemble" is that member (and a temperature)
        why = ": the validation guard chose it" if fell_back else ""
        sentence = f"The ensemble is its best member alone, {who}{why}; nothing to compare{tag}."
    else:
        words = {"beat": "The ensemble beat its best member", "did not beat": "The ensemble did not beat its best member",
                 "no clear difference": "No clear difference between the ensemble and its best member"}[verdict]
        sentence = f"{words}, {who}: test macro-F1 {d:+.4f} ({ci}){tag}."
        if fell_back:
            sentence += " The validation guard replaced the greedy ensemble by the best member on validation."
    return {"trial_id": top.trial_id, "model": top.model_name, "ensemble_minus_member": diff, "verdict": verdict,
            "summary": sentence}


def summary_lines(m: dict) -> list[str]:
    """Terminal lines for ``ensemble.build``: the combination's choice, and both references."""
    lines = []
    c = m.get("combination")
    if c:
        lines.append(f"combination {c['method']}: {c['reason']}")
    if m.get("vs_best_member"):
        lines.append(m["vs_best_member"]["summary"])
    r = m.get("recipe")
    if r is None:
        return lines
    if not r.get("present"):
        return lines + [f"hand recipe: not compared ({r.get('note')})"]
    return lines + _side_by_side(m) + [r["summary"]]


def _side_by_side(m: dict) -> list[str]:
    """The ensemble, the best single trial and the recipe trial on test, with their 95% intervals."""
    r, top = m["recipe"], m["members"][0]

    def cell(x: dict, value: float | None, ci_key: str) -> str:
        ci = x.get("ci95", {}).get(ci_key)
        ci_text = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else ""
        return "n/a" if value is None else f"{value:.3f}{ci_text}"

    classes = m["classes"]
    row = "{:<26}" + " {:>19}" * (2 + len(classes))
    lines = ["test split, 95% CI:", row.format("model", "macro-F1", "accuracy", *[f"{c[:12]} sens." for c in classes])]
    for name, x in (("ensemble", m["ensemble"]), (f"best trial {top['trial_id']}", top),
                    (f"hand recipe {r['trial_id']}", r)):
        lines.append(row.format(name[:26], cell(x, x["macro_f1"], "macro_f1"), cell(x, x["accuracy"], "accuracy"),
                                *[cell(x, x["per_class"][c]["recall"], f"sensitivity/{c}") for c in classes]))
    return lines
