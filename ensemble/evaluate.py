"""Clinical evaluation on the test split: the ensemble and every member, side by side.

For each model: accuracy, macro-F1, balanced accuracy, per-class precision, recall
(sensitivity), specificity, F1, support and one-vs-rest ROC-AUC, macro ROC-AUC, ECE,
NLL, and 95% percentile-bootstrap intervals for accuracy, macro-F1 and COVID
sensitivity (when a COVID class exists). The ensemble also gets scikit-learn's
``classification_report``. This module only computes; ``ensemble.report`` and
``ensemble.plots`` write the Markdown and the figures.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import classification_report

from covid_ray.metrics import (
    accuracy,
    bootstrap_ci,
    compute_metrics,
    expected_calibration_error,
    macro_f1,
    nll,
)

CI_LEVEL = 0.95


def covid_index(classes: Sequence[str]) -> int | None:
    """Index of the COVID class (exact name first, then any name containing 'covid')."""
    for k, name in enumerate(classes):
        if name.lower() == "covid":
            return k
    for k, name in enumerate(classes):
        if "covid" in name.lower():
            return k
    return None


def sensitivity_fn(k: int):
    """``metric_fn(y_true, y_prob)``: recall of class ``k``; NaN when a resample lacks it."""

    def sensitivity(y_true: np.ndarray, y_prob: np.ndarray) -> float:
        positives = y_true == k
        if not positives.any():
            return float("nan")
        return float((y_prob[positives].argmax(axis=1) == k).mean())

    return sensitivity


def confidence_intervals(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, n_boot: int = 1000, seed: int = 0
) -> dict[str, list[float]]:
    """95% bootstrap intervals ``[low, high]`` keyed by metric name."""
    fns = {"accuracy": accuracy, "macro_f1": macro_f1}
    k = covid_index(classes)
    if k is not None:
        fns[f"sensitivity/{classes[k]}"] = sensitivity_fn(k)
    alpha = 1 - CI_LEVEL
    return {name: list(bootstrap_ci(labels, probs, fn, n_boot=n_boot, alpha=alpha, seed=seed)) for name, fn in fns.items()}


def evaluate_probs(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """All test metrics of one model's probabilities (plain Python numbers, NaN where undefined)."""
    metrics = compute_metrics(labels, probs, list(classes))
    metrics["ece"] = expected_calibration_error(labels, probs)
    metrics["nll"] = nll(labels, probs)
    k = covid_index(classes)
    metrics["covid_sensitivity"] = metrics["per_class"][classes[k]]["recall"] if k is not None else None
    metrics["ci95"] = confidence_intervals(labels, probs, classes, n_boot=n_boot, seed=seed) if n_boot > 0 else {}
    return metrics


def sklearn_report(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[str, dict]:
    """scikit-learn's ``classification_report`` as text and as a dict."""
    kw = dict(labels=list(range(len(classes))), target_names=list(classes), digits=4, zero_division=0)
    pred = np.asarray(probs).argmax(axis=1)
    return classification_report(labels, pred, **kw), classification_report(labels, pred, output_dict=True, **kw)


def member_entry(member, weight: float, metrics: dict[str, Any], val_metric: str) -> dict[str, Any]:
    """One ``members`` row of metrics.json."""
    config = member.payload.get("config", {})
    return {
        "trial_id": member.trial_id,
        "model": member.model_name,
        "status": member.status,  # a trial that ended in ERROR still has its best checkpoint
        "image_size": int(member.preprocess["image_size"]),
        "in_chans": int(member.preprocess["in_chans"]),
        "checkpoint": str(member.checkpoint),
        f"best_{val_metric}": member.score,  # the trials.csv value it was ranked by
        "weight": float(weight),
        "epoch": int(member.payload.get("epoch", -1)),
        "config": config,  # the trial's resolved config, as its checkpoint recorded it
        **metrics,
    }
