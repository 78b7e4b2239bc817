"""Where an experiment's MLflow runs go, and the optional ``mlflow`` import.

MLflow is an optional extra (``pip install 'covid-ray[mlflow]'``, which brings
``mlflow-skinny``: the tracking client and stores without the UI server). What logs to
MLflow (``ensemble.build --mlflow``; the search's trials, through Ray Tune's
``MLflowLoggerCallback``, are meant to use the same two functions) takes the store and
the experiment from here, so they agree:

* the store is ``MLFLOW_TRACKING_URI`` when that is set (a server, a database), else a
  local file store inside the experiment's folder, ``<experiment>/mlruns`` as a ``file:``
  URI. Nothing is sent over the network unless ``MLFLOW_TRACKING_URI`` says so;
* the MLflow experiment is named after the search (``experiment.json``'s ``name``), so an
  ensemble's run sits beside the trials the search logged.

Two environment defaults are set before ``mlflow`` is imported, each only when the user
has not set it: ``MLFLOW_DISABLE_TELEMETRY=true`` (MLflow 3 otherwise posts usage data to
its own servers from a background thread; this project contacts no host it was not told
to), and, for a file store, ``MLFLOW_ALLOW_FILE_STORE=true``. MLflow 3 keeps the file
store in maintenance mode and refuses to open one without that opt-in; the file store is
still what fits here: a plain folder beside the results, readable by any MLflow version,
needing no database driver and no migration when the writer and the UI differ in version.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

from covid_ray.artifacts.experiment import MLRUNS_DIRNAME

MLFLOW_EXTRA = "pip install 'covid-ray[mlflow]'"


class MlflowUnavailableError(RuntimeError):
    """``mlflow`` is not installed (the optional extra)."""


def tracking_uri(experiment_folder: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``file:`` URI of ``<experiment_folder>/mlruns``."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return (Path(experiment_folder).resolve() / MLRUNS_DIRNAME).as_uri()


def is_file_store(uri: str) -> bool:
    """True for a ``file:`` URI or a plain path (MLflow's file store)."""
    return urlparse(uri).scheme in ("", "file")


def prepare_environment(uri: str | None = None) -> None:
    """Set MLflow's telemetry and (for a file store ``uri``) file-store defaults.

    Call before ``import mlflow`` (telemetry is decided at import), and before handing
    ``uri`` to anything that opens the store, such as Ray Tune's ``MLflowLoggerCallback``.
    See the module docstring for why.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri is not None and is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def require_mlflow(uri: str | None = None) -> ModuleType:
    """Import ``mlflow`` (after :func:`prepare_environment` for ``uri``, when given).

    Raises:
        MlflowUnavailableError: not installed; the message names the extra to install.
    """
    prepare_environment(uri)
    try:
        import mlflow
    except ImportError as exc:
        raise MlflowUnavailableError(
            f"MLflow logging needs the mlflow package, which is an optional extra: {MLFLOW_EXTRA} ({exc})"
        ) from None
    return mlflow


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment ``name`` in ``client``'s store, creating it when missing.

    Raises:
        ValueError: the experiment exists but was deleted (MLflow will not log to it).
    """
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process (the search's callback)
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise ValueError(
            f"MLflow experiment {name!r} is deleted in {client.tracking_uri}: restore it "
            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or remove it for good first"
        )
    return found.experiment_id
