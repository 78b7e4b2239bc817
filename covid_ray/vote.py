"""The ensemble's soft vote: the weighted mean of member probabilities in the ensemble's class order.

One definition for every place an ensemble is formed: the build on numpy arrays
(``ensemble.combine``), the exported graph and its torch twin on tensors
(``ensemble.export``, ``ensemble.graph``), the OOD head (``ensemble.ood``) and the
target class of Grad-CAM (``covid_ray.gradcam``). It uses only ``*``, ``+`` and column
indexing, so the same lines trace into the ONNX graph: the members' terms are added in
order, ``w_0 p_0 + w_1 p_1 + ...``, as the graph computes them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def vote_weights(weights: Sequence[float], members: int | None = None) -> list[float]:
    """The weights as used: non-negative, divided by their sum.

    Raises:
        ValueError: a negative weight, a zero sum, or not one weight per member.
    """
    w = [float(v) for v in weights]
    total = sum(w)
    if (members is not None and len(w) != members) or any(v < 0 for v in w) or not total > 0:
        n = f"{members} " if members is not None else ""
        raise ValueError(f"weights must be {n}non-negative numbers with a positive sum, got {w}")
    return [v / total for v in w]


def class_order(member_classes: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Column indices that put a member's outputs in ``classes`` order.

    Raises:
        ValueError: the member has other classes.
    """
    if sorted(member_classes) != sorted(classes):
        raise ValueError(f"member classes {list(member_classes)} differ from {list(classes)}")
    return np.array([list(member_classes).index(c) for c in classes], dtype=np.int64)


def soft_vote(probs: Sequence[T], weights: Sequence[float], orders: Sequence[Sequence[int] | None] | None = None) -> T:
    """``sum_i weights[i] * probs[i][:, orders[i]]``: numpy arrays or torch tensors alike.

    Args:
        probs: per member, (B, K) probabilities (or any per-member values of one shape,
            e.g. the OOD head's (B,) scores, with ``orders`` None).
        weights: per member, already normalized (:func:`vote_weights`).
        orders: per member, the column order (:func:`class_order`), or None where it is
            already the ensemble's.
    """
    if len(probs) == 0 or len(probs) != len(weights):
        raise ValueError(f"need one weight per member, got {len(weights)} weights for {len(probs)} members")
    mix = None
    for i, (p, w) in enumerate(zip(probs, weights)):
        order = orders[i] if orders is not None else None
        if order is not None:
            p = p[:, order]
        mix = w * p if mix is None else mix + w * p
    return mix
