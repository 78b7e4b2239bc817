"""``ensemble.build``'s OOD stage: fit and choose the score before the export, threshold and measure after.

:func:`fit_ood` (before the export, so the chosen score goes into the graph): each
kept member's pooled features on a seeded sample of training images give its
class-conditional Gaussian; every candidate of :mod:`ensemble.ood` is scored on the
validation images and on the OOD proxies of :mod:`ensemble.ood_sets`; the candidate
with the highest mean proxy AUROC is chosen.

:func:`finish_ood` (after the export): the threshold accepting 95% of the validation
images is fitted on the scores of each exported graph itself (int8 shifts them a
little), written into ``preprocess.json`` with ``ood_head.npz``; the deployed graph
(int8 when it passed its gate, as inference loads it) is then measured on the test
split (acceptance) and on the benchmark OOD sets (AUROC, false-accept rate). Without
an exported graph the same is done with the members' torch outputs. For information
every candidate's benchmark AUROC is reported too; it plays no part in the choice.

:func:`torch_ensemble` rebuilds the exported model in torch from the members'
checkpoints, ``preprocess.json`` and ``ood_head.npz``: the torch path of the export.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covid_ray.artifacts.bundle import (
    FP32_FILE, GRAPH_FILES, INPUT_NAME, OOD_OUTPUT, OOD_PARAMS_FILE, PREPROCESS_FILE, read_json_object,
    write_preprocess_json,
)
from covid_ray.artifacts.experiment import Experiment

from ensemble.members import sample_rows
from ensemble.ood import (
    ACCEPT_RATE, DESCRIPTIONS, HIGHER_IS, GaussianFit, accept_rate, candidate_scores, choose_score,
    fit_gaussian, fit_threshold, load_params, save_params, score_report,
)
from ensemble.ood_sets import benchmark_sets, negative, proxy_sets, rot90, rot180
from ensemble.outputs import ImageSet, array_images, member_outputs, split_images
from ensemble.select import Member

logger = logging.getLogger(__name__)

FIT_IMAGES = 512  # training images for the Gaussians: enough for a shrunk covariance, seconds to predict
SET_IMAGES = 128  # radiographs per transformed set (proxies from validation, flipped test images)
AUROC_TARGET = 0.95
ACCEPT_TOLERANCE = 0.02


@dataclass
class OodFit:
    """What the export needs (score, Gaussians of the kept members) and what the report shows."""

    score: str
    members: list[Member]  # the kept members (weight > 0), in order
    weights: list[float]
    temperature: float
    fits: list[GaussianFit] | None
    candidates: dict  # candidate -> proxy AUROCs (the choice)
    info: dict = field(default_factory=dict)

    def scores(self, images: ImageSet, classes: Sequence[str], cache_dir: str | Path | None) -> dict[str, np.ndarray]:
        """Every candidate on ``images`` from the members' (cached) torch outputs."""
        outs = [member_outputs(m, images, classes, cache_dir=cache_dir) for m in self.members]
        return candidate_scores([o.logits[0] for o in outs], [o.features for o in outs], self.weights,
                                self.temperature, self.fits)


def fit_ood(members: Sequence[Member], weights: Sequence[float], temperature: float, experiment: Experiment,
            manifest: pd.DataFrame, *, cache_dir: str | Path | None = None,
            data_cache_dir: str | Path | None = None, fit_images: int = FIT_IMAGES) -> OodFit:
    """Fit the Gaussians, score the candidates on validation vs the proxies, choose one."""
    keep = [i for i, w in enumerate(weights) if w > 0]
    kept, kept_w = [members[i] for i in keep], [float(weights[i]) for i in keep]
    classes = experiment.classes
    n_train = int((manifest["split"] == "train").sum())
    fits = None
    if n_train >= 2:
        train = split_images(experiment, manifest, "train", rows=sample_rows(n_train, fit_images),
                             data_cache_dir=data_cache_dir)
        fits = [fit_gaussian(member_outputs(m, train, classes, cache_dir=cache_dir).features, train.labels)
                for m in kept]
    fit = OodFit("", kept, kept_w, float(temperature), fits, {})
    val = split_images(experiment, manifest, "val", data_cache_dir=data_cache_dir)
    proxies = {name: array_images(f"proxy-{name}", images) for name, images in proxy_sets().items()}
    rows = sample_rows(int((manifest["split"] == "val").sum()), SET_IMAGES)
    proxies["val_rot90"] = split_images(experiment, manifest, "val", rows=rows, data_cache_dir=data_cache_dir,
                                        transform=rot90, tag="rot90")
    proxies["val_negative"] = split_images(experiment, manifest, "val", rows=rows, data_cache_dir=data_cache_dir,
                                           transform=negative, tag="negative")
    val_scores = fit.scores(val, classes, cache_dir)
    fit.score, fit.candidates = choose_score(val_scores, {p: fit.scores(s, classes, cache_dir)
                                                          for p, s in proxies.items()})
    fit.info = {
        "gaussian": {"fitted_on": "train", "images": min(n_train, fit_images)} if fits else None,
        "proxies": {p: s.size for p, s in proxies.items()},
        "chosen_on": "mean AUROC, validation images vs the OOD proxies (never the benchmark sets or the test split)",
    }
    logger.info("OOD score %s chosen (proxy AUROC %.3f)", fit.score, fit.candidates[fit.score]["mean"])
    return fit


