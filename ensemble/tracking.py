"""``ensemble.build --mlflow``: the built ensemble as an MLflow run of its own.

The run goes to the experiment's store (see :mod:`covid_ray.tracking`: ``<experiment>/mlruns``
unless ``MLFLOW_TRACKING_URI`` is set) under the search's experiment name, beside the
trials the search logged there. It holds:

* metrics, all read from ``metrics.json`` (nothing is recomputed): the ensemble's test
  accuracy, macro-F1, balanced accuracy, macro ROC-AUC, ECE and NLL, per-class
  sensitivity and specificity, the bootstrap 95% bounds, the fitted temperature, and the
  validation NLL/ECE before and after calibration (the values the temperature was fitted on);
* params: top, method, members, calibration, the ranking metric, synthetic or not;
* artifacts: ``report.md``, ``metrics.json``, ``MODEL_CARD.md`` when the build wrote one,
  and the figures (``*.png``).

A run made on synthetic data is tagged ``synthetic=true`` and its description says so.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covid_ray.artifacts.bundle import CARD_FILE, METRICS_FILE, REPORT_FILE
from covid_ray.tracking import experiment_id, require_mlflow, tracking_uri

logger = logging.getLogger(__name__)

ARTIFACTS = (REPORT_FILE, METRICS_FILE, CARD_FILE)
FIGURES = "*.png"


@dataclass
class LoggedRun:
    tracking_uri: str
    experiment_name: str
    experiment_id: str
    run_id: str


def metric_key(text: str) -> str:
    """A class or metric name as an MLflow key part (``Viral Pneumonia`` -> ``Viral_Pneumonia``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def ensemble_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The run's metrics from ``metrics.json``'s content; undefined (null/NaN) values are left out."""
    ens, cal = metrics["ensemble"], metrics["calibration"]
    out: dict[str, Any] = {f"test_{k}": ens.get(k) for k in
                           ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc_macro", "ece", "nll")}
    for name, row in ens.get("per_class", {}).items():
        out[f"test_sensitivity_{metric_key(name)}"] = row.get("recall")
        out[f"test_specificity_{metric_key(name)}"] = row.get("specificity")
    for name, bounds in (ens.get("ci95") or {}).items():
        if bounds and len(bounds) == 2:
            out[f"test_{metric_key(name)}_ci95_low"], out[f"test_{metric_key(name)}_ci95_high"] = bounds
    out["temperature"] = cal["temperature"]
    for name, value in (cal.get("val") or {}).items():  # nll_before, nll_after, ece_before, ece_after
        out[f"val_{name}"] = value
    lung = metrics.get("lung_cam") or {}
    if lung.get("images"):
        out["test_lung_cam_share_mean"] = lung.get("mean")
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def ensemble_params(metrics: dict[str, Any]) -> dict[str, str]:
    """The run's params: how the ensemble was made."""
    members = metrics.get("members", [])
    params = {
        "top": metrics["top"],
        "method": metrics["method"],
        "members_used": metrics["members_used"],
        "members": ",".join(m["trial_id"] for m in members),
        "member_models": ",".join(m["model"] for m in members),
        "calibration": "temperature" if metrics["calibration"]["enabled"] else "none",
        "metric": metrics["metric"],
        "n_boot": metrics.get("n_boot"),
        "synthetic": metrics["synthetic"],
        "test_images": metrics["test_images"],
        "val_images": metrics["val_images"],
        "export": (metrics.get("export") or {}).get("status"),
    }
    # MLflow caps a param value at 6,000 characters; a long member list is kept whole in metrics.json.
    return {k: str(v)[:6000] for k, v in params.items() if v is not None}


def artifact_files(out_dir: Path) -> list[Path]:
    """The files logged as artifacts, those that exist, in a fixed order."""
    files = [out_dir / name for name in ARTIFACTS if (out_dir / name).is_file()]
    return files + sorted(out_dir.glob(FIGURES))


def log_ensemble_run(experiment_folder: str | Path, out_dir: str | Path, metrics: dict[str, Any]) -> LoggedRun:
    """Log a finished build (``out_dir`` holds its files, ``metrics`` is metrics.json's content).

    Raises:
        MlflowUnavailableError: mlflow is not installed.
        ValueError: the MLflow experiment was deleted.
        mlflow.exceptions.MlflowException: the store refused the run.
    """
    uri = tracking_uri(experiment_folder)
    require_mlflow(uri)
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = metrics["experiment"]
    exp_id = experiment_id(client, name)
    synthetic = bool(metrics["synthetic"])
    tags = {"covid_ray.kind": "ensemble", "synthetic": str(synthetic).lower()}
    if synthetic:
        tags["mlflow.note.content"] = ("Built on SYNTHETIC data (covid_ray.data.synth): these numbers describe the "
                                       "generator, not real radiographs.")
    run_name = f"ensemble-top{metrics['top']}-{metrics['method']}"
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in ensemble_metrics(metrics).items()],
            params=[Param(k, v) for k, v in ensemble_params(metrics).items()],
            tags=[RunTag("covid_ray.experiment_folder", str(Path(experiment_folder)))],
        )
        for file in artifact_files(Path(out_dir)):
            client.log_artifact(run_id, str(file))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    logger.info("logged the ensemble to MLflow: experiment %r, run %s, store %s", name, run_id, uri)
    return LoggedRun(uri, name, exp_id, run_id)
