"""Tests for covid_ray.metrics on small hand-checked arrays."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from covid_ray.metrics import (
    accuracy,
    bootstrap_ci,
    bootstrap_cis,
    compute_metrics,
    confusion_metrics,
    draw_resamples,
    paired_bootstrap_ci,
    percentile_interval,
    resampled_confusions,
    expected_calibration_error,
    macro_f1,
    nll,
    softmax,
    validation_summary,
)

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]

# 8 samples; predictions (argmax) are [0, 0, 1, 1, 1, 2, 2, 0].
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
Y_PROB = np.array(
    [
        [0.8, 0.1, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.5, 0.4],
        [0.1, 0.2, 0.7],
        [0.2, 0.2, 0.6],
        [0.5, 0.1, 0.4],
    ]
)
# Confusion matrix (rows true, columns predicted):
#   [[2, 1, 0],
#    [0, 2, 0],
#    [1, 0, 2]]


def test_compute_metrics_hand_values():
    m = compute_metrics(Y_TRUE, Y_PROB, CLASSES)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["num_samples"] == 8
    covid = m["per_class"]["COVID"]
    assert covid["precision"] == pytest.approx(2 / 3)
    assert covid["recall"] == pytest.approx(2 / 3)
    assert covid["f1"] == pytest.approx(2 / 3)
    assert covid["specificity"] == pytest.approx(4 / 5)  # 5 negatives, 1 predicted COVID
    assert covid["support"] == 3
    normal = m["per_class"]["Normal"]
    assert normal["precision"] == pytest.approx(2 / 3) and normal["recall"] == 1.0
    assert normal["f1"] == pytest.approx(0.8)
    # Per-class F1 = 2/3, 0.8, 0.8.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.8) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PROB.argmax(1), average="macro"))
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PROB.argmax(1)))
    assert m["roc_auc_macro"] == pytest.approx(roc_auc_score(Y_TRUE, Y_PROB, multi_class="ovr"))
    # COVID scores of positives: .8 .6 .3; of negatives: .2 .1 .1 .2 .5 -> 14 of 15 pairs ordered.
    assert covid["roc_auc"] == pytest.approx(14 / 15)


def test_specificity_from_known_confusion_matrix():
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    # class 0: FP = 2, TN = 16 - 6 - 2 = 8;  class 1: FP = 1, TN = 16 - 6 - 1 = 9
    # class 2: FP = 1, TN = 16 - 4 - 1 = 11
    np.testing.assert_allclose(confusion_metrics(cm)["specificity"], [8 / 10, 9 / 10, 11 / 12])
    # A class that owns every sample has no negatives: undefined, not a crash.
    assert np.isnan(confusion_metrics(np.array([[3, 0], [0, 0]]))["specificity"][0])


def test_missing_class_gives_nan_auc_without_exception():
    y_true = np.array([0, 0, 1, 1])  # class 2 absent
    y_prob = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn "ill-defined" warnings either
        m = compute_metrics(y_true, y_prob, CLASSES)
    vp = m["per_class"]["Viral Pneumonia"]
    assert math.isnan(vp["roc_auc"]) and math.isnan(vp["recall"]) and vp["support"] == 0
    assert vp["precision"] == 0.0 and vp["f1"] == 0.0  # predicted once, wrongly
    assert m["per_class"]["COVID"]["roc_auc"] == 1.0
    assert m["per_class"]["Normal"]["roc_auc"] == 0.75
    assert m["roc_auc_macro"] == pytest.approx((1.0 + 0.75) / 2)
    with pytest.warns(UserWarning, match="not in y_true"):  # sklearn's reference warns; ours must not
        reference = balanced_accuracy_score(y_true, y_prob.argmax(1))
    assert m["balanced_accuracy"] == pytest.approx(reference)


def test_never_predicted_class_has_nan_precision_and_zero_f1():
    y_true = np.array([0, 1, 2])
    y_prob = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    m = compute_metrics(y_true, y_prob, CLASSES)
    vp = m["per_class"]["Viral Pneumonia"]
    assert math.isnan(vp["precision"]) and vp["recall"] == 0.0 and vp["f1"] == 0.0


def test_ece_constructed_case():
    # Two confidence groups, 5 bins of width 0.2:
    #   4 samples at confidence 0.9, 3 correct -> |0.75 - 0.9| = 0.15, weight 4/6
    #   2 samples at confidence 0.7, both correct -> |1.0 - 0.7| = 0.3, weight 2/6
    y_prob = np.array([[0.9, 0.1]] * 4 + [[0.3, 0.7]] * 2)
    y_true = np.array([0, 0, 0, 1, 1, 1])
    expected = 4 / 6 * 0.15 + 2 / 6 * 0.3
    assert expected_calibration_error(y_true, y_prob, n_bins=5) == pytest.approx(expected)
    # Perfectly calibrated: confidence 0.5 and half right.
    y_half = np.array([[0.5, 0.5]] * 4)
    assert expected_calibration_error(np.array([0, 0, 1, 1]), y_half, n_bins=10) == pytest.approx(0.0)


def test_nll_hand_value_and_sklearn():
    y_true = np.array([0, 1, 1])
    y_prob = np.array([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
    expected = -(math.log(0.5) + math.log(0.8) + math.log(0.1)) / 3
    assert nll(y_true, y_prob) == pytest.approx(expected)
    assert nll(y_true, y_prob) == pytest.approx(log_loss(y_true, y_prob, labels=[0, 1]))
    assert math.isfinite(nll(np.array([0]), np.array([[0.0, 1.0]])))


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 3, size=200)
    y_prob = softmax(rng.normal(size=(200, 3)) + 2.0 * np.eye(3)[y_true])
    point = accuracy(y_true, y_prob)
    low, high = bootstrap_ci(y_true, y_prob, accuracy, n_boot=300, seed=7)
    assert low < point < high
    assert (low, high) == bootstrap_ci(y_true, y_prob, accuracy, n_boot=300, seed=7)
    assert (low, high) != bootstrap_ci(y_true, y_prob, accuracy, n_boot=300, seed=8)
    f1_low, f1_high = bootstrap_ci(y_true, y_prob, macro_f1, n_boot=200)
    assert f1_low < macro_f1(y_true, y_prob) < f1_high


def test_bootstrap_ci_skips_nan_resamples():
    y_true = np.array([0] * 9 + [1])
    y_prob = np.tile([0.6, 0.4], (10, 1))

    def auc(yt, yp):
        return float("nan") if len(set(yt)) < 2 else roc_auc_score(yt, yp[:, 1])

    low, high = bootstrap_ci(y_true, y_prob, auc, n_boot=50, seed=0)
    assert low == high == 0.5
    assert all(math.isnan(v) for v in bootstrap_ci(y_true[:9], y_prob[:9], auc, n_boot=10))


def test_validation_summary_keys_and_values():
    logits = np.log(Y_PROB) + 3.0  # softmax is shift-invariant
    summary = validation_summary(Y_TRUE, logits, CLASSES)
    assert set(summary) == {
        "val_accuracy",
        "val_macro_f1",
        "val_balanced_accuracy",
        "val_recall/COVID",
        "val_recall/Normal",
        "val_recall/Viral Pneumonia",
    }
    assert summary["val_accuracy"] == pytest.approx(0.75)
    assert summary["val_recall/Normal"] == 1.0
    assert summary["val_recall/COVID"] == pytest.approx(2 / 3)
    assert all(isinstance(v, float) for v in summary.values())


@pytest.mark.parametrize("seed", range(6))
def test_validation_summary_equals_sklearn_with_absent_and_never_predicted_classes(seed):
    rng = np.random.default_rng(seed)
    k, n = 4, 30
    y = rng.integers(0, k - 1, n)  # class 3 absent from the truth
    logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[y]
    logits[:, 3] -= 50.0 * (seed % 2)  # and, for odd seeds, never predicted either
    names = ["a", "b", "c", "d"]
    summary = validation_summary(y, logits, names)
    pred = softmax(logits).argmax(axis=1)
    _, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=np.arange(k), zero_division=np.nan)
    assert summary["val_accuracy"] == pytest.approx(accuracy_score(y, pred), rel=1e-12)
    assert summary["val_macro_f1"] == pytest.approx(np.nanmean(f1), rel=1e-12)
    assert summary["val_balanced_accuracy"] == pytest.approx(np.nanmean(recall), rel=1e-12)
    assert math.isnan(summary["val_recall/d"])
    full = compute_metrics(y, softmax(logits), names)
    assert summary["val_macro_f1"] == full["macro_f1"] and summary["val_accuracy"] == full["accuracy"]


def test_the_training_step_never_imports_sklearn():
    """A Ray Train worker pays every import of the epoch path at each trial's start.

    (pandas is not checked: Ray Train's worker imports it on its own.)
    """
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import covid_ray.engine\n"
        "from covid_ray.metrics import validation_summary\n"
        "validation_summary(np.array([0, 1, 1]), np.eye(2)[[0, 1, 0]], ['a', 'b'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 1000.0], [0.0, -1000.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5], [1.0, 0.0]])


@pytest.mark.parametrize(
    "y_true, y_prob, match",
    [
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.0, 1.0]]), "softmax"),
        (np.array([0, 3]), np.array([[0.5, 0.5], [0.5, 0.5]]), r"\[0, 1\]"),
        (np.array([0.0, 1.0]), np.array([[0.5, 0.5], [0.5, 0.5]]), "integer"),
        (np.array([0]), np.array([[0.5, 0.5], [0.5, 0.5]]), "shape|expected"),
    ],
)
def test_bad_inputs_raise_clear_errors(y_true, y_prob, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(y_true, y_prob, ["a", "b"])


def test_class_name_count_must_match_columns():
    with pytest.raises(ValueError, match="3 columns but there are 2 class names"):
        compute_metrics(Y_TRUE, Y_PROB, ["a", "b"])


# --------------------------------------------------------------------------- group bootstrap


def _noisy(seed: int, n: int, k: int, *, skill: float = 1.5, rare: int | None = None):
    """Labels (class ``k - 1`` only ``rare`` times when given) and probabilities of a noisy model."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k - 1 if rare is not None else k, n)
    if rare is not None:
        y[rng.choice(n, rare, replace=False)] = k - 1
    return y, softmax(rng.normal(size=(n, k)) + skill * np.eye(k)[y])


def _sklearn_stats(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict:
    """The reference: scikit-learn on one resample (NaN where a class is absent)."""
    labels = np.arange(k)
    _, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=np.nan)
    cm = confusion_matrix(y_true, y_pred, labels=labels).astype(np.float64)
    fp = cm.sum(axis=0) - np.diag(cm)
    tn = cm.sum() - cm.sum(axis=1) - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = np.where(tn + fp > 0, tn / (tn + fp), np.nan)  # TN / (TN + FP), by hand
    return {"accuracy": accuracy_score(y_true, y_pred), "macro_f1": np.nanmean(f1), "recall": recall,
            "specificity": specificity}


def test_vectorized_bootstrap_equals_sklearn_on_every_resample_for_the_same_draws():
    k = 4
    y, p = _noisy(3, 90, k, rare=3)  # a rare class: many resamples lack it (NaN sensitivity)
    groups = np.random.default_rng(0).integers(0, 40, size=len(y))  # groups of uneven size
    resamples = draw_resamples(len(y), groups, n_boot=200, seed=5)
    assert resamples.by_group and resamples.num_groups == len(np.unique(groups))
    fast = confusion_metrics(resampled_confusions(y, p, resamples))
    rows = np.arange(len(y))
    ref = {key: [] for key in ("accuracy", "macro_f1", "recall", "specificity")}
    for b in range(resamples.n_boot):
        idx = np.repeat(rows, resamples.image_counts(b))  # every image of each drawn group, as often as drawn
        for key, value in _sklearn_stats(y[idx], p[idx].argmax(axis=1), k).items():
            ref[key].append(value)
    for key, values in ref.items():
        np.testing.assert_allclose(fast[key], np.array(values), rtol=1e-12, equal_nan=True)
    assert np.isnan(fast["recall"][:, k - 1]).any()  # the NaN rule was exercised

    cis = bootstrap_cis(y, p, ["a", "b", "c", "d"], resamples)
    assert set(cis) == {"accuracy", "macro_f1"} | {f"{m}/{c}" for m in ("sensitivity", "specificity") for c in "abcd"}
    assert cis["macro_f1"] == pytest.approx(percentile_interval(np.array(ref["macro_f1"])), abs=1e-12)
    assert cis["sensitivity/d"] == pytest.approx(percentile_interval(np.array(ref["recall"])[:, 3]), abs=1e-12)
    # The slow, general path draws the same resamples: same interval with a scikit-learn metric.
    slow = bootstrap_ci(y, p, lambda t, q: f1_score(t, q.argmax(1), average="macro", labels=np.arange(k),
                                                    zero_division=np.nan), n_boot=200, seed=5, groups=groups)
    assert slow == pytest.approx(cis["macro_f1"], abs=1e-12)


def test_duplicates_inside_a_group_do_not_narrow_the_interval():
    y, p = _noisy(1, 120, 3, skill=1.0)
    copies = 4
    y_dup, p_dup = np.repeat(y, copies), np.repeat(p, copies, axis=0)
    names = ["a", "b", "c"]
    once = bootstrap_cis(y, p, names, draw_resamples(len(y), np.arange(len(y)), n_boot=500))
    # Every image four times, the copies one duplicate group: the very same intervals.
    by_group = bootstrap_cis(y_dup, p_dup, names, draw_resamples(len(y_dup), np.repeat(np.arange(len(y)), copies),
                                                                  n_boot=500))
    for key, pair in once.items():
        assert by_group[key] == pytest.approx(pair, abs=1e-12), key
    # Resampling the copies one by one would halve the width (1 / sqrt(4)): the error grouping avoids.
    per_image = bootstrap_cis(y_dup, p_dup, names, draw_resamples(len(y_dup), None, n_boot=500))
    width = lambda pair: pair[1] - pair[0]  # noqa: E731
    for key in ("accuracy", "macro_f1"):
        assert width(per_image[key]) < 0.7 * width(once[key]), key
    assert width(once["accuracy"]) > 0.05  # 120 images: a real interval, not a degenerate one


def test_paired_interval_of_a_model_against_itself_is_zero_and_matches_sklearn_otherwise():
    y, p = _noisy(2, 150, 3)
    _, q = _noisy(2, 150, 3, skill=0.7)  # same labels (same seed), a weaker model
    resamples = draw_resamples(len(y), np.arange(len(y)) // 3, n_boot=300, seed=1)
    assert paired_bootstrap_ci(y, p, p, resamples) == (0.0, 0.0, 0.0)
    diff, low, high = paired_bootstrap_ci(y, p, q, resamples, metric="macro_f1")
    assert diff == pytest.approx(macro_f1(y, p) - macro_f1(y, q))
    rows = np.arange(len(y))
    ref = []
    for b in range(resamples.n_boot):
        idx = np.repeat(rows, resamples.image_counts(b))
        ref.append(f1_score(y[idx], p[idx].argmax(1), average="macro") - f1_score(y[idx], q[idx].argmax(1), average="macro"))
    assert (low, high) == pytest.approx(percentile_interval(np.array(ref)), abs=1e-12)
    assert low < diff < high
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap_ci(y, p, q, resamples, metric="roc_auc")


def test_resamples_without_groups_are_one_group_per_image_and_bad_groups_are_refused():
    r = draw_resamples(7, None, n_boot=11, seed=0)
    assert not r.by_group and r.num_groups == 7 and r.counts.shape == (11, 7)
    assert (r.counts.sum(axis=1) == 7).all()  # each resample draws as many groups as there are
    g = draw_resamples(6, ["x", "x", "y", "z", "z", "z"], n_boot=4)
    assert g.by_group and g.num_groups == 3 and list(g.codes) == [0, 0, 1, 2, 2, 2]
    assert (g.image_counts(0)[:2] == g.counts[0, 0]).all()
    with pytest.raises(ValueError, match="one group per image"):
        draw_resamples(5, [1, 2, 3], n_boot=3)
    with pytest.raises(ValueError, match="resamples are of 7 images"):
        resampled_confusions(Y_TRUE, Y_PROB, r)
