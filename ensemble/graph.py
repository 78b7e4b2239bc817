"""The exported ensemble with test-time augmentation and an OOD score, as one torch module.

:class:`TrustedEnsemble` wraps an :class:`ensemble.export.EnsembleModule` (same
members, weights, input adapters, class order and temperature) and adds:

* the ``--tta`` views (:class:`ensemble.tta.Views`), built inside the graph: every
  member sees all views of the batch at once and its probabilities are averaged over
  them before the weighted mean and the temperature;
* a second output ``ood_score`` (B,), higher = less like the training radiographs,
  computed from the un-augmented view exactly as :func:`ensemble.ood.candidate_scores`
  computes the chosen candidate (a test checks numpy, torch and ONNX agree).

It exposes what :func:`ensemble.export.export_onnx` and
:func:`ensemble.export.preprocess_json` read (``spec``, ``temperature``,
``trial_ids``, ``weights``, ``sources``) plus ``output_names``. The members are
split before their final Linear (:class:`ensemble.outputs.SplitMember`) sharing the
parameters, so each parameter is exported once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from covid_ray.artifacts.bundle import OOD_OUTPUT, OUTPUT_NAME
from covid_ray.vote import soft_vote

from ensemble.calibrate import PROB_EPS
from ensemble.export import EnsembleModule
from ensemble.ood import GaussianFit
from ensemble.outputs import SplitMember
from ensemble.tta import IDENTITY, Views


class TrustedEnsemble(nn.Module):
    """``x -> probs`` (no OOD score) or ``x -> (probs, ood_score)``."""

    def __init__(self, ensemble: EnsembleModule, *, views: Sequence[str] = (), ood_score: str | None = None,
                 fits: Sequence[GaussianFit] | None = None):
        super().__init__()
        self.spec = ensemble.spec
        self.temperature = ensemble.temperature
        self.trial_ids, self.weights, self.sources = ensemble.trial_ids, ensemble.weights, ensemble.sources
        self.view_names = list(views) if views else [IDENTITY]
        if self.view_names[0] != IDENTITY:  # the OOD score and the views' mean read view 0 as the image itself
            raise ValueError(f"views must start with {IDENTITY!r}, got {self.view_names}")
        self.views = Views(self.view_names, image_size=self.spec["image_size"], mean=self.spec["mean"],
                           std=self.spec["std"])
        self.nets = nn.ModuleList(SplitMember(m) for m in ensemble.members)
        self.num_classes = int(self.nets[0].head.out_features)  # a constant, so exporters keep the shape
        self.adapters = ensemble.adapters
        self._permute = ensemble._permute
        self.ood_score = ood_score
        if ood_score == "mahalanobis":
            if fits is None or len(fits) != len(self.nets):
                raise ValueError(f"mahalanobis needs one Gaussian per member ({len(self.nets)}), got "
                                 f"{None if fits is None else len(fits)}")
            for i, fit in enumerate(fits):
                self.register_buffer(f"nu_{i}", torch.tensor(fit.means @ fit.whiten, dtype=torch.float32))
                self.register_buffer(f"whiten_{i}", torch.tensor(fit.whiten, dtype=torch.float32))
        elif ood_score not in (None, "msp", "energy"):
            raise ValueError(f"unknown OOD score {ood_score!r}")
        self.output_names = [OUTPUT_NAME] + ([OOD_OUTPUT] if ood_score else [])

    def _temper(self, mix: torch.Tensor) -> torch.Tensor:
        if self.temperature == 1.0:
            return mix
        return torch.softmax(torch.log(mix.clamp_min(PROB_EPS)) / self.temperature, dim=1)

    def forward(self, x: torch.Tensor):
        n_views, b = len(self.view_names), x.shape[0]
        xv = self.views(x)
        means, firsts, scores = [], [], []  # per member: view-averaged and un-augmented probabilities, OOD score
        for i, (net, adapt) in enumerate(zip(self.nets, self.adapters)):
            logits, features = net(adapt(xv))
            p = torch.softmax(logits, dim=1).reshape(n_views, -1, self.num_classes)
            means.append(p.mean(dim=0))
            firsts.append(p[0])
            if self.ood_score == "energy":
                scores.append(-torch.logsumexp(logits[:b], dim=1))
            elif self.ood_score == "mahalanobis":
                g = features[:b] @ getattr(self, f"whiten_{i}")
                nu = getattr(self, f"nu_{i}")
                scores.append(_columns(((g.unsqueeze(1) - nu.unsqueeze(0)) ** 2).sum(dim=2), torch.minimum) / nu.shape[1])
        probs = self._temper(soft_vote(means, self.weights, self._permute))
        if self.ood_score is None:
            return probs
        if self.ood_score == "msp":
            return probs, 1.0 - _columns(self._temper(soft_vote(firsts, self.weights, self._permute)), torch.maximum)
        return probs, soft_vote(scores, self.weights)

    def preprocess_extra(self) -> dict:
        """What ``preprocess.json`` says about the views and the outputs beyond the plain graph."""
        extra = {"tta": {"views": self.view_names if len(self.view_names) > 1 else [],
                         "averaged": "member probabilities, over the views, inside the graph"}}
        if self.ood_score:
            extra["outputs"] = [
                {"name": OUTPUT_NAME, "shape": ["batch", self.num_classes],
                 "meaning": "class probabilities"},
                {"name": OOD_OUTPUT, "shape": ["batch"], "meaning": "OOD score, higher = less like the training "
                                                                    "radiographs; compare with ood.threshold"},
            ]
        return extra


def _columns(t: torch.Tensor, op) -> torch.Tensor:
    """``op`` (elementwise min or max) across the few columns of (B, K) ``t``.

    Not ``amin``/``amax``: their ONNX ``ReduceMin``/``ReduceMax`` (axes as an input since
    opset 18) defeat ONNX Runtime's symbolic shape inference, and with it the int8
    pre-processing (``quant_pre_process``); elementwise ``Min``/``Max`` do not.
    """
    out = t[:, 0]
    for k in range(1, t.shape[1]):
        out = op(out, t[:, k])
    return out


def trusted(ensemble: EnsembleModule, *, views: Sequence[str] = (), ood_score: str | None = None,
            fits: Sequence[GaussianFit] | None = None) -> nn.Module:
    """The module to export: ``ensemble`` itself without TTA or OOD, else a :class:`TrustedEnsemble`."""
    if len(views) <= 1 and ood_score is None:
        return ensemble
    return TrustedEnsemble(ensemble, views=views, ood_score=ood_score, fits=fits)
