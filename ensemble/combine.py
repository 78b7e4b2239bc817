"""Ways to combine members' class probabilities; each ends as one weight per member.

Every method returns non-negative weights summing to 1, so the ensemble is always a
weighted mean of member probabilities (what the exported graph computes):

* ``guarded`` (the default): ``greedy`` below, then a guard on the experiment's
  metric (macro-F1 unless the search ranked by accuracy, balanced accuracy or loss):
  if the greedy mixture's value on the validation split is worse than the best single
  member's value, computed from the same validation probabilities, the ensemble falls
  back to that member alone (weight 1). So on validation the ensemble is never worse
  than its best member on the metric the search cared about.
* ``soft``: equal weights, the plain mean.
* ``weighted``: weights fitted on the validation split by minimizing the NLL of the
  mixture, parametrized as ``softmax(a)`` so they stay on the simplex without
  constraints. The search starts from equal weights, so it is never worse than
  ``soft`` on validation.
* ``greedy``: Caruana et al. (2004) ensemble selection with replacement: repeatedly
  add the member that most lowers the validation NLL of the running mean, and keep
  the best prefix, so it is never worse than the best single member on validation NLL.

Both fitted methods optimize NLL rather than macro-F1: a validation split of a few
hundred images gives a step-shaped F1 with many ties, whereas NLL is smooth and a
proper scoring rule. NLL alone does not protect macro-F1, though: a mixture can lower
the NLL while a weak, confident member flips the argmax of a minority class (measured
on a top-5 search: uniform soft voting 0.52 test macro-F1 against 0.61 for its best
member). Hence the default: ``greedy``, whose round 1 already picks the best member
and which only adds a member that pays its way in NLL (sparse weights, so weak members
mostly get 0), plus the guard on the ranking metric for what NLL misses. ``weighted``
is not the base because its dense weights rarely reach exactly 0 for a weak member.
All inputs are arrays ``probs`` of shape (members, images, classes).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from covid_ray import vote
from covid_ray.metrics import NLL_EPS, accuracy, compute_metrics, macro_f1, nll

logger = logging.getLogger(__name__)

METHODS = ("guarded", "soft", "weighted", "greedy")
DEFAULT_METHOD = "guarded"
PRUNE_BELOW = 1e-3  # fitted weights under this are set to 0 (the member leaves the graph)


def _check(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"expected probs of shape (members, images, classes), got {probs.shape}")
    return probs


def soft_vote(probs: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of member probabilities, (images, classes); equal weights by default.

    The stacked-array form of :func:`covid_ray.vote.soft_vote`, which the exported graph computes.
    """
    probs = _check(probs)
    m = probs.shape[0]
    return vote.soft_vote(list(probs), vote.vote_weights(np.ones(m) if weights is None else weights, m))


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


def _balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    classes = [str(k) for k in range(probs.shape[1])]
    return compute_metrics(labels, probs, classes)["balanced_accuracy"]


# The guard's metric for an experiment metric, by name without the "val_" prefix:
# (function of (labels, probs), "max" or "min").
GUARD_METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], str]] = {
    "macro_f1": (macro_f1, "max"),
    "accuracy": (accuracy, "max"),
    "balanced_accuracy": (_balanced_accuracy, "max"),
    "loss": (nll, "min"),
    "nll": (nll, "min"),
}


def guard_metric(metric: str) -> str:
    """The guard's metric key for an experiment metric (``val_macro_f1`` -> ``macro_f1``).

    A metric the guard cannot compute from probabilities (e.g. a per-class recall)
    falls back to ``macro_f1``.
    """
    key = metric.removeprefix("val_")
    if key not in GUARD_METRICS:
        logger.warning("the validation guard cannot compute %r from probabilities; it uses macro_f1", metric)
        return "macro_f1"
    return key


@dataclass
class Combination:
    """What a method chose, and the validation values behind the choice."""

    method: str
    weights: np.ndarray  # the weights used: on the simplex, one per member
    metric: str  # the guard's metric key (see GUARD_METRICS)
    ensemble_val: float  # the fitted mixture's validation value, before any fallback
    member_val: list[float]  # each member's validation value, same probabilities
    best_member: int  # index of the best member on validation (ties: the better-ranked)
    choice: str  # "ensemble" or "best_member"
    reason: str

    def summary(self, trial_ids: list[str]) -> dict:
        """The ``combination`` block of metrics.json."""
        return {
            "method": self.method, "metric": self.metric, "split": "val", "choice": self.choice,
            "reason": self.reason, "ensemble_val": self.ensemble_val,
            "best_member": {"trial_id": trial_ids[self.best_member], "val": self.member_val[self.best_member]},
            "member_val": dict(zip(trial_ids, self.member_val)),
        }


def combine(method: str, probs_val: np.ndarray, labels_val: np.ndarray, *, metric: str = "macro_f1") -> Combination:
    """Member weights for ``method``, fitted and checked on the validation split only.

    Args:
        metric: the experiment's metric (``val_`` prefix optional); the ``guarded``
            method guards on it, the others only record it.
    """
    probs_val = _check(probs_val)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    m = probs_val.shape[0]
    if method == "soft":
        fitted = np.full(m, 1.0 / m)
    elif method == "weighted":
        fitted = fit_weights(probs_val, labels_val)
    else:  # greedy, and guarded's first step
        fitted = greedy_selection(probs_val, labels_val)[0]
    key = guard_metric(metric)
    fn, mode = GUARD_METRICS[key]
    sign = 1.0 if mode == "max" else -1.0
    member_val = [fn(labels_val, p) for p in probs_val]
    best = int(np.argmax([sign * v for v in member_val]))  # argmax: ties go to the better-ranked member
    ensemble_val = fn(labels_val, soft_vote(probs_val, fitted))
    worse = sign * ensemble_val < sign * member_val[best]
    compared = f"validation {key} {ensemble_val:.4f} (ensemble) vs {member_val[best]:.4f} (best member)"
    if method == "guarded" and worse:
        weights = np.eye(m)[best]
        choice, reason = "best_member", f"{compared}: the greedy ensemble is worse, so the best member is used alone"
    else:
        weights, choice = fitted, "ensemble"
        reason = (f"{compared}: the greedy ensemble is not worse, so it is kept" if method == "guarded"
                  else f"{compared}; method {method} has no guard")
    return Combination(method, weights, key, float(ensemble_val), [float(v) for v in member_val], best, choice, reason)


def combine_weights(method: str, probs_val: np.ndarray, labels_val: np.ndarray, *, metric: str = "macro_f1") -> np.ndarray:
    """Member weights for ``method``, fitted on the validation split only (see :func:`combine`)."""
    return combine(method, probs_val, labels_val, metric=metric).weights
