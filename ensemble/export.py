"""The whole ensemble as one graph: members, weighted mean, temperature -> probabilities.

Input: a batch of *preprocessed* images, float32 (B, C, S, S), exactly what the eval
preset gives (decode as 8-bit grayscale, resize to R x R, centre-crop S, divide by
255, normalize); ``preprocess.json`` tells a client how to get there. Output: class
probabilities (B, K) in the order of ``preprocess.json``'s ``classes``.

Members must share the image size S (and so the working resolution R): each size has
its own resize before the crop, so an input prepared for one size is not exactly what
a member of another size was evaluated on, and resampling inside the graph would only
approximate it. Mixed sizes are refused with a message saying which trials differ.
Mixed channel handling is exact, so it is done inside the graph: with 1- and
3-channel members together, the input is the 1-channel grayscale tensor and each
3-channel member gets it un-normalized, replicated and normalized with ImageNet's
statistics (an affine map per channel).

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). The legacy
TorchScript exporter fails on ``seed_cnn``, whose ``AdaptiveAvgPool2d(14)`` does not
divide the feature map at sizes other than 224 px; the dynamo exporter decomposes it.
The batch axis is dynamic.

Test-time augmentation and OOD abstention (:mod:`ensemble.graph` wraps this module):
with ``--tta`` the views are built inside the graph, after the input, so a client
feeds it exactly as without; with an OOD score the graph has a second output
``ood_score`` (B,), higher meaning less like the training radiographs, computed inside
the graph from the un-augmented view (for ``mahalanobis`` the class means and whitening
matrices are constants of the graph). ``preprocess.json`` then says which views
(``tta.views``) and gains an ``ood`` object: ``score`` (the candidate used),
``threshold`` (abstain when ``ood_score > threshold``), ``higher_is``
(``"out-of-distribution"``), ``fitted_on`` (``"val"``), ``val_accept_rate``,
``thresholds_by_graph`` (the threshold fitted on each exported file's own validation
scores, since int8 shifts them a little) and ``parameters`` (``ood_head.npz``: the same
numbers for the torch path, :func:`ensemble.trust.torch_ensemble`). See :mod:`ensemble.ood`.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from covid_ray.artifacts import bundle
from covid_ray.artifacts.bundle import INPUT_NAME, OUTPUT_NAME
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.data.transforms import EvalPreset, normalization_for
from covid_ray.vote import class_order, soft_vote, vote_weights

from ensemble.calibrate import PROB_EPS
from ensemble.select import Member

logger = logging.getLogger(__name__)

# ONNX protobufs are capped at 2 GiB; larger ensembles keep weights in a side file.
INLINE_LIMIT_BYTES = 1_800_000_000


class ExportRefused(ValueError):
    """The ensemble cannot be one exact graph (e.g. members at different image sizes)."""


def input_spec(members: Sequence[Member]) -> dict:
    """Image size, working resolution, channels and normalization of the graph's input.

    Raises:
        ExportRefused: members differ in image size or working resolution.
    """
    sizes = {(m.preprocess.image_size, m.preprocess.resize) for m in members}
    if len(sizes) > 1:
        listing = ", ".join(
            f"trial {m.trial_id} ({m.model_name}) {m.preprocess.image_size}px from {m.preprocess.resize}px"
            for m in members
        )
        raise ExportRefused(
            f"cannot export one exact graph: members use different image sizes ({listing}). Each size has its "
            "own resize before the centre crop, so one preprocessed input cannot be exact for all of them. "
            "Ensemble members of one size (a search with a fixed image_size), or build with --export none."
        )
    (image_size, resize), = sizes
    chans = {m.preprocess.in_chans for m in members}
    in_chans = chans.pop() if len(chans) == 1 else 1  # mixed: feed grayscale, adapt inside
    mean, std = normalization_for(in_chans)
    return {"image_size": image_size, "resize": resize, "in_chans": in_chans, "mean": list(mean), "std": list(std)}


def input_preset(spec: dict) -> EvalPreset:
    """The batch transform that makes the graph's input (:func:`input_spec`) from resized uint8 images."""
    return EvalPreset(image_size=spec["image_size"], in_chans=spec["in_chans"])