# --------------------------------------------------------------------------- after the export


def onnx_scorer(path: Path, spec: dict, threads: int | None = None) -> Callable[[ImageSet], np.ndarray]:
    """``images -> ood_score`` of an exported graph, fed as inference feeds it."""
    from ensemble.export import input_preset
    from ensemble.quantize import session

    sess = session(path, threads=threads)
    preset = input_preset(spec)

    def score(images: ImageSet) -> np.ndarray:
        out = [sess.run([OOD_OUTPUT], {INPUT_NAME: preset(torch.from_numpy(b).unsqueeze(1)).numpy()})[0]
               for b in images.batches(spec["resize"], 64)]
        return np.concatenate(out).astype(np.float64)

    return score


def evaluation_sets(experiment: Experiment, manifest: pd.DataFrame, *,
                    data_cache_dir: str | Path | None = None) -> dict[str, ImageSet]:
    """The benchmark OOD sets, ``flipped`` (test radiographs upside down) included."""
    sets = {name: array_images(f"ood-{name}", images) for name, images in benchmark_sets().items()}
    rows = sample_rows(int((manifest["split"] == "test").sum()), SET_IMAGES)
    sets["flipped"] = split_images(experiment, manifest, "test", rows=rows, data_cache_dir=data_cache_dir,
                                   transform=rot180, tag="rot180")
    return sets


def finish_ood(fit: OodFit, experiment: Experiment, manifest: pd.DataFrame, out_dir: Path, export: dict, *,
               cache_dir: str | Path | None = None, data_cache_dir: str | Path | None = None,
               candidates_benchmark: bool = False) -> dict:
    """Threshold, write the ``ood`` section of ``preprocess.json``, measure; returns metrics.json's ``ood``.

    ``candidates_benchmark``: also score every candidate on the benchmark sets with the
    members' torch outputs (information only; a forward pass of every member per image,
    so the build leaves it to ``benchmarks.ood``).
    """
    classes = experiment.classes
    val = split_images(experiment, manifest, "val", data_cache_dir=data_cache_dir)
    test = split_images(experiment, manifest, "test", data_cache_dir=data_cache_dir)
    sets = evaluation_sets(experiment, manifest, data_cache_dir=data_cache_dir)
    torch_val = fit.scores(val, classes, cache_dir)  # cached by the fit
    graphs = [g for g in GRAPH_FILES if g in (export.get("files") or {})]
    section: dict = {
        "score": fit.score, "description": DESCRIPTIONS[fit.score], "higher_is": HIGHER_IS, "fitted_on": "val",
        "accept_target": ACCEPT_RATE, "candidates": fit.candidates, **fit.info,
    }
    if graphs:
        scorers = {g: onnx_scorer(out_dir / g, export["preprocess"]) for g in graphs}
        val_by_graph = {g: scorers[g](val) for g in graphs}
        thresholds = {g: fit_threshold(v) for g, v in val_by_graph.items()}
        runtime = graphs[0]
        val_scores, test_scores = val_by_graph[runtime], scorers[runtime](test)
        ood_scores = {name: scorers[runtime](s) for name, s in sets.items()}
        if FP32_FILE in graphs:
            diff = np.abs(val_by_graph[FP32_FILE] - torch_val[fit.score])
            section["fp32_vs_torch_max_abs_diff"] = float(diff.max())
    else:
        runtime = "torch (no exported graph)"
        torch_test = fit.scores(test, classes, cache_dir)
        torch_sets = {name: fit.scores(s, classes, cache_dir) for name, s in sets.items()}
        val_scores, test_scores = torch_val[fit.score], torch_test[fit.score]
        ood_scores = {name: s[fit.score] for name, s in torch_sets.items()}
        thresholds = {"torch": fit_threshold(val_scores)}
    if candidates_benchmark:
        section["candidates_benchmark"] = candidate_benchmark(fit, experiment, manifest, cache_dir=cache_dir,
                                                              data_cache_dir=data_cache_dir)
    threshold = fit_threshold(val_scores)
    section.update(
        runtime=runtime, threshold=threshold, thresholds_by_graph=thresholds,
        val_images=int(len(val_scores)), val_accept_rate=accept_rate(val_scores, threshold),
        test_images=int(len(test_scores)), test_accept_rate=accept_rate(test_scores, threshold),
        test_accept_ci95=_binomial_ci(int((test_scores <= threshold).sum()), len(test_scores)),
        benchmark=score_report(test_scores, ood_scores, threshold),
    )
    section["targets"] = {"auroc_min": AUROC_TARGET, "test_accept": [ACCEPT_RATE - ACCEPT_TOLERANCE,
                                                                     ACCEPT_RATE + ACCEPT_TOLERANCE]}
    section["targets_met"] = {
        "auroc": {n: r["auroc"] >= AUROC_TARGET for n, r in section["benchmark"].items()},
        "test_accept": abs(section["test_accept_rate"] - ACCEPT_RATE) <= ACCEPT_TOLERANCE,
    }
    if graphs:
        write_ood_export(out_dir, fit, section)
    return section


