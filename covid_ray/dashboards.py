"""The dashboards a search feeds, all local by default: TensorBoard, MLflow, Optuna Dashboard, Ray's.

* **TensorBoard**: Ray Tune writes every trial's results as TensorBoard event files
  (``tensorboardX``), under ``<experiment>/tune/trial_<id>/``:
  ``tensorboard --logdir results/NAME/tune --host 127.0.0.1``.
* **MLflow** (``--mlflow``, the optional ``mlflow`` extra): :func:`mlflow_callback` gives
  Ray's own ``MLflowLoggerCallback``, which logs each trial as a run (its parameters and
  every epoch's metrics, stepped by epoch) to the experiment's local store
  (``<experiment>/mlruns``) or to ``MLFLOW_TRACKING_URI``; at the trial's end it adds the
  trial's best checkpoint (``model.pt`` and ``metadata.json``: enough to rebuild and run the
  model; the optimizer state stays with the search). ``ensemble.build --mlflow`` logs the
  ensemble to the same MLflow experiment (:mod:`covid_ray.tracking` picks both).
* **Optuna Dashboard**: the study lives in ``<experiment>/optuna.db``:
  ``optuna-dashboard sqlite:///results/NAME/optuna.db`` (binds 127.0.0.1). Trials ASHA
  stopped show as PRUNED with their per-epoch values (:mod:`covid_ray.searcher`).
* **Ray's dashboard**: the address :func:`covid_ray.ray_setup.init_ray` returns, always on
  127.0.0.1 for the Ray a search starts itself; the search prints it once.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback  # imports mlflow only when a run starts

from covid_ray.artifacts.experiment import OPTUNA_DB, TUNE_DIRNAME, read_history, trial_history

logger = logging.getLogger(__name__)


def best_checkpoint(history: list[dict], metric: str) -> str | None:
    """The checkpoint of the best epoch in a trial's history rows (the last report of each epoch)."""
    by_epoch: dict[int, dict] = {}
    for row in history:
        if "epoch" in row:
            by_epoch[int(row["epoch"])] = row
    best, path = -math.inf, None
    for epoch in sorted(by_epoch):
        row = by_epoch[epoch]
        value = row.get(metric)
        if isinstance(value, (int, float)) and value > best:
            best = value
        if row.get("checkpoint") and isinstance(value, (int, float)) and value >= best:
            path = row["checkpoint"]
    return path


def tensorboard_command(exp: Path) -> str:
    return f"tensorboard --logdir {exp / TUNE_DIRNAME} --host 127.0.0.1"


def optuna_dashboard_command(exp: Path) -> str:
    return f"optuna-dashboard sqlite:///{exp / OPTUNA_DB}"


class TrialMLflow(MLflowLoggerCallback):
    """Ray's MLflow callback with metrics stepped by epoch (not Tune's iteration: a restarted
    worker group reports epochs again), the trial's arm as a tag and its best checkpoint as
    artifacts (``best_checkpoint/``; a checkpoint in an object store is named in a tag)."""

    def __init__(self, *, train_storage: str, metric: str, **kwargs):
        super().__init__(**kwargs)
        self.train_storage, self.metric = train_storage, metric

    def log_trial_start(self, trial):
        from covid_ray.searcher import trial_arm

        self.tags = {**(self.tags or {}), "arm": trial_arm(trial.config)}
        super().log_trial_start(trial)

    def log_trial_result(self, iteration, trial, result):
        step = int(result.get("epoch", result.get("training_iteration", iteration)))
        numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=numbers, step=step)

    def log_trial_end(self, trial, failed: bool = False):
        from covid_ray.artifacts.checkpoint import METADATA_FILE, MODEL_FILE
        from covid_ray.uri import is_uri

        run_id = self._trial_runs[trial]
        path = best_checkpoint(read_history(trial_history(self.train_storage, trial.trial_id)), self.metric)
        client = self.mlflow_util._get_client()
        if path and not is_uri(path) and Path(path).is_dir():
            for name in (MODEL_FILE, METADATA_FILE):  # not train_state.pt: resume state, 2x the model's size
                if (Path(path) / name).is_file():
                    client.log_artifact(run_id, str(Path(path) / name), "best_checkpoint")
        elif path:
            client.set_tag(run_id, "best_checkpoint", path)
        super().log_trial_end(trial, failed)


def mlflow_callback(exp: Path, experiment_name: str, train_storage: str, metric: str) -> TrialMLflow:
    """The trials' MLflow callback, logging to the experiment's store (see :mod:`covid_ray.tracking`).

    Raises:
        covid_ray.tracking.MlflowUnavailableError: mlflow is not installed (names the extra).
    """
    from covid_ray.tracking import require_mlflow, tracking_uri

    uri = tracking_uri(exp)
    require_mlflow(uri)
    return TrialMLflow(tracking_uri=uri, experiment_name=experiment_name, save_artifact=False,
                       tags={"project": "covid-ray"}, train_storage=train_storage, metric=metric)
