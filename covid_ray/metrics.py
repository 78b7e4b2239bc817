"""Classification metrics on numpy arrays (no torch or Ray needed).

Inputs are integer labels ``y_true`` of shape ``(n,)`` and class probabilities
``y_prob`` of shape ``(n, num_classes)`` whose rows sum to 1 (use ``softmax`` on
logits first). Metrics that are undefined on the given data, such as the ROC-AUC
of a class absent from ``y_true`` (common in small validation folds and bootstrap
resamples), are NaN rather than errors; macro averages skip NaN entries.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# scikit-learn is imported inside the functions that use it: importing it costs about
# a second, paid by every new Ray Train worker that only needs validation_summary.

logger = logging.getLogger(__name__)

# Probabilities are clipped to this before taking logs so one confidently wrong
# sample gives a large but finite NLL (sklearn's historical log_loss eps).
NLL_EPS = 1e-15


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check_inputs(y_true: np.ndarray, y_prob: np.ndarray, num_classes: int | None = None):
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_true.ndim != 1 or len(y_true) != len(y_prob):
        raise ValueError(
            f"expected y_true (n,) and y_prob (n, num_classes), got {y_true.shape} and {y_prob.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("no samples: y_true is empty")
    if num_classes is not None and y_prob.shape[1] != num_classes:
        raise ValueError(f"y_prob has {y_prob.shape[1]} columns but there are {num_classes} class names")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= y_prob.shape[1]:
        raise ValueError(f"y_true values must lie in [0, {y_prob.shape[1] - 1}], got {y_true.min()}..{y_true.max()}")
    if y_prob.min() < 0 or y_prob.max() > 1 or not np.allclose(y_prob.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("y_prob rows must be probabilities summing to 1; apply softmax() to logits")
    return y_true, y_prob


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; NaN (without numpy's warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def specificity_per_class(cm: np.ndarray) -> np.ndarray:
    """One-vs-rest specificity TN / (TN + FP) per class from a confusion matrix.

    ``cm[i, j]`` counts samples of true class i predicted as j. NaN for a class
    with no negatives (every sample belongs to it).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - cm.sum(axis=1) - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tn + fp > 0, tn / (tn + fp), np.nan)


def roc_auc_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC-AUC per class; NaN where a class has no positives or no negatives."""
    from sklearn.metrics import roc_auc_score

    y_true, y_prob = _check_inputs(y_true, y_prob)
    aucs = np.full(y_prob.shape[1], np.nan)
    for k in range(y_prob.shape[1]):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            aucs[k] = roc_auc_score(positives, y_prob[:, k])
    return aucs


def accuracy(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Top-1 accuracy of ``argmax(y_prob)``; a ready-made ``metric_fn`` for ``bootstrap_ci``."""
    from sklearn.metrics import accuracy_score

    y_true, y_prob = _check_inputs(y_true, y_prob)
    return float(accuracy_score(y_true, y_prob.argmax(axis=1)))


def macro_f1(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Macro F1 over classes present in ``y_true`` or the predictions (sklearn's default)."""
    from sklearn.metrics import precision_recall_fscore_support

    y_true, y_prob = _check_inputs(y_true, y_prob)
    labels = np.arange(y_prob.shape[1])
    _, _, f1, _ = precision_recall_fscore_support(
        y_true, y_prob.argmax(axis=1), labels=labels, zero_division=np.nan
    )
    return _nanmean(f1)


def compute_metrics(y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Summary and per-class metrics of argmax predictions.

    Args:
        y_true: integer labels, shape ``(n,)``.
        y_prob: class probabilities, shape ``(n, len(class_names))``.
        class_names: names in column order.

    Returns:
        ``{"num_samples", "accuracy", "macro_f1", "balanced_accuracy", "roc_auc_macro",
        "per_class": {name: {"precision", "recall", "specificity", "f1", "support",
        "roc_auc"}}, "confusion_matrix": [[...]]}`` with plain Python numbers.
        Undefined values are NaN: precision of a never-predicted class, recall
        and ROC-AUC of a class absent from ``y_true``, F1 of a class absent from
        both. ``macro_f1`` and ``balanced_accuracy`` (mean recall) average over
        the defined classes, as sklearn's ``f1_score(average="macro")`` and
        ``balanced_accuracy_score`` do.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true, y_prob = _check_inputs(y_true, y_prob, len(class_names))
    labels = np.arange(len(class_names))
    y_pred = y_prob.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=np.nan
    )
    specificity = specificity_per_class(cm)
    aucs = roc_auc_per_class(y_true, y_prob)
    per_class = {
        name: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "specificity": float(specificity[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
            "roc_auc": float(aucs[k]),
        }
        for k, name in enumerate(class_names)
    }
    return {
        "num_samples": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": _nanmean(f1),
        "balanced_accuracy": _nanmean(recall),
        "roc_auc_macro": _nanmean(aucs),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width confidence bins (Guo et al., 2017).

    Sum over bins of ``|accuracy - mean confidence|`` weighted by the fraction of
    samples in the bin; bins are ``(lo, hi]`` on the top-class probability.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y_true, y_prob = _check_inputs(y_true, y_prob)
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bins = np.searchsorted(inner_edges, confidence, side="left")
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins)
        - np.bincount(bins, weights=confidence, minlength=n_bins)
    )
    # |sum(acc) - sum(conf)| / n equals |mean acc - mean conf| * (count / n) per bin.
    return float(gap[counts > 0].sum() / len(y_true))


def nll(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    y_true, y_prob = _check_inputs(y_true, y_prob)
    p = np.clip(y_prob[np.arange(len(y_true)), y_true], NLL_EPS, 1.0)
    return float(-np.log(p).mean())


def bootstrap_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval of ``metric_fn(y_true, y_prob)``.

    All resample indices are drawn at once from ``np.random.default_rng(seed)``,
    so the interval is deterministic for a seed. Resamples where the metric is
    NaN (e.g. AUC with a class missing from the resample) are left out;
    ``(nan, nan)`` if every one is.
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot} and {alpha}")
    y_true, y_prob = _check_inputs(y_true, y_prob)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(y_true), size=(n_boot, len(y_true)))
    stats = np.array([metric_fn(y_true[idx], y_prob[idx]) for idx in indices], dtype=np.float64)
    stats = stats[~np.isnan(stats)]
    if stats.size < n_boot:
        logger.info("bootstrap_ci: %d of %d resamples gave NaN and were left out", n_boot - stats.size, n_boot)
    if stats.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def validation_summary(y_true: np.ndarray, logits: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Flat metrics the training loop reports each epoch (the loss is added by the caller).

    Returns:
        ``val_accuracy``, ``val_macro_f1``, ``val_balanced_accuracy`` and
        ``val_recall/<class name>`` for each class (NaN if absent from ``y_true``).
    """
    metrics = compute_metrics(y_true, softmax(logits), class_names)
    summary = {
        "val_accuracy": metrics["accuracy"],
        "val_macro_f1": metrics["macro_f1"],
        "val_balanced_accuracy": metrics["balanced_accuracy"],
    }
    for name in class_names:
        summary[f"val_recall/{name}"] = metrics["per_class"][name]["recall"]
    return summary
