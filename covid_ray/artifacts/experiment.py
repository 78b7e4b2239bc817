"""The experiment folder a search writes, ``<storage>/<NAME>/``: its layout, ``experiment.json`` and its tables.

::

    experiment.json       what the search is: dataset, split, classes, metric and mode (:func:`write_experiment`)
    split.csv             the split manifest (covid_ray.data.split), data_report.json beside it
    search_space.yaml     the profile as run; launch.json: how each trial is launched
    optuna.db             the Optuna study
    trials.csv            one row per trial (covid_ray.results), history.csv: one row per trial and epoch
    leaderboard.md, metric_per_epoch.png, param_importances.csv/.png
    search.log            Ray's and Tune's own output (with the console)
    tune/                 Ray Tune's state; train/<trial>/: Ray Train's checkpoints and history.jsonl
    mlruns/               the MLflow store (--mlflow); ensemble/: what ensemble.build writes

:data:`DRIVER_FILES` are the files the search's driver writes itself (what a storage
URI's experiment uploads and ``--resume`` downloads); Ray writes ``tune/`` and ``train/``.

No module-level pandas: :mod:`covid_ray.artifacts.bundle` reads the names from here
and must stay cheap to import.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_ray.artifacts.plain import write_json
from covid_ray.uri import is_file as uri_is_file
from covid_ray.uri import is_uri, join, read_text

if TYPE_CHECKING:
    import pandas as pd

EXPERIMENT_FILE = "experiment.json"
SPLIT_FILE, DATA_REPORT_FILE = "split.csv", "data_report.json"
SEARCH_SPACE_FILE, LAUNCH_FILE, OPTUNA_DB = "search_space.yaml", "launch.json", "optuna.db"
TRIALS_FILE, HISTORY_TABLE, LEADERBOARD_FILE = "trials.csv", "history.csv", "leaderboard.md"
METRIC_PLOT = "metric_per_epoch.png"
IMPORTANCES_TABLE, IMPORTANCES_PLOT = "param_importances.csv", "param_importances.png"
SEARCH_LOG = "search.log"
TUNE_DIRNAME, TRAIN_DIRNAME, MLRUNS_DIRNAME, ENSEMBLE_DIRNAME = "tune", "train", "mlruns", "ensemble"
HISTORY_FILE = "history.jsonl"  # per trial: train/<trial>/history.jsonl, one JSON line per report

DRIVER_FILES = (
    EXPERIMENT_FILE, SPLIT_FILE, DATA_REPORT_FILE, SEARCH_SPACE_FILE, LAUNCH_FILE, OPTUNA_DB,
    TRIALS_FILE, HISTORY_TABLE, LEADERBOARD_FILE, METRIC_PLOT, IMPORTANCES_TABLE, IMPORTANCES_PLOT,
)
# What an ensemble reads of an experiment folder besides the checkpoints.
ENSEMBLE_INPUTS = (EXPERIMENT_FILE, TRIALS_FILE, SPLIT_FILE, HISTORY_TABLE, SEARCH_SPACE_FILE)

# trials.csv: the arm column and its values (the reference recipe, warm starts, the searcher's own).
ARM_COLUMN = "arm"
RECIPE_ARM, WARM_START_ARM, SEARCH_ARM = "recipe", "warm_start", "search"
TRIAL_TEXT_COLUMNS = ("trial_id", "status", ARM_COLUMN, "checkpoint", "error", "node_id")
HISTORY_COLUMNS = [
    "trial_id", "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1",
    "val_balanced_accuracy", "lr", "node_id", "worker_node_ids", "world_size", "epoch_time_s", "checkpoint",
    "worker_pid",  # rank 0's process: trials of a search take turns in warm workers (covid_ray.worker_pool)
]
# experiment.json: the keys every experiment has (a search adds the search space, recipe, times).
EXPERIMENT_KEYS = ("name", "data", "split", "synthetic", "metric", "mode", "classes")


class ExperimentError(ValueError):
    """An experiment folder's file is missing or malformed; the message names the file and the key."""


def trial_dir(root: str | Path, trial_id: str) -> str:
    """``<root>/train/<trial>``: a trial's Ray Train folder under an experiment (a path or a URI)."""
    return join(str(root), TRAIN_DIRNAME, trial_id)


def trial_history(train_storage: str, trial_id: str) -> str:
    """A trial's ``history.jsonl`` under the search's Ray Train storage (``<root>/train``)."""
    return join(train_storage, trial_id, HISTORY_FILE)


# --------------------------------------------------------------------------- experiment.json


@dataclass(frozen=True)
class Experiment:
    """What ``experiment.json`` says about a search; paths are resolved."""

    folder: Path
    name: str
    data: Path
    split: Path
    synthetic: bool
    metric: str
    mode: str
    classes: list[str]


