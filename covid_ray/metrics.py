"""Classification metrics on numpy arrays (no torch or Ray needed).

Inputs are integer labels ``y_true`` of shape ``(n,)`` and class probabilities
``y_prob`` of shape ``(n, num_classes)`` whose rows sum to 1 (use ``softmax`` on
logits first). Metrics that are undefined on the given data, such as the ROC-AUC
of a class absent from ``y_true`` (common in small validation folds and bootstrap
resamples), are NaN rather than errors; macro averages skip NaN entries.

Confidence intervals are percentile bootstraps that resample duplicate groups, not
single images (:func:`draw_resamples`), computed for every resample at once from
confusion matrices (:func:`bootstrap_cis`, :func:`paired_bootstrap_ci`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# scikit-learn is imported inside the functions that use it (ROC-AUC): importing it costs
# about a second, and a Ray Train worker, which only needs validation_summary, never pays it.

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
    return float(confusion_metrics(_predicted_confusion(*_check_inputs(y_true, y_prob)))["accuracy"])


def macro_f1(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Macro F1 over classes present in ``y_true`` or the predictions (sklearn's default)."""
    return float(confusion_metrics(_predicted_confusion(*_check_inputs(y_true, y_prob)))["macro_f1"])


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]``: samples of true class i predicted as j (integer labels in ``[0, num_classes)``)."""
    k = int(num_classes)
    cells = np.asarray(y_true, dtype=np.int64) * k + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(cells, minlength=k * k).reshape(k, k)


def _predicted_confusion(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """The confusion matrix of ``argmax(y_prob)`` (checked inputs)."""
    return confusion_matrix(y_true, y_prob.argmax(axis=1), y_prob.shape[1])


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
        ``balanced_accuracy_score`` do. All but ROC-AUC come from the confusion
        matrix through :func:`confusion_metrics`, the bootstrap's own definition.
    """
    y_true, y_prob = _check_inputs(y_true, y_prob, len(class_names))
    cm = _predicted_confusion(y_true, y_prob)
    stats = confusion_metrics(cm)
    aucs = roc_auc_per_class(y_true, y_prob)
    per_class = {
        name: {
            "precision": float(stats["precision"][k]),
            "recall": float(stats["recall"][k]),
            "specificity": float(stats["specificity"][k]),
            "f1": float(stats["f1"][k]),
            "support": int(cm[k].sum()),
            "roc_auc": float(aucs[k]),
        }
        for k, name in enumerate(class_names)
    }
    return {
        "num_samples": int(len(y_true)),
        "accuracy": float(stats["accuracy"]),
        "macro_f1": float(stats["macro_f1"]),
        "balanced_accuracy": float(stats["balanced_accuracy"]),
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


# --------------------------------------------------------------------------- bootstrap
#
# Confidence intervals resample the test set by duplicate group (the split manifest's
# ``group`` column): the images of a group are copies or near-copies of one radiograph,
# so they are one observation, and resampling them one by one would count that
# observation several times and narrow every interval. Each resample draws as many
# groups as there are, with replacement, and takes every image of a drawn group.
#
# The metrics reported with intervals (accuracy, macro-F1, per-class sensitivity and
# specificity) depend on the confusion matrix alone, so all resamples are computed at
# once: with G the (groups, K*K) confusion counts of each group and W the (n_boot,
# groups) draw counts, ``W @ G`` holds every resample's confusion matrix.


@dataclass(frozen=True)
class Resamples:
    """Bootstrap resamples of one evaluation set, drawn once and shared.

    Applying the same ``Resamples`` to two prediction sets of the same images gives
    paired resamples (see :func:`paired_bootstrap_ci`).
    """

    codes: np.ndarray  # (images,) group index of each image, 0 .. groups - 1
    counts: np.ndarray  # (n_boot, groups): how often each group is drawn in each resample
    by_group: bool  # False: no groups were given, so every image is its own group

    @property
    def n_boot(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_images(self) -> int:
        return int(len(self.codes))

    def image_counts(self, b: int) -> np.ndarray:
        """How many times each image enters resample ``b`` (its group's draw count)."""
        return self.counts[b][self.codes]


def draw_resamples(n: int, groups: Sequence | np.ndarray | None = None, *, n_boot: int = 1000,
                   seed: int = 0) -> Resamples:
    """Draw ``n_boot`` resamples of ``n`` images by group, from ``np.random.default_rng(seed)``.

    Args:
        n: number of images.
        groups: a group label per image (any hashable values); images with the same
            label are resampled together. None: one group per image (plain bootstrap).

    The draws depend only on the number of groups, ``n_boot`` and ``seed``, so the
    same arguments give the same resamples.
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 images and n_boot >= 1, got {n} and {n_boot}")
    if groups is None:
        codes = np.arange(n)
    else:
        groups = np.asarray(groups)
        if groups.shape != (n,):
            raise ValueError(f"expected one group per image ({n}), got groups of shape {groups.shape}")
        _, codes = np.unique(groups, return_inverse=True)
    num_groups = int(codes.max()) + 1
    draws = np.random.default_rng(seed).integers(0, num_groups, size=(n_boot, num_groups))
    # Per-resample histograms in one bincount: resample b's draws are offset by b * groups.
    offsets = (np.arange(n_boot) * num_groups)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=n_boot * num_groups)
    counts = counts.reshape(n_boot, num_groups).astype(np.int32)
    return Resamples(codes=codes.astype(np.int64), counts=counts, by_group=groups is not None)


def resampled_confusions(y_true: np.ndarray, y_prob: np.ndarray, resamples: Resamples) -> np.ndarray:
    """Confusion matrices of argmax predictions on every resample, shape (n_boot, K, K)."""
    y_true, y_prob = _check_inputs(y_true, y_prob)
    if len(y_true) != resamples.num_images:
        raise ValueError(f"the resamples are of {resamples.num_images} images, got {len(y_true)}")
    k = y_prob.shape[1]
    cells = (resamples.codes * k + y_true) * k + y_prob.argmax(axis=1)
    per_group = np.bincount(cells, minlength=resamples.num_groups * k * k).reshape(resamples.num_groups, k * k)
    # float64 holds these integer counts exactly and lets BLAS do the product.
    return (resamples.counts.astype(np.float64) @ per_group.astype(np.float64)).reshape(-1, k, k)


def confusion_metrics(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of confusion matrices ``cm[..., true, predicted]``, vectorized over leading axes.

    Returns arrays ``accuracy``, ``macro_f1``, ``balanced_accuracy`` (shape ``cm.shape[:-2]``)
    and ``recall`` (sensitivity), ``specificity``, ``precision``, ``f1`` (one more axis,
    per class), with the NaN rules of :func:`compute_metrics`: recall NaN for a class
    absent from the truth, precision NaN for a class never predicted, F1 NaN for a class
    absent from both, specificity NaN without negatives; averages over defined classes.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    total = cm.sum(axis=(-2, -1))
    fp = predicted - tp
    tn = total[..., None] - support - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "accuracy": np.where(total > 0, tp.sum(axis=-1) / total, np.nan),
            "recall": np.where(support > 0, tp / support, np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "precision": np.where(predicted > 0, tp / predicted, np.nan),
            # 2 TP / (2 TP + FP + FN), written as scikit-learn does (same rounding).
            "f1": np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan),
        }
    out["macro_f1"] = _nanmean_last(out["f1"])
    out["balanced_accuracy"] = _nanmean_last(out["recall"])
    return out


def _nanmean_last(values: np.ndarray) -> np.ndarray:
    defined = ~np.isnan(values)
    count = defined.sum(axis=-1)
    total = np.where(defined, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def percentile_interval(stats: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of bootstrap statistics; NaN resamples are left out, (nan, nan) if all are."""
    stats = np.asarray(stats, dtype=np.float64)
    finite = stats[~np.isnan(stats)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def bootstrap_cis(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str], resamples: Resamples, *,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile ``(1 - alpha)`` intervals of the confusion-matrix metrics, all resamples at once.

    Returns:
        ``{"accuracy", "macro_f1", "sensitivity/<class>", "specificity/<class>"}`` ->
        ``(low, high)``. A resample where a metric is undefined (a class absent from
        it) is left out of that metric's interval.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"need 0 < alpha < 1, got {alpha}")
    y_true, y_prob = _check_inputs(y_true, y_prob, len(class_names))
    stats = confusion_metrics(resampled_confusions(y_true, y_prob, resamples))
    out = {name: percentile_interval(stats[name], alpha) for name in ("accuracy", "macro_f1")}
    for key, name in (("recall", "sensitivity"), ("specificity", "specificity")):
        for k, cls in enumerate(class_names):
            out[f"{name}/{cls}"] = percentile_interval(stats[key][:, k], alpha)
    return out


def paired_bootstrap_ci(
    y_true: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, resamples: Resamples, *,
    metric: str = "macro_f1", alpha: float = 0.05,
) -> tuple[float, float, float]:
    """``metric(a) - metric(b)`` on the whole set and its percentile interval over paired resamples.

    Both prediction sets are scored on the same resamples, so what the two models get
    right together cancels out of the interval. ``metric`` is one of the summary keys
    of :func:`confusion_metrics` (``accuracy``, ``macro_f1``, ``balanced_accuracy``).

    Returns:
        ``(difference, low, high)``.
    """
    if metric not in ("accuracy", "macro_f1", "balanced_accuracy"):
        raise ValueError(f"unknown metric {metric!r}; choose accuracy, macro_f1 or balanced_accuracy")
    if not 0 < alpha < 1:
        raise ValueError(f"need 0 < alpha < 1, got {alpha}")
    y_true, prob_a = _check_inputs(y_true, prob_a)
    _, prob_b = _check_inputs(y_true, prob_b, prob_a.shape[1])
    point = [confusion_metrics(_predicted_confusion(y_true, p))[metric] for p in (prob_a, prob_b)]
    diff = (confusion_metrics(resampled_confusions(y_true, prob_a, resamples))[metric]
            - confusion_metrics(resampled_confusions(y_true, prob_b, resamples))[metric])
    return (float(point[0] - point[1]), *percentile_interval(diff, alpha))


def bootstrap_ci(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` confidence interval of any ``metric_fn(y_true, y_prob)``.

    The general, slow path: ``metric_fn`` is called once per resample. For accuracy,
    macro-F1, sensitivity and specificity use :func:`bootstrap_cis`, which gives the
    same intervals from the same draws at once. Resamples come from
    :func:`draw_resamples` (by ``groups`` when given), so the interval is
    deterministic for a seed. Resamples where the metric is NaN (e.g. AUC with a
    class missing from the resample) are left out; ``(nan, nan)`` if every one is.
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot} and {alpha}")
    y_true, y_prob = _check_inputs(y_true, y_prob)
    resamples = draw_resamples(len(y_true), groups, n_boot=n_boot, seed=seed)
    rows = np.arange(len(y_true))
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.repeat(rows, resamples.image_counts(b))  # every image of a drawn group, as often as drawn
        stats[b] = metric_fn(y_true[idx], y_prob[idx])
    left_out = int(np.isnan(stats).sum())
    if left_out:
        logger.info("bootstrap_ci: %d of %d resamples gave NaN and were left out", left_out, n_boot)
    return percentile_interval(stats, alpha)


def validation_summary(y_true: np.ndarray, logits: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Flat metrics the training loop reports each epoch (the loss is added by the caller).

    The values of :func:`compute_metrics`, without its ROC-AUC: numpy alone, so the
    training worker never imports scikit-learn.

    Returns:
        ``val_accuracy``, ``val_macro_f1``, ``val_balanced_accuracy`` and
        ``val_recall/<class name>`` for each class (NaN if absent from ``y_true``).
    """
    stats = confusion_metrics(_predicted_confusion(*_check_inputs(y_true, softmax(logits), len(class_names))))
    summary = {
        "val_accuracy": float(stats["accuracy"]),
        "val_macro_f1": float(stats["macro_f1"]),
        "val_balanced_accuracy": float(stats["balanced_accuracy"]),
    }
    for k, name in enumerate(class_names):
        summary[f"val_recall/{name}"] = float(stats["recall"][k])
    return summary
