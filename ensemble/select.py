"""Read a finished (or partly finished) search and choose its top-K trials.

A search leaves ``<results>/<NAME>/`` with ``experiment.json`` (dataset root, split
manifest, classes, the metric and its direction), ``split.csv`` and ``trials.csv``
(one row per trial: ``trial_id``, ``status``, ``config/<key>``, ``best_<metric>``,
``checkpoint`` = the trial's best checkpoint folder). Trials are ranked by their best
validation value; each candidate's checkpoint is loaded (``weights_only=True``) and
rebuilt here, so a missing or corrupt one is skipped with a warning naming it and the
next-ranked trial takes its place: the ensemble is the top K *usable* trials.

The folder may also be a storage URI (``s3://bucket/prefix/NAME``, the experiment of
a search run with ``--storage-path s3://bucket/prefix``): its tables are downloaded
to a local mirror (:mod:`covid_ray.uri`), and only the checkpoints tried here are
downloaded, each once.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch.nn as nn

from covid_ray.checkpoint import MODEL_FILE, file_digest, load_checkpoint, model_from_checkpoint
from covid_ray.data.layout import SYNTHETIC_MARKER
from covid_ray.uri import download_files, fetch, is_uri, join, mirror_dir

logger = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.json"
TRIALS_FILE = "trials.csv"
# What an ensemble reads of an experiment folder besides the checkpoints.
TABLES = (EXPERIMENT_FILE, TRIALS_FILE, "split.csv", "history.csv", "search_space.yaml")


class SelectionError(ValueError):
    """The search folder cannot give an ensemble (bad files, or no usable trial)."""


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


@dataclass
class Member:
    """One usable trial: its checkpoint, loaded and rebuilt (eval mode)."""

    trial_id: str
    model_name: str
    score: float  # best_<metric> from trials.csv
    checkpoint: Path  # the model.pt file
    digest: str  # sha256 of model.pt: the probability cache key
    payload: dict
    model: nn.Module
    status: str = ""

    @property
    def preprocess(self) -> dict:
        return self.payload["preprocess"]

    @property
    def classes(self) -> list[str]:
        return list(self.payload["classes"])


@dataclass
class Selection:
    members: list[Member]
    requested: int
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"trial_id", "checkpoint", "reason"}
    notes: list[str] = field(default_factory=list)


def resolve_experiment_dir(
    experiment: str | None, results_dir: str | Path | None, *, results_root: str | Path = "results"
) -> Path:
    """``results_dir`` itself, or ``<results_root>/<experiment>``; exactly one must be given.

    A storage URI is downloaded (its tables, see :func:`localize_experiment`) and the
    local copy returned.
    """
    where = experiment_location(experiment, results_dir, results_root=results_root)
    if is_uri(where):
        return localize_experiment(where)
    folder = Path(where)
    if not folder.is_dir():
        raise SelectionError(f"experiment folder not found: {folder}")
    return folder.resolve()


def experiment_location(
    experiment: str | None, results_dir: str | Path | None, *, results_root: str | Path = "results"
) -> str:
    """The experiment folder as given: a path or a storage URI."""
    if (experiment is None) == (results_dir is None):
        raise SelectionError("give exactly one of --experiment NAME or --results-dir PATH")
    return str(results_dir) if results_dir is not None else join(str(results_root), str(experiment))


def localize_experiment(uri: str) -> Path:
    """Download the tables of the experiment at ``uri`` into its local mirror.

    The tables are fetched afresh every time (a resumed search rewrites them); the
    checkpoints they name stay URIs and :func:`load_member` downloads the ones it uses.

    Raises:
        SelectionError: no experiment at ``uri``, or the store cannot be read.
    """
    folder = mirror_dir(uri.rstrip("/"))
    try:
        got = download_files(uri, TABLES, folder)
    except (OSError, ValueError) as exc:  # credentials, endpoint, bucket
        raise SelectionError(f"cannot read the experiment at {uri}: {exc}") from None
    if EXPERIMENT_FILE not in got:
        raise SelectionError(f"no experiment at {uri} ({EXPERIMENT_FILE} is missing)")
    logger.info("downloaded %s from %s to %s", ", ".join(got), uri, folder)
    return folder


def _require(info: dict, key: str, kind: type, file: Path) -> Any:
    if key not in info:
        raise SelectionError(f"{file}: missing key {key!r}")
    if not isinstance(info[key], kind):
        raise SelectionError(f"{file}: {key!r} must be {kind.__name__}, got {info[key]!r}")
    return info[key]


def read_experiment(folder: str | Path) -> Experiment:
    """Parse and check ``<folder>/experiment.json``.

    Raises:
        SelectionError: the file is missing or malformed, or the dataset or
            manifest it names does not exist.
    """
    folder = Path(folder)
    file = folder / EXPERIMENT_FILE
    if not file.is_file():
        raise SelectionError(f"{file} not found: is {folder} the folder a search wrote?")
    try:
        info = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise SelectionError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise SelectionError(f"{file}: expected a JSON object")
    data = Path(_require(info, "data", str, file))
    split = Path(_require(info, "split", str, file))
    split = split if split.is_absolute() else folder / split
    classes = _require(info, "classes", list, file)
    if not classes or not all(isinstance(c, str) for c in classes):
        raise SelectionError(f"{file}: 'classes' must be a non-empty list of names, got {classes!r}")
    if not data.is_dir():
        raise SelectionError(f"{file}: dataset folder {data} not found")
    if not split.is_file():
        raise SelectionError(f"{file}: split manifest {split} not found")
    mode = info.get("mode", "max")
    if mode not in ("max", "min"):
        raise SelectionError(f"{file}: 'mode' must be 'max' or 'min', got {mode!r}")
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


def read_trials(folder: str | Path) -> pd.DataFrame:
    file = Path(folder) / TRIALS_FILE
    if not file.is_file():
        raise SelectionError(f"{file} not found: the search has not recorded any trial yet")
    df = pd.read_csv(file, dtype={"trial_id": str, "checkpoint": str, "status": str}, keep_default_na=False)
    missing = [c for c in ("trial_id", "checkpoint") if c not in df.columns]
    if missing:
        raise SelectionError(f"{file}: missing columns {missing}")
    return df


def metric_mode(metric: str, experiment: Experiment) -> str:
    """Direction of ``metric``: the experiment's for its own metric, else min for losses."""
    if metric == experiment.metric:
        return experiment.mode
    return "min" if metric.endswith(("loss", "nll", "ece")) else "max"


