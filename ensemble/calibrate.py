"""One temperature for the ensemble, fitted on the validation split.

The ensemble outputs probabilities (a weighted mean of member softmaxes), not logits,
so the temperature acts on their logarithm: ``p_T = softmax(log(p) / T)``, i.e.
``p_T ∝ p ** (1 / T)``. T > 1 softens over-confident outputs, T < 1 sharpens, and the
argmax never changes, so accuracy and F1 are untouched. Probabilities are clipped to
``PROB_EPS`` before the log, here and in the exported graph, so a class whose
probability underflowed to zero stays finite.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from covid_ray.metrics import expected_calibration_error, nll, softmax

PROB_EPS = 1e-12
# Bounds of the search over T: wide enough for any real model, narrow enough that a
# degenerate validation split (e.g. all one class) cannot push T to 0 or infinity.
T_MIN, T_MAX = 0.05, 20.0


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(clip(p)) / T)`` row-wise; identity (up to the clip) at T = 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), PROB_EPS, 1.0))
    return softmax(logp / temperature)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] minimizing NLL of ``apply_temperature(probs, T)``.

    Returns 1.0 when no T beats it (so calibration never makes validation NLL worse).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)

    def loss(log_t: float) -> float:
        return nll(labels, apply_temperature(probs, float(np.exp(log_t))))

    result = minimize_scalar(loss, bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x)) if result.fun < loss(0.0) else 1.0


def calibration_summary(labels: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict[str, float]:
    """NLL and ECE of the same predictions before and after temperature scaling."""
    return {
        "nll_before": nll(labels, before),
        "nll_after": nll(labels, after),
        "ece_before": expected_calibration_error(labels, before),
        "ece_after": expected_calibration_error(labels, after),
    }
