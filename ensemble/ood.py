"""Out-of-distribution scores of the ensemble: candidates, fitting, choice, threshold, AUROC.

A classifier gives a confident class for anything it is shown: a photograph, a page of
text, a digit. The ensemble therefore also outputs an OOD score, **higher meaning
less like the training radiographs**, and abstains above a threshold. Candidates,
all computed on the un-augmented view (with ``--tta`` too):

* ``msp``: one minus the maximum softmax probability of the calibrated ensemble
  (Hendrycks & Gimpel, 2017);
* ``energy``: the weighted mean over members of ``-logsumexp(logits)`` (Liu et al.,
  2020);
* ``mahalanobis``: the weighted mean over members of the smallest squared Mahalanobis
  distance of the member's pooled features to a class mean, divided by the feature
  dimension (Lee et al., 2018): class means and one shared covariance (Ledoit-Wolf
  shrinkage, since features have hundreds of dimensions) fitted on a seeded sample of
  *training* images.

Which candidate is used is chosen by its mean AUROC separating the *validation*
images from OOD *proxies* (:func:`ensemble.ood_sets.proxy_sets`: procedural images and
transformed validation radiographs), never from the sets reported as the benchmark
(:func:`ensemble.ood_sets.benchmark_sets`) and never from the test split. The
threshold is the smallest score accepting 95% of the validation images.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from covid_ray.vote import soft_vote, vote_weights

from ensemble.calibrate import PROB_EPS, apply_temperature

logger = logging.getLogger(__name__)

SCORES = ("msp", "energy", "mahalanobis")
HIGHER_IS = "out-of-distribution"
ACCEPT_RATE = 0.95
DESCRIPTIONS = {
    "msp": "1 - maximum softmax probability of the calibrated ensemble",
    "energy": "weighted mean over members of -logsumexp(logits)",
    "mahalanobis": "weighted mean over members of min over classes of the squared Mahalanobis distance of the "
                   "pooled features to the class mean, divided by the feature dimension (shared Ledoit-Wolf "
                   "covariance fitted on training images)",
}


@dataclass
class GaussianFit:
    """One member's class-conditional Gaussian on its pooled features (shared covariance)."""

    means: np.ndarray  # (classes present, D)
    whiten: np.ndarray  # (D, D): (f - mean) @ whiten has identity covariance

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])


def fit_gaussian(features: np.ndarray, labels: np.ndarray) -> GaussianFit:
    """Class means and a shrunk shared covariance; ``whiten`` is its inverse square root.

    Raises:
        ValueError: fewer than two images.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if len(features) < 2:
        raise ValueError(f"need at least 2 images to fit a Gaussian, got {len(features)}")
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.clip(eigval, eigval.max() * 1e-10, None)  # shrinkage keeps them positive; guard rounding
    return GaussianFit(means=means, whiten=eigvec / np.sqrt(eigval))


def mahalanobis(features: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """(N,) min over classes of the squared Mahalanobis distance, divided by D."""
    g = np.asarray(features, dtype=np.float64) @ fit.whiten
    nu = fit.means @ fit.whiten
    d2 = ((g[:, None, :] - nu[None, :, :]) ** 2).sum(axis=2)
    return d2.min(axis=1) / fit.dim


def energy(logits: np.ndarray) -> np.ndarray:
    """(N,) ``-logsumexp`` of one member's logits (N, K)."""
    return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


def msp(probs: np.ndarray) -> np.ndarray:
    """(N,) one minus the top class probability."""
    return 1.0 - np.asarray(probs, dtype=np.float64).max(axis=1)