def write_experiment(folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``experiment.json``: the one writer (a search, and benchmarks' stand-in searches).

    ``meta`` holds :data:`EXPERIMENT_KEYS` (``split`` relative to ``folder`` or absolute)
    and whatever else the search records (search space, recipe, times).

    Raises:
        ExperimentError: a required key is missing.
    """
    missing = [k for k in EXPERIMENT_KEYS if k not in meta]
    if missing:
        raise ExperimentError(f"{EXPERIMENT_FILE}: missing keys {missing}")
    return write_json(Path(folder) / EXPERIMENT_FILE, meta)


def load_experiment_json(folder: str | Path) -> dict[str, Any]:
    """``experiment.json`` as written (no path checks: the dataset may have moved since).

    Raises:
        ExperimentError: missing, not JSON, or not an object.
    """
    folder = Path(folder)
    file = folder / EXPERIMENT_FILE
    if not file.is_file():
        raise ExperimentError(f"{file} not found: is {folder} the folder a search wrote?")
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ExperimentError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ExperimentError(f"{file}: expected a JSON object")
    return info


def _require(info: dict, key: str, kind: type, file: Path) -> Any:
    if key not in info:
        raise ExperimentError(f"{file}: missing key {key!r}")
    if not isinstance(info[key], kind):
        raise ExperimentError(f"{file}: {key!r} must be {kind.__name__}, got {info[key]!r}")
    return info[key]


def read_experiment(folder: str | Path) -> Experiment:
    """Parse and check ``<folder>/experiment.json``.

    Raises:
        ExperimentError: the file is missing or malformed, or the dataset or
            manifest it names does not exist.
    """
    from covid_ray.data.layout import SYNTHETIC_MARKER

    folder = Path(folder)
    file = folder / EXPERIMENT_FILE
    info = load_experiment_json(folder)
    data = Path(_require(info, "data", str, file))
    split = Path(_require(info, "split", str, file))
    split = split if split.is_absolute() else folder / split
    classes = _require(info, "classes", list, file)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ExperimentError(f"{file}: 'classes' must be a non-empty list of names, got {classes!r}")
    if not data.is_dir():
        raise ExperimentError(f"{file}: dataset folder {data} not found")
    if not split.is_file():
        raise ExperimentError(f"{file}: split manifest {split} not found")
    mode = info.get("mode", "max")
    if mode not in ("max", "min"):
        raise ExperimentError(f"{file}: 'mode' must be 'max' or 'min', got {mode!r}")
    # An experiment.json without the flag still counts as synthetic when the dataset says so.
    synthetic = bool(info.get("synthetic", (data / SYNTHETIC_MARKER).is_file()))
    return Experiment(
        folder=folder.resolve(),
        name=str(info.get("name", folder.name)),
        data=data,
        split=split,
        synthetic=synthetic,
        metric=str(info.get("metric", "val_macro_f1")),
        mode=mode,
        classes=list(classes),
    )


# --------------------------------------------------------------------------- trials.csv and history.csv


def _read_table(file: Path, text_columns: tuple[str, ...], *, as_text: bool) -> pd.DataFrame:
    """A table as the search wrote it: ``as_text`` keeps every cell's text; else numbers are
    numbers (empty cells NaN) and ``text_columns`` stay strings ("" when empty)."""
    import pandas as pd

    if as_text:
        return pd.read_csv(file, dtype=str, keep_default_na=False)
    df = pd.read_csv(file, dtype={c: str for c in text_columns})
    for c in text_columns:
        if c in df.columns:
            df[c] = df[c].fillna("")
    return df


def read_trials(folder: str | Path, *, as_text: bool = False) -> pd.DataFrame:
    """``trials.csv``: one row per trial, its best checkpoint in ``checkpoint`` ("" when none).

    Raises:
        ExperimentError: no such file yet, or it lacks ``trial_id`` or ``checkpoint``.
    """
    file = Path(folder) / TRIALS_FILE
    if not file.is_file():
        raise ExperimentError(f"{file} not found: the search has not recorded any trial yet")
    df = _read_table(file, TRIAL_TEXT_COLUMNS, as_text=as_text)
    missing = [c for c in ("trial_id", "checkpoint") if c not in df.columns]
    if missing:
        raise ExperimentError(f"{file}: missing columns {missing}")
    return df


def read_history_table(folder: str | Path, *, as_text: bool = False) -> pd.DataFrame:
    """``history.csv``: one row per trial and epoch (:data:`HISTORY_COLUMNS`).

    Raises:
        ExperimentError: no such file.
    """
    file = Path(folder) / HISTORY_TABLE
    if not file.is_file():
        raise ExperimentError(f"{file} not found: the search has not recorded any epoch yet")
    return _read_table(file, ("trial_id", "node_id", "worker_node_ids", "checkpoint"), as_text=as_text)


def best_checkpoint(history: pd.DataFrame, best_epoch: Any) -> str:
    """A trial's checkpoint from its history rows: the best epoch's, else the last one ("" when none).

    The one rule behind ``trials.csv``'s ``checkpoint`` column (a trial keeps its best
    epoch's checkpoint; one that reported none at its best epoch keeps its latest).
    """
    import pandas as pd

    with_ckpt = history[history["checkpoint"].astype(str) != ""]
    if with_ckpt.empty:
        return ""
    best = pd.to_numeric(pd.Series([best_epoch]), errors="coerce").iloc[0]  # NaN (no best epoch) matches none
    at_best = with_ckpt[pd.to_numeric(with_ckpt["epoch"], errors="coerce") == best]
    return str((at_best if len(at_best) else with_ckpt)["checkpoint"].iloc[-1])


# --------------------------------------------------------------------------- a trial's history.jsonl


def read_history(where: str | Path) -> list[dict]:
    """The rows of a trial's ``history.jsonl`` (a path or a URI); [] when there is none.

    Written by ``covid_ray.launch``'s history callback as each epoch is reported, one JSON
    object per line (metrics and ``checkpoint``); a restarted worker group reports an
    epoch again, and readers keep its last report.
    """
    if is_uri(where):
        text = read_text(str(where)) if uri_is_file(str(where)) else ""
    else:
        path = Path(where)
        text = path.read_text() if path.is_file() else ""
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a file whose writer was killed mid-write
            continue
    return rows
