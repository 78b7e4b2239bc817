"""The OOD verdict of one prediction: the fields every prediction JSON carries (CLI line and HTTP answer).

An exported ensemble built with an OOD score (``ensemble.build``; see
:mod:`ensemble.ood`) has a second graph output ``ood_score``, higher meaning less
like the training radiographs, and ``preprocess.json`` holds the threshold that
accepts 95% of the validation radiographs. Above it the model abstains: ``class`` is
null, the probabilities are still given, and ``abstain_reason`` says why in plain
words. A model without a score (a single training checkpoint, an older export) gets
nulls and a note, and classifies as before.
"""
from __future__ import annotations

import numpy as np

NO_OOD_NOTE = ("this model has no OOD score (a single training checkpoint, or an export without one): "
               "it gives a class for any image, radiograph or not")


def ood_fields(ood: dict | None, score: float | None) -> dict:
    """``in_distribution``, ``ood_score``, ``ood_threshold`` (and why, when abstaining) of one prediction.

    Out of distribution (score above the threshold, or not a number) the caller's
    ``class`` is replaced by None; the probabilities stay.
    """
    if not ood or score is None:
        return {"in_distribution": None, "ood_score": None, "ood_threshold": None, "ood_note": NO_OOD_NOTE}
    threshold = float(ood["threshold"])
    finite = bool(np.isfinite(score))
    out = {"in_distribution": finite and score <= threshold, "ood_score": float(f"{score:.7g}") if finite else None,
           "ood_threshold": threshold}
    if not out["in_distribution"]:
        accept = float(ood.get("accept_target", 0.95))
        out["class"] = None
        out["abstain_reason"] = (
            f"not a chest radiograph like the training data: OOD score {score:.4g} above threshold {threshold:.4g} "
            f"fitted to accept {accept:.0%} of validation radiographs" if finite else
            "not a chest radiograph like the training data: the OOD score is not a number")
    return out
