"""Ways to combine members' class probabilities; each ends as one weight per member.

Every method returns non-negative weights summing to 1, so the ensemble is always a
weighted mean of member probabilities (what the exported graph computes):

* ``soft``: equal weights, the plain mean.
* ``weighted``: weights fitted on the validation split by minimizing the NLL of the
  mixture, parametrized as ``softmax(a)`` so they stay on the simplex without
  constraints. The search starts from equal weights, so it is never worse than
  ``soft`` on validation.
* ``greedy``: Caruana et al. (2004) ensemble selection with replacement: repeatedly
  add the member that most lowers the validation NLL of the running mean, and keep
  the best prefix, so it is never worse than the best single member on validation.

Both fitted methods optimize NLL rather than macro-F1: a validation split of a few
hundred images gives a step-shaped F1 with many ties, whereas NLL is smooth and a
proper scoring rule; accuracy-type metrics are reported on the test split anyway.
All inputs are arrays ``probs`` of shape (members, images, classes).
"""
from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize

from covid_ray.metrics import NLL_EPS

logger = logging.getLogger(__name__)

METHODS = ("soft", "weighted", "greedy")
PRUNE_BELOW = 1e-3  # fitted weights under this are set to 0 (the member leaves the graph)


def _check(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"expected probs of shape (members, images, classes), got {probs.shape}")
    return probs


def soft_vote(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of member probabilities, (images, classes); equal weights by default."""
    probs = _check(probs)
    if weights is None:
        return probs.mean(axis=0)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (probs.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {probs.shape[0]} non-negative numbers with a positive sum, got {w}")
    return np.tensordot(w / w.sum(), probs, axes=1)


def mixture_nll(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean NLL of the true class under the weighted mean of ``probs``."""
    p = soft_vote(probs, weights)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, NLL_EPS, 1.0)).mean())


def fit_weights(probs: np.ndarray, labels: np.ndarray, *, maxiter: int = 500) -> np.ndarray:
    """Non-negative weights (sum 1) minimizing the validation NLL of the mixture."""
    probs = _check(probs)
    m = probs.shape[0]
    if m == 1:
        return np.ones(1)
    true = probs[:, np.arange(len(labels)), labels].T  # (images, members): only the true class matters

    def loss_and_grad(a: np.ndarray) -> tuple[float, np.ndarray]:
        w = np.exp(a - a.max())
        w /= w.sum()
        mix = np.clip(true @ w, NLL_EPS, None)
        loss = -np.log(mix).mean()
        dw = -(true / mix[:, None]).mean(axis=0)  # d loss / d w
        return float(loss), w * (dw - w @ dw)  # chain rule through the softmax

    start = np.zeros(m)
    result = minimize(loss_and_grad, start, jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    a = result.x if result.fun <= loss_and_grad(start)[0] else start
    w = np.exp(a - a.max())
    w /= w.sum()
    # The softmax parametrization never reaches exactly 0; a member below PRUNE_BELOW
    # changes the mixture by less than that and would only slow the exported graph.
    w[w < PRUNE_BELOW] = 0.0
    return w / w.sum()


def greedy_selection(
    probs: np.ndarray, labels: np.ndarray, *, rounds: int = 25
) -> tuple[np.ndarray, list[float]]:
    """Caruana ensemble selection with replacement, on validation NLL.

    Returns:
        weights: how often each member was picked in the best prefix, divided by
            the prefix length.
        history: the validation NLL after each round (the chosen prefix is the
            first minimum).
    """
    probs = _check(probs)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    m, n = probs.shape[:2]
    true = probs[:, np.arange(n), labels]  # (members, images)
    running = np.zeros(n)
    counts = np.zeros(m, dtype=np.int64)
    history: list[float] = []
    best_counts, best_loss = counts.copy(), np.inf
    for k in range(1, rounds + 1):
        # Mean after adding each candidate: (running * (k-1) + candidate) / k.
        candidate = (running[None, :] * (k - 1) + true) / k
        losses = -np.log(np.clip(candidate, NLL_EPS, None)).mean(axis=1)
        pick = int(np.argmin(losses))  # ties go to the lower index (the better-ranked trial)
        counts[pick] += 1
        running = candidate[pick]
        history.append(float(losses[pick]))
        if losses[pick] < best_loss - 1e-12:
            best_loss, best_counts = float(losses[pick]), counts.copy()
    return best_counts / best_counts.sum(), history


def combine_weights(method: str, probs_val: np.ndarray, labels_val: np.ndarray) -> np.ndarray:
    """Member weights for ``method``, fitted on the validation split only."""
    m = _check(probs_val).shape[0]
    if method == "soft":
        return np.full(m, 1.0 / m)
    if method == "weighted":
        return fit_weights(probs_val, labels_val)
    if method == "greedy":
        return greedy_selection(probs_val, labels_val)[0]
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
