"""``python -m ensemble.build --top K``: top-K ensemble of a search, calibrated, evaluated, exported.

Reads ``<results>/<NAME>/`` (``experiment.json``, ``split.csv``, ``trials.csv``), picks
the K best usable trials, combines their validation probabilities (default ``guarded``:
greedy selection with a fallback to the best member when it is worse on validation;
or the ``soft`` mean, ``weighted``, ``greedy``; see :mod:`ensemble.combine`), fits one
temperature on validation, evaluates the ensemble and every member on the test split
with duplicate-group bootstrap intervals, compares the ensemble with its best member
and with the search's hand-recipe trial (:mod:`ensemble.reference`), and exports one ONNX graph
(fp32, and int8 behind a parity gate). Everything goes to ``<experiment>/ensemble/``:
``metrics.json``, ``report.md``, ``confusion_matrix.png``, ``roc.png``,
``reliability.png``, ``ensemble_fp32.onnx``, ``ensemble_int8.onnx``, ``preprocess.json``
and ``cache/`` (member probabilities, so rebuilding with another K or method is quick).
The report also gives the mean share of the ensemble's Grad-CAM inside the lung masks
over a seeded sample of test images (``--lung-cam-images``, default 32; Grad-CAM costs
a backward pass per member and image, so not the whole split).

Trust stages (:mod:`ensemble.trust`): an OOD score chosen on validation vs OOD proxies,
exported as the graph's second output ``ood_score`` with its threshold (95% of the
validation images accepted) in ``preprocess.json`` and ``ood_head.npz``, and measured
on OOD sets (:mod:`ensemble.abstain`; ``--no-ood`` skips it); a shortcut audit of the
test split with the lungs removed and with the lungs only (:mod:`ensemble.shortcut`;
``--no-shortcut-audit``); optional test-time augmentation inside the graph
(``--tta flip,rot5``, :mod:`ensemble.tta`); and ``MODEL_CARD.md`` with ``metadata.json``
rendered from ``metrics.json`` (:mod:`ensemble.model_card`).

Exit status: 0 done; 2 bad input (no experiment, no usable trial); 1 with ``--strict``
when the export was refused or the int8 model failed its parity gate.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from covid_ray.artifacts.bundle import CACHE_DIRNAME, CONFUSION_PLOT, METRICS_FILE, RELIABILITY_PLOT, REPORT_FILE, ROC_PLOT
from covid_ray.artifacts.experiment import ENSEMBLE_DIRNAME, Experiment, read_experiment, read_trials
from covid_ray.artifacts.plain import json_safe, write_json
from covid_ray.data.split import read_manifest
from covid_ray.metrics import Resamples
from covid_ray.uri import is_uri, join, upload_dir

from ensemble.calibrate import apply_temperature, calibration_summary, fit_temperature
from ensemble.combine import DEFAULT_METHOD, METHODS, combine, soft_vote
from ensemble.deploy import EXPORTS, export_ensemble
from ensemble.evaluate import covid_index, evaluate_probs, member_entry, sklearn_report, split_resamples
from ensemble.lung_cam import lung_cam_summary
from ensemble.members import SplitProbs, member_probabilities
from ensemble.tta import SPEC_HELP as TTA_HELP, parse_tta
from ensemble.plots import confusion_matrix_png, reliability_png, roc_png
from ensemble.reference import best_member_comparison, recipe_comparison, summary_lines as reference_summary_lines
from ensemble import trust
from ensemble.report import render_report
from ensemble.select import (
    Member,
    Selection,
    SelectionError,
    experiment_location,
    metric_mode,
    resolve_experiment_dir,
    select_top,
)

logger = logging.getLogger("ensemble.build")


@dataclass(kw_only=True)
class BuildOptions:
    """Everything ``build_ensemble`` needs besides the experiment folder."""

    top: int = 5
    metric: str | None = None  # default: the experiment's metric
    mode: str | None = None  # default: the experiment's mode for its metric, else min for losses
    method: str = DEFAULT_METHOD
    calibrate: bool = True
    export: str = "onnx-int8"
    strict: bool = False
    n_boot: int = 1000
    data_cache_dir: str | None = None  # the image decode cache (covid_ray's default when None)
    calibration_images: int = 128  # training images for int8 activation ranges
    latency_repeats: int = 10
    lung_cam_images: int = 32  # test images (with masks) for the in-lung Grad-CAM share; 0 skips it
    progress: bool = False  # member predictions' progress on stderr (the CLI turns it on)
    tta: str | tuple[str, ...] = ()  # --tta views ("flip,rot5"), parsed to view names (ensemble.tta)
    ood: bool = True  # fit, export and measure the OOD abstention score (ensemble.abstain)
    shortcut: bool = True  # the lungs-removed / lungs-only audit (ensemble.shortcut)

    def __post_init__(self):
        self.tta = parse_tta(self.tta)  # ValueError naming a bad view
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.export not in EXPORTS:
            raise ValueError(f"unknown export {self.export!r}; choose one of {EXPORTS}")
        if self.mode not in (None, "max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {self.mode!r}")
        if self.n_boot < 1:
            raise ValueError(f"--n-boot must be >= 1 (the 95% intervals and the paired comparisons), got {self.n_boot}")


@dataclass
class BuildResult:
    out_dir: Path
    metrics: dict[str, Any]
    exit_code: int
    # The calibrated ensemble on the test split, row for row with the manifest's test
    # images (their SHA-1): what a caller compares two builds on, paired per image.
    test_labels: np.ndarray | None = None
    test_probs: np.ndarray | None = None
    test_sha1: list[str] | None = None


def _short(metrics: dict) -> dict:
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc_macro", "ece", "nll", "covid_sensitivity")
    return {k: metrics[k] for k in keys}


def draw_figures(out_dir: Path, metrics: dict, test: SplitProbs, test_mix: np.ndarray, test_cal: np.ndarray, *,
                 calibrated: bool) -> None:
    """confusion_matrix.png, roc.png and reliability.png of the ensemble on the test split."""
    classes = metrics["classes"]
    tag = " (synthetic data)" if metrics["synthetic"] else ""
    confusion_matrix_png(metrics["ensemble"]["confusion_matrix"], classes, out_dir / CONFUSION_PLOT,
                         title=f"Ensemble, test split{tag}")
    roc_png(test.labels, test_cal, classes, out_dir / ROC_PLOT, title=f"Ensemble ROC, one-vs-rest{tag}")
    t = metrics["calibration"]["temperature"]
    curves = {"before calibration": test_mix, f"after (T={t:.2f})": test_cal} if calibrated else {"ensemble": test_mix}
    # Members are in rank order: the first is the one a user would deploy alone (best on validation).
    top = metrics["members"][0]
    curves[f"top-ranked member ({top['model']}, {top['trial_id']})"] = test.probs[0]
    reliability_png(test.labels, curves, out_dir / RELIABILITY_PLOT, title=f"Reliability, test split{tag}")


def evaluate_ensemble(
    experiment: Experiment,
    selection: Selection,
    probs: dict[str, SplitProbs],
    opts: BuildOptions,
    out_dir: Path,
    metric: str,
    *,
    resamples: Resamples,
) -> tuple[dict, np.ndarray, float]:
    """Combine and calibrate on val, evaluate on test, draw the figures. Returns (metrics, weights, T).

    ``resamples``: the test split's bootstrap resamples, shared by every interval.
    """
    classes = experiment.classes
    val, test = probs["val"], probs["test"]
    combination = combine(opts.method, val.probs, val.labels, metric=metric)
    weights = combination.weights
    val_mix, test_mix = soft_vote(val.probs, weights), soft_vote(test.probs, weights)
    temperature = fit_temperature(val_mix, val.labels) if opts.calibrate else 1.0
    val_cal, test_cal = apply_temperature(val_mix, temperature), apply_temperature(test_mix, temperature)

    ensemble = evaluate_probs(test.labels, test_cal, classes, resamples=resamples)
    ensemble["classification_report"], ensemble["classification_report_dict"] = sklearn_report(
        test.labels, test_cal, classes
    )
    members = [
        member_entry(m, w, evaluate_probs(test.labels, test.probs[i], classes, resamples=resamples), metric)
        for i, (m, w) in enumerate(zip(selection.members, weights))
    ]
    k = covid_index(classes)
    metrics = {
        "experiment": experiment.name,
        "dataset": str(experiment.data),
        "split": str(experiment.split),
        "synthetic": experiment.synthetic,
        "classes": classes,
        "covid_class": classes[k] if k is not None else None,
        "metric": metric,
        "method": opts.method,
        "top": opts.top,
        "members_used": len(selection.members),
        "weights": {m.trial_id: float(w) for m, w in zip(selection.members, weights)},
        "combination": combination.summary([m.trial_id for m in selection.members]),
        "val_images": int(len(val.labels)),
        "test_images": int(len(test.labels)),
        "test_counts": {c: int((test.labels == i).sum()) for i, c in enumerate(classes)},
        "n_boot": opts.n_boot,
        "calibration": {
            "enabled": opts.calibrate,
            "fitted_on": "val",
            "temperature": temperature,
            "val": calibration_summary(val.labels, val_mix, val_cal),
            "test": calibration_summary(test.labels, test_mix, test_cal),
        },
        "ensemble": ensemble,
        "ensemble_uncalibrated": _short(evaluate_probs(test.labels, test_mix, classes)),
        "members": members,
        "vs_best_member": best_member_comparison(selection, test, test_cal, resamples, weights,
                                                 synthetic=experiment.synthetic,
                                                 fell_back=combination.choice == "best_member"),
        "skipped": selection.skipped,
        "notes": selection.notes,
    }
    draw_figures(out_dir, metrics, test, test_mix, test_cal, calibrated=opts.calibrate)
    return metrics, weights, temperature


def search_cache_dir(members: list[Member]) -> str | None:
    """The decode cache the trials used (their config's ``cache_dir``), when it still exists.

    Reusing it spares decoding every image again; None falls back to covid_ray's default.
    """
    for member in members:
        cache = member.payload.get("config", {}).get("cache_dir")
        if cache and Path(cache).is_dir():
            return str(cache)
    return None


def build_ensemble(folder: str | Path, opts: BuildOptions) -> BuildResult:
    """The whole build for one experiment folder.

    Raises:
        SelectionError: malformed search outputs or no usable trial.
        ValueError, FileNotFoundError: a bad manifest or dataset.
    """
    experiment = read_experiment(folder)
    metric = opts.metric or experiment.metric
    mode = opts.mode or metric_mode(metric, experiment)
    trials = read_trials(folder)
    selection = select_top(experiment, trials, opts.top, metric, mode)
    for note in selection.notes:
        logger.warning("%s", note)
    manifest = read_manifest(experiment.split)
    data_cache_dir = opts.data_cache_dir or search_cache_dir(selection.members)
    out_dir = experiment.folder / ENSEMBLE_DIRNAME
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = out_dir / CACHE_DIRNAME
    probs = member_probabilities(
        selection.members, experiment, manifest, ("val", "test"),
        cache_dir=cache_dir, data_cache_dir=data_cache_dir, progress=opts.progress,
    )
    plain_probs, probs = probs, trust.tta_inputs(opts.tta, selection, experiment, manifest, probs,
                                                 cache_dir=cache_dir, data_cache_dir=data_cache_dir)
    resamples, metrics_bootstrap = split_resamples(manifest, "test", probs["test"].sha1, n_boot=opts.n_boot)
    metrics, weights, temperature = evaluate_ensemble(experiment, selection, probs, opts, out_dir, metric,
                                                      resamples=resamples)
    metrics["bootstrap"] = metrics_bootstrap
    test_probs = apply_temperature(soft_vote(probs["test"].probs, weights), temperature)
    metrics["recipe"] = recipe_comparison(
        experiment, selection, trials, probs, test_probs, weights, resamples,
        manifest=manifest, metric=metric, cache_dir=cache_dir, data_cache_dir=data_cache_dir,
    )
    if opts.lung_cam_images > 0:
        try:
            metrics["lung_cam"] = lung_cam_summary(experiment, manifest, selection.members, weights,
                                                   opts.lung_cam_images)
        except (ValueError, RuntimeError, OSError) as exc:  # a diagnostic: never lose the build over it
            logger.exception("in-lung Grad-CAM share failed")
            metrics["lung_cam"] = {"images": 0, "available": 0, "note": f"failed: {type(exc).__name__}: {exc}"}
    ood_fit = trust.before_export(
        metrics, selection, experiment, manifest, plain_probs, probs, weights, temperature, views=opts.tta,
        calibrate=opts.calibrate, ood=opts.ood, shortcut=opts.shortcut, latency_repeats=opts.latency_repeats,
        cache_dir=cache_dir, data_cache_dir=data_cache_dir,
    )
    metrics["export"] = export_ensemble(
        selection.members, weights, temperature, experiment, manifest, out_dir,
        kind=opts.export, data_cache_dir=data_cache_dir,
        calibration_images=opts.calibration_images, latency_repeats=opts.latency_repeats,
        views=opts.tta, ood=ood_fit,
    )
    trust.after_export(metrics, ood_fit, experiment, manifest, out_dir, cache_dir=cache_dir,
                       data_cache_dir=data_cache_dir)
    metrics = json_safe(metrics)
    write_json(out_dir / METRICS_FILE, metrics)
    (out_dir / REPORT_FILE).write_text(render_report(metrics))
    trust.write_card(out_dir, metrics)
    export_ok = metrics["export"]["status"] in ("ok", "skipped")
    return BuildResult(out_dir, metrics, 1 if opts.strict and not export_ok else 0,
                       test_labels=probs["test"].labels, test_probs=test_probs, test_sha1=list(probs["test"].sha1))


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ensemble.build", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--top", type=int, default=5, help="number of trials to ensemble (default 5)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--experiment", help="search name: reads <results-root>/NAME")
    where.add_argument("--results-dir", help="the search's folder itself, or its storage URI (s3://bucket/prefix/NAME)")
    p.add_argument("--results-root", default="results", help="where --experiment looks (default: results)")
    p.add_argument("--metric", default=None, help="rank trials by best_<metric> (default: the experiment's)")
    p.add_argument("--mode", choices=["max", "min"], default=None, help="metric direction (default: inferred)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"how to combine members (default {DEFAULT_METHOD}: greedy selection on validation NLL, "
                        "replaced by the best member when it is worse on the experiment's metric on validation; "
                        "soft: equal weights)")
    p.add_argument("--no-calibrate", action="store_true", help="skip temperature scaling")
    p.add_argument("--export", choices=EXPORTS, default="onnx-int8", help="what to export (default onnx-int8)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the export is refused or int8 fails its gate")
    p.add_argument("--n-boot", type=int, default=1000,
                   help="bootstrap resamples (of duplicate groups) for the 95%% CIs (default 1000)")
    p.add_argument("--cache-dir", default=None, help="image decode cache (default: $COVID_RAY_CACHE or ~/.cache/covid_ray)")
    p.add_argument("--calibration-images", type=int, default=128, help="training images for int8 calibration")
    p.add_argument("--latency-repeats", type=int, default=10, help="timed runs per latency figure (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--lung-cam-images", type=int, default=32,
                   help="test images with lung masks for the in-lung Grad-CAM share (default 32; 0: skip)")
    p.add_argument("--mlflow", action="store_true",
                   help="also log the ensemble as an MLflow run, in <experiment>/mlruns or $MLFLOW_TRACKING_URI, "
                        "under the search's name (needs: pip install 'covid-ray[mlflow]')")
    p.add_argument("--tta", default="", metavar="VIEWS",
                   help=f"test-time augmentation inside the exported graph: {TTA_HELP} (default: none)")
    p.add_argument("--no-ood", action="store_true", help="no OOD abstention score (default: fitted and exported)")
    p.add_argument("--no-shortcut-audit", action="store_true", help="skip the lungs-removed / lungs-only audit")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _summary_lines(m: dict, out_dir: Path) -> list[str]:
    tag = "  [SYNTHETIC DATA]" if m["synthetic"] else ""
    lines = [f"ensemble of {m['members_used']} (top {m['top']}, {m['method']}, T={m['calibration']['temperature']:.3f}) "
             f"on {m['test_images']} test images{tag}"]
    row = "{:<28} {:>9} {:>9} {:>9} {:>7}"
    lines.append(row.format("model", "accuracy", "macro-F1", "ROC-AUC", "ECE"))
    e = m["ensemble"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines.append(row.format("ensemble", fmt(e["accuracy"]), fmt(e["macro_f1"]), fmt(e["roc_auc_macro"]), fmt(e["ece"])))
    for r in m["members"]:
        name = f"{r['model']} ({r['trial_id']})"[:28]
        lines.append(row.format(name, fmt(r["accuracy"]), fmt(r["macro_f1"]), fmt(r["roc_auc_macro"]), fmt(r["ece"])))
    lines += reference_summary_lines(m)
    lines += trust.summary_lines(m)
    lung = m.get("lung_cam")
    if lung and lung.get("images"):
        lines.append(f"in-lung Grad-CAM share: mean {lung['mean']:.3f} over {lung['images']} test images "
                     f"(the lungs cover {lung['lung_area_mean']:.3f} of the crop)")
    x = m["export"]
    if x["status"] == "refused":
        lines.append(f"export refused: {x['message']}")
    elif x["status"] == "int8_rejected":
        lines.append(f"int8 not written: {x.get('gate', {}).get('reason') or x.get('int8_error')}")
    lines.append(f"wrote {out_dir}/ (metrics.json, report.md, figures{', ONNX' if x.get('files') else ''})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)  # ONNX Runtime sessions follow torch's count
    if args.mlflow:  # fail before the build, not after it
        from covid_ray.tracking import MlflowUnavailableError, require_mlflow

        try:
            require_mlflow()
        except MlflowUnavailableError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        opts = BuildOptions(
            top=args.top, metric=args.metric, mode=args.mode, method=args.method, calibrate=not args.no_calibrate,
            export=args.export, strict=args.strict, n_boot=args.n_boot, data_cache_dir=args.cache_dir,
            calibration_images=args.calibration_images, latency_repeats=args.latency_repeats,
            lung_cam_images=args.lung_cam_images, progress=True,
            tta=args.tta, ood=not args.no_ood, shortcut=not args.no_shortcut_audit,
        )
        where = experiment_location(args.experiment, args.results_dir, results_root=args.results_root)
        folder = resolve_experiment_dir(None, where)
        result = build_ensemble(folder, opts)
    except (SelectionError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in _summary_lines(result.metrics, result.out_dir):
        print(line)
    if is_uri(where):  # the outputs go back next to the search's tables
        remote = join(where, result.out_dir.name)
        try:
            upload_dir(result.out_dir, remote)
        except OSError as exc:
            print(f"error: the ensemble is in {result.out_dir}, but uploading it to {remote} failed: {exc}",
                  file=sys.stderr)
            return 1
        print(f"uploaded {result.out_dir.name}/ to {remote}")
    if args.mlflow:
        from ensemble.tracking import log_ensemble_run

        try:
            run = log_ensemble_run(folder, result.out_dir, result.metrics)
        except Exception as exc:  # the ensemble is built and written; only the MLflow copy failed
            print(f"error: the ensemble is in {result.out_dir}, but logging it to MLflow failed: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"mlflow: run {run.run_id} in experiment {run.experiment_name!r} at {run.tracking_uri}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