def candidate_scores(logits: Sequence[np.ndarray], features: Sequence[np.ndarray], weights: Sequence[float],
                     temperature: float, fits: Sequence[GaussianFit] | None) -> dict[str, np.ndarray]:
    """Every candidate score of the ensemble on one image set.

    Args:
        logits: per member (N, K), the un-augmented view, classes in one order.
        features: per member (N, D).
        fits: per member, or None to leave ``mahalanobis`` out.
    """
    w = vote_weights(weights)
    probs = [np.exp(z - logsumexp(z, axis=1, keepdims=True)) for z in map(np.asarray, logits)]
    out = {
        "msp": msp(apply_temperature(np.clip(soft_vote(probs, w), PROB_EPS, 1.0), temperature)),
        "energy": soft_vote([energy(z) for z in logits], w),
    }
    if fits is not None:
        out["mahalanobis"] = soft_vote([mahalanobis(f, fit) for f, fit in zip(features, fits)], w)
    return out


# --------------------------------------------------------------------------- evaluation


def ood_auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """AUROC of telling OOD images (positives) from in-distribution ones by the score (higher = OOD)."""
    id_scores, ood_scores = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    if not len(id_scores) or not len(ood_scores):
        raise ValueError("AUROC needs in-distribution and OOD scores")
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores, ood_scores]))


def fit_threshold(val_scores: np.ndarray, accept: float = ACCEPT_RATE) -> float:
    """The smallest score accepting at least ``accept`` of ``val_scores`` (accepted: score <= threshold)."""
    scores = np.asarray(val_scores, dtype=np.float64)
    if not len(scores) or not 0 < accept <= 1:
        raise ValueError(f"need validation scores and 0 < accept <= 1 (got {len(scores)} scores, accept={accept})")
    return float(np.quantile(scores, accept, method="inverted_cdf"))


def accept_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of images accepted as in-distribution (score <= threshold)."""
    return float((np.asarray(scores) <= threshold).mean())


def score_report(id_scores: np.ndarray, sets: Mapping[str, np.ndarray], threshold: float) -> dict:
    """Per OOD set: images, AUROC against ``id_scores``, false-accept rate at ``threshold``."""
    return {
        name: {"images": int(len(s)), "auroc": ood_auroc(id_scores, s), "false_accept_rate": accept_rate(s, threshold)}
        for name, s in sets.items()
    }


def choose_score(val: Mapping[str, np.ndarray], proxies: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[str, dict]:
    """The candidate with the highest mean AUROC over the proxy sets (ties: earlier in ``SCORES``).

    Args:
        val: candidate -> validation scores (in-distribution).
        proxies: proxy set -> candidate -> scores.

    Returns:
        (chosen name, {candidate: {"mean": , "min": , "per_set": {proxy: auroc}}}).
    """
    table = {}
    for name in (s for s in SCORES if s in val):
        per = {p: ood_auroc(val[name], scores[name]) for p, scores in proxies.items()}
        table[name] = {"mean": float(np.mean(list(per.values()))), "min": float(min(per.values())), "per_set": per}
    if not table:
        raise ValueError("no candidate scores to choose from")
    best = max(table, key=lambda n: (round(table[n]["mean"], 12), -SCORES.index(n)))
    return best, table


# --------------------------------------------------------------------------- parameters on disk


def save_params(path: str | Path, score: str, weights: Sequence[float], temperature: float,
                fits: Sequence[GaussianFit] | None) -> Path:
    """The OOD head's numbers (``ood_head.npz``), enough to rebuild it in torch from the members."""
    arrays = {"score": np.array(score), "weights": np.asarray(weights, np.float64),
              "temperature": np.array(float(temperature))}
    for i, fit in enumerate(fits or []):
        arrays[f"means_{i}"], arrays[f"whiten_{i}"] = fit.means, fit.whiten
    path = Path(path)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_params(path: str | Path) -> tuple[str, np.ndarray, float, list[GaussianFit] | None]:
    """(score, weights, temperature, fits) from :func:`save_params`'s file."""
    with np.load(path, allow_pickle=False) as z:
        score, weights, temperature = str(z["score"]), z["weights"], float(z["temperature"])
        fits = [GaussianFit(z[f"means_{i}"], z[f"whiten_{i}"]) for i in range(len(weights)) if f"means_{i}" in z]
    return score, weights, temperature, fits or None