class InputAdapter(nn.Module):
    """Turn the ensemble's normalized input into a member's: un-normalize, replicate, normalize.

    ``x01 = x[:, :1] * std_in + mean_in`` recovers the [0, 1] gray image (every channel
    of a replicated gray input holds the same values); then ``(x01 - mean_m) / std_m``
    per member channel, folded into one scale and shift.
    """

    def __init__(self, spec: dict, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (spec["std"][0] / std_t).view(1, -1, 1, 1))
        self.register_buffer("shift", ((spec["mean"][0] - mean_t) / std_t).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.scale + self.shift


class EnsembleModule(nn.Module):
    """``softmax(log(sum_i w_i softmax(f_i(x))) / T)``, members with zero weight left out."""

    def __init__(self, members: Sequence[Member], weights: Sequence[float], temperature: float, classes: Sequence[str]):
        super().__init__()
        keep = [i for i, w in enumerate(weights) if w > 0]
        if not keep:
            raise ValueError("every member has weight 0")
        self.spec = input_spec([members[i] for i in keep])
        self.trial_ids = [members[i].trial_id for i in keep]
        # Where each member's torch weights live, for Grad-CAM (covid_ray.gradcam) at inference.
        self.sources = [
            {"model": members[i].model_name, "checkpoint": str(Path(members[i].checkpoint).resolve()),
             "sha256": members[i].digest}
            if members[i].checkpoint is not None else {"model": members[i].model_name}
            for i in keep
        ]
        self.weights = vote_weights([weights[i] for i in keep])
        self.temperature = float(temperature)
        self.members = nn.ModuleList(members[i].model.eval() for i in keep)
        adapters, self._permute = [], []
        for i in keep:
            pre = members[i].preprocess
            same = pre.in_chans == self.spec["in_chans"] and list(pre.mean) == self.spec["mean"] \
                and list(pre.std) == self.spec["std"]
            adapters.append(nn.Identity() if same else InputAdapter(self.spec, pre.mean, pre.std))
            perm = class_order(members[i].classes, classes)
            self._permute.append(None if (perm == np.arange(len(perm))).all() else perm.tolist())
        self.adapters = nn.ModuleList(adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = [torch.softmax(model(adapt(x)), dim=1) for model, adapt in zip(self.members, self.adapters)]
        mix = soft_vote(probs, self.weights, self._permute)
        if self.temperature != 1.0:
            mix = torch.softmax(torch.log(mix.clamp_min(PROB_EPS)) / self.temperature, dim=1)
        return mix


def export_onnx(module: EnsembleModule, path: str | Path, *, opset: int = 18) -> Path:
    """Write ``module`` as ONNX with a dynamic batch axis; one file below 1.8 GB of weights."""
    path = Path(path)
    spec = module.spec
    example = torch.zeros(2, spec["in_chans"], spec["image_size"], spec["image_size"])
    n_bytes = sum(p.numel() * p.element_size() for p in module.state_dict().values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's notes on internal APIs, not actionable here
        torch.onnx.export(
            module.eval(), (example,), str(path), dynamo=True, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(getattr(module, "output_names", [OUTPUT_NAME])),
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            external_data=n_bytes > INLINE_LIMIT_BYTES, verbose=False,
        )
    return path


def preprocess_json(module: EnsembleModule, classes: Sequence[str], *, synthetic: bool) -> dict:
    """``preprocess.json`` of the exported graph (:func:`covid_ray.artifacts.bundle.preprocess_json`)."""
    members = [{"trial_id": t, "weight": w, **src} for t, w, src in zip(module.trial_ids, module.weights, module.sources)]
    return bundle.preprocess_json(Preprocess.from_dict(module.spec, source="the ensemble's input").to_dict(),
                                  classes=list(classes), temperature=module.temperature, members=members,
                                  synthetic=synthetic)