def rank_trials(trials: pd.DataFrame, metric: str, mode: str) -> tuple[pd.DataFrame, list[str]]:
    """Rows with a checkpoint and a finite ``best_<metric>``, best first; and notes on the rest."""
    column = f"best_{metric}"
    if column not in trials.columns:
        known = sorted(c for c in trials.columns if c.startswith("best_"))
        raise SelectionError(f"trials.csv has no column {column!r}; available: {known}")
    scores = pd.to_numeric(trials[column], errors="coerce")
    has_ckpt = trials["checkpoint"].str.strip() != ""
    finite = pd.Series(np.isfinite(scores.to_numpy(dtype=np.float64)), index=trials.index)
    notes = []
    if (~has_ckpt).any():
        notes.append(f"{int((~has_ckpt).sum())} of {len(trials)} trials have no checkpoint and were not considered")
    if (has_ckpt & ~finite).any():
        notes.append(f"{int((has_ckpt & ~finite).sum())} trials have no finite {column} and were not considered")
    ranked = trials[has_ckpt & finite].assign(_score=scores[has_ckpt & finite])
    # Ties broken by trial_id so the choice is deterministic; one row (its best) per trial.
    ranked = ranked.sort_values(["_score", "trial_id"], ascending=[mode == "min", True], kind="stable")
    ranked = ranked.drop_duplicates("trial_id", keep="first")
    return ranked.reset_index(drop=True), notes


def load_member(row: dict, score: float, classes: list[str]) -> Member:
    """Load and rebuild one trial's checkpoint.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: missing, unreadable, or not
            matching the experiment's classes or its own architecture.
    """
    where = row["checkpoint"].strip()
    folder = fetch(where) if is_uri(where) else Path(where)  # a URI is downloaded once
    payload = load_checkpoint(folder)
    file = folder / MODEL_FILE if folder.is_dir() else folder
    if sorted(payload.get("classes", [])) != sorted(classes):
        raise ValueError(f"{file}: classes {payload.get('classes')} differ from the experiment's {classes}")
    model, payload = model_from_checkpoint(payload)
    return Member(
        trial_id=str(row["trial_id"]),
        model_name=str(payload["model"]["name"]),
        score=float(score),
        checkpoint=file,
        digest=file_digest(file),
        payload=payload,
        model=model,
        status=str(row.get("status", "")),
    )


def select_top(experiment: Experiment, trials: pd.DataFrame, top: int, metric: str, mode: str) -> Selection:
    """The ``top`` best usable trials.

    Raises:
        SelectionError: ``top`` < 1, or no trial has a usable checkpoint.
    """
    if top < 1:
        raise SelectionError(f"--top must be >= 1, got {top}")
    ranked, notes = rank_trials(trials, metric, mode)
    selection = Selection(members=[], requested=top, notes=notes)
    for row in ranked.to_dict("records"):
        if len(selection.members) == top:
            break
        try:
            selection.members.append(load_member(row, row["_score"], experiment.classes))
        except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            reason = str(exc) if not isinstance(exc, KeyError) else f"checkpoint lacks key {exc}"
            logger.warning("skipping trial %s (checkpoint %s): %s", row["trial_id"], row["checkpoint"], reason)
            selection.skipped.append({"trial_id": str(row["trial_id"]), "checkpoint": row["checkpoint"], "reason": reason})
    if not selection.members:
        tried = "; ".join(f"{s['trial_id']}: {s['reason']}" for s in selection.skipped) or "none had a checkpoint"
        raise SelectionError(
            f"no usable trial in {experiment.folder / TRIALS_FILE} ({len(trials)} rows; {tried})"
        )
    if len(selection.members) < top:
        notes.append(f"asked for the top {top} trials but only {len(selection.members)} are usable; using those")
    if selection.skipped:
        names = ", ".join(s["trial_id"] for s in selection.skipped)
        filled = "; the next-ranked trials took their place" if len(selection.members) == top else ""
        notes.append(f"skipped unusable checkpoints of trials {names}{filled}")
    return selection
