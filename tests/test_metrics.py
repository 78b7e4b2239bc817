"""Tests for covid_ray.metrics on small hand-checked arrays."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, roc_auc_score

from covid_ray.metrics import (
    accuracy,
    bootstrap_ci,
    compute_metrics,
    expected_calibration_error,
    macro_f1,
    nll,
    softmax,
    specificity_per_class,
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
    np.testing.assert_allclose(specificity_per_class(cm), [8 / 10, 9 / 10, 11 / 12])
    # A class that owns every sample has no negatives: undefined, not a crash.
    assert np.isnan(specificity_per_class(np.array([[3, 0], [0, 0]]))[0])


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
