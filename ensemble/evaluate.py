"""Clinical evaluation on the test split: the ensemble and every member, side by side.

For each model: accuracy, macro-F1, balanced accuracy, per-class precision, recall
(sensitivity), specificity, F1, support and one-vs-rest ROC-AUC, macro ROC-AUC, ECE,
NLL, and 95% percentile-bootstrap intervals for accuracy, macro-F1 and every class's
sensitivity and specificity. The bootstrap resamples the split manifest's duplicate
groups (:func:`split_resamples`), and the same resamples serve every model, so a
difference between two models gets a paired interval (:func:`compare`). The ensemble
also gets scikit-learn's ``classification_report``. This module only computes;
``ensemble.report`` and ``ensemble.plots`` write the Markdown and the figures.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report

from covid_ray.metrics import (
    Resamples,
    bootstrap_cis,
    compute_metrics,
    draw_resamples,
    expected_calibration_error,
    nll,
    paired_bootstrap_ci,
)

logger = logging.getLogger(__name__)

CI_LEVEL = 0.95
BOOT_SEED = 0  # one seed for every interval of a build: the resamples are shared


def covid_index(classes: Sequence[str]) -> int | None:
    """Index of the COVID class (exact name first, then any name containing 'covid')."""
    for k, name in enumerate(classes):
        if name.lower() == "covid":
            return k
    for k, name in enumerate(classes):
        if "covid" in name.lower():
            return k
    return None


def split_resamples(manifest: pd.DataFrame, split: str, sha1: Sequence[str], *, n_boot: int,
                    seed: int = BOOT_SEED) -> tuple[Resamples, dict[str, Any]]:
    """Bootstrap resamples of one split by the manifest's duplicate groups.

    Args:
        manifest: the split manifest; its ``split`` rows are in the order of ``sha1``
            (the order :func:`ensemble.members.member_probabilities` returns).
        sha1: the image hashes of the evaluated rows, to check that order.

    Returns:
        The resamples and what they are made of (``unit``: "duplicate group" or
        "image", ``groups``, ``images``, ``note``). A manifest without a complete
        ``group`` column (an older one) falls back to one group per image, and the
        note says so: near-duplicates then narrow the intervals.
    """
    rows = manifest[manifest["split"] == split]
    if rows["sha1"].tolist() != list(sha1):
        raise ValueError(f"the {split!r} rows of the split manifest do not match the evaluated images")
    groups = rows["group"] if "group" in rows.columns else None
    if groups is not None and (groups.astype(str).str.strip() == "").any():
        groups = None
    info: dict[str, Any] = {"unit": "duplicate group", "images": int(len(rows)), "n_boot": n_boot, "seed": seed}
    if groups is None:
        info.update(unit="image", note="the split manifest has no complete `group` column (an older manifest): "
                                       "resampled one image at a time, so near-duplicates narrow the intervals")
        logger.warning("bootstrap: %s", info["note"])
    resamples = draw_resamples(len(rows), None if groups is None else groups.astype(str).to_numpy(),
                               n_boot=n_boot, seed=seed)
    info["groups"] = resamples.num_groups
    return resamples, info


def confidence_intervals(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                         resamples: Resamples) -> dict[str, list[float]]:
    """95% bootstrap intervals ``[low, high]`` keyed by metric name (see ``bootstrap_cis``)."""
    cis = bootstrap_cis(labels, probs, list(classes), resamples, alpha=1 - CI_LEVEL)
    return {name: list(pair) for name, pair in cis.items()}


def evaluate_probs(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], *, resamples: Resamples | None = None
) -> dict[str, Any]:
    """All test metrics of one model's probabilities (plain Python numbers, NaN where undefined).

    ``ci95`` holds the bootstrap intervals over ``resamples``; empty without them.
    """
    metrics = compute_metrics(labels, probs, list(classes))
    metrics["ece"] = expected_calibration_error(labels, probs)
    metrics["nll"] = nll(labels, probs)
    k = covid_index(classes)
    metrics["covid_sensitivity"] = metrics["per_class"][classes[k]]["recall"] if k is not None else None
    metrics["ci95"] = confidence_intervals(labels, probs, classes, resamples) if resamples is not None else {}
    return metrics


def verdict(difference: float, low: float, high: float) -> str:
    """``beat``, ``no clear difference`` or ``did not beat`` for a difference A - B and its CI.

    A difference of 0 or less did not beat, whatever its interval; a positive one beat
    only when its whole 95% interval is above 0, and is otherwise no clear difference.
    """
    if not difference > 0:  # also NaN
        return "did not beat"
    return "beat" if low > 0 else "no clear difference"


def compare(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, resamples: Resamples,
            metric: str = "macro_f1") -> dict[str, Any]:
    """``{metric: A - B on the whole split, "ci95": paired interval, "verdict"}`` (see :func:`verdict`)."""
    diff, low, high = paired_bootstrap_ci(labels, probs_a, probs_b, resamples, metric=metric, alpha=1 - CI_LEVEL)
    return {metric: diff, "ci95": [low, high], "verdict": verdict(diff, low, high)}


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
        "image_size": member.preprocess.image_size,
        "in_chans": member.preprocess.in_chans,
        "checkpoint": str(member.checkpoint),
        f"best_{val_metric}": member.score,  # the trials.csv value it was ranked by
        "weight": float(weight),
        "epoch": int(member.payload.get("epoch", -1)),
        "config": config,  # the trial's resolved config, as its checkpoint recorded it
        **metrics,
    }
