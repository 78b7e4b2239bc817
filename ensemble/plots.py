"""The report's figures: confusion matrix, ROC curves and reliability diagram (matplotlib, Agg)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, roc_curve  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_matrix_png(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, *, title: str) -> Path:
    """Counts, shaded by the row-normalized rate (recall on the diagonal)."""
    cm = np.asarray(cm, dtype=np.int64)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{cm[i, j]}\n{rates[i, j]:.0%}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def roc_png(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, *, title: str) -> Path:
    """One-vs-rest ROC curve per class (classes absent from ``labels`` are left out)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(classes):
        positives = labels == k
        if 0 < positives.sum() < len(labels):
            fpr, tpr, _ = roc_curve(positives, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def reliability_png(
    labels: np.ndarray, curves: dict[str, np.ndarray], path: Path, *, title: str, n_bins: int = 15
) -> Path:
    """Top-label accuracy against confidence per equal-width bin, one line per curve."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for name, probs in curves.items():
        conf = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        bins = np.searchsorted(edges[1:-1], conf, side="left")  # (lo, hi] as the ECE uses
        xs, ys = [], []
        for b in range(n_bins):
            inside = bins == b
            if inside.any():
                xs.append(conf[inside].mean())
                ys.append(correct[inside].mean())
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return _save(fig, path)