def _binomial_ci(k: int, n: int) -> list[float]:
    """Clopper-Pearson 95% interval of a rate k / n: how far the test acceptance may stray by chance alone."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95)
    return [float(ci.low), float(ci.high)]


def candidate_benchmark(fit: OodFit, experiment: Experiment, manifest: pd.DataFrame, *,
                        cache_dir: str | Path | None = None, data_cache_dir: str | Path | None = None) -> dict:
    """Every candidate on the benchmark sets (members' torch outputs), each with its own validation threshold.

    For information: whether the choice made on the proxies was the right one. Never used to choose.
    """
    classes = experiment.classes
    val = fit.scores(split_images(experiment, manifest, "val", data_cache_dir=data_cache_dir), classes, cache_dir)
    test = fit.scores(split_images(experiment, manifest, "test", data_cache_dir=data_cache_dir), classes, cache_dir)
    sets = {name: fit.scores(s, classes, cache_dir)
            for name, s in evaluation_sets(experiment, manifest, data_cache_dir=data_cache_dir).items()}
    return {c: {"test_accept_rate": accept_rate(test[c], fit_threshold(val[c])),
                "benchmark": score_report(test[c], {n: s[c] for n, s in sets.items()}, fit_threshold(val[c]))}
            for c in val}


def preprocess_ood(section: dict) -> dict:
    """The ``ood`` object of ``preprocess.json`` (the contract inference and the web page read)."""
    keys = ("score", "description", "threshold", "higher_is", "fitted_on", "accept_target", "val_accept_rate",
            "val_images", "thresholds_by_graph", "runtime")
    return {**{k: section[k] for k in keys}, "output": OOD_OUTPUT, "parameters": OOD_PARAMS_FILE,
            "abstain_when": "ood_score > threshold"}


def write_ood_export(out_dir: Path, fit: OodFit, section: dict) -> None:
    """``ood_head.npz`` and the ``ood`` object of ``preprocess.json``."""
    save_params(out_dir / OOD_PARAMS_FILE, fit.score, fit.weights, fit.temperature, fit.fits)
    path = out_dir / PREPROCESS_FILE
    meta = read_json_object(path)
    meta["ood"] = preprocess_ood(section)
    write_preprocess_json(meta, path)


def torch_ensemble(folder: str | Path) -> tuple[torch.nn.Module, dict]:
    """The exported ensemble rebuilt in torch from its members' checkpoints; returns (module, preprocess.json).

    Raises:
        FileNotFoundError, ValueError: a missing file or checkpoint, or one that does not match.
    """
    from ensemble.export import EnsembleModule
    from ensemble.graph import trusted
    from ensemble.select import load_trial

    folder = Path(folder)
    meta = read_json_object(folder / PREPROCESS_FILE)
    members = [load_trial({"trial_id": m["trial_id"], "checkpoint": m["checkpoint"]}, 0.0, meta["classes"])
               for m in meta["members"]]
    ensemble = EnsembleModule(members, [m["weight"] for m in meta["members"]], meta["temperature"], meta["classes"])
    views = (meta.get("tta") or {}).get("views") or ()
    score, fits = None, None
    if meta.get("ood"):
        score, _, _, fits = load_params(folder / meta["ood"].get("parameters", OOD_PARAMS_FILE))
    return trusted(ensemble, views=views, ood_score=score, fits=fits).eval(), meta
