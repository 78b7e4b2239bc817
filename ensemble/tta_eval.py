"""``ensemble.build --tta``: member probabilities averaged over views, and what TTA changes.

With views, every member's validation and test probabilities are the mean over the
views (:func:`tta_probabilities`, predicted once per member, split and list of views,
in batches, cached by :mod:`ensemble.outputs`); the build then fits weights and the
temperature on them as usual, and exports the same averaging inside the graph.

:func:`tta_effect` compares with the same members and weights without TTA, each with
its own temperature fitted on validation: test macro-F1, accuracy, ECE and NLL, and
the torch latency of both at batch 1 and 32 (the exported graph's latency, with TTA,
is in the ``export`` section).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from covid_ray.artifacts.experiment import Experiment
from covid_ray.metrics import accuracy, expected_calibration_error, macro_f1, nll

from ensemble.calibrate import apply_temperature, fit_temperature
from ensemble.combine import soft_vote
from ensemble.members import SplitProbs
from ensemble.outputs import member_outputs, split_images
from ensemble.select import Member
from ensemble.tta import IDENTITY


def tta_probabilities(members: Sequence[Member], experiment: Experiment, manifest: pd.DataFrame,
                      views: Sequence[str], plain: dict[str, SplitProbs], *, cache_dir: str | Path | None = None,
                      data_cache_dir: str | Path | None = None) -> dict[str, SplitProbs]:
    """Each member's probabilities averaged over ``views``, per split of ``plain`` (classes in the experiment's order).

    ``plain`` holds the identity view (``ensemble.members``' probabilities), so only
    the other views are predicted.
    """
    if views[0] != IDENTITY:
        raise ValueError(f"views must start with {IDENTITY!r}, got {list(views)}")
    out = {}
    for split, identity in plain.items():
        images = split_images(experiment, manifest, split, data_cache_dir=data_cache_dir)
        if not np.array_equal(images.labels, identity.labels):
            raise ValueError(f"the {split} split changed between the member probabilities and the TTA views")
        others = np.stack([member_outputs(m, images, experiment.classes, views=views[1:], cache_dir=cache_dir)
                           .probs().sum(axis=0) for m in members])
        out[split] = SplitProbs((identity.probs + others) / len(views), identity.labels, identity.sha1)
    return out


def _summary(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"macro_f1": macro_f1(labels, probs), "accuracy": accuracy(labels, probs),
            "ece": expected_calibration_error(labels, probs), "nll": nll(labels, probs)}


def tta_effect(plain: dict[str, SplitProbs], tta: dict[str, SplitProbs], weights: Sequence[float], *,
               calibrate: bool) -> dict:
    """Test metrics with and without TTA for the same members and weights, each with its own T."""
    out: dict = {}
    for name, probs in (("without", plain), ("with", tta)):
        val_mix, test_mix = soft_vote(probs["val"].probs, weights), soft_vote(probs["test"].probs, weights)
        t = fit_temperature(val_mix, probs["val"].labels) if calibrate else 1.0
        out[name] = {"temperature": t, **_summary(probs["test"].labels, apply_temperature(test_mix, t))}
    out["delta"] = {k: out["with"][k] - out["without"][k] for k in ("macro_f1", "accuracy", "ece", "nll")}
    return out


def tta_latency(plain, views: Sequence[str], sample: np.ndarray, *, repeats: int) -> dict[str, dict[str, float]]:
    """Torch latency (ms, median of ``repeats``) at batch 1 and 32 of the ensemble ``plain`` (an
    :class:`ensemble.export.EnsembleModule`; ``sample`` made for its ``spec``) without and with the views."""
    import torch

    from ensemble.deploy import torch_probs
    from ensemble.graph import trusted
    from ensemble.quantize import latency_table

    plain = plain.eval()
    with_views = trusted(plain, views=views).eval()
    runners = {"torch, no TTA": lambda x: torch_probs(plain, x, batch_size=len(x)),
               f"torch, TTA ({len(views)} views)": lambda x: torch_probs(with_views, x, batch_size=len(x))}
    with torch.inference_mode():
        return latency_table(runners, sample, repeats=repeats)
