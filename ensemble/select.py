"""Read a finished (or partly finished) search and choose its top-K trials.

A search leaves ``<results>/<NAME>/`` with ``experiment.json`` (dataset root, split
manifest, classes, the metric and its direction), ``split.csv`` and ``trials.csv``
(one row per trial: ``trial_id``, ``status``, ``config/<key>``, ``best_<metric>``,
``checkpoint`` = the trial's best checkpoint folder); :mod:`covid_ray.artifacts.experiment`
reads and checks them. Trials are ranked by their best
validation value; each candidate's checkpoint is loaded (``weights_only=True``) and
rebuilt here, so a missing or corrupt one is skipped with a warning naming it and the
next-ranked trial takes its place: the ensemble is the top K *usable* trials.

The folder may also be a storage URI (``s3://bucket/prefix/NAME``, the experiment of
a search run with ``--storage-path s3://bucket/prefix``): its tables are downloaded
to a local mirror (:mod:`covid_ray.uri`), and only the checkpoints tried here are
downloaded, each once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch.nn as nn

from covid_ray.artifacts.checkpoint import file_digest, load_checkpoint, model_file, model_from_checkpoint
from covid_ray.artifacts.experiment import ENSEMBLE_INPUTS, EXPERIMENT_FILE, TRIALS_FILE, Experiment, ExperimentError
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.uri import download_files, fetch, is_uri, join, mirror_dir

logger = logging.getLogger(__name__)


class SelectionError(ExperimentError):
    """The search folder cannot give an ensemble (bad files, or no usable trial)."""


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

    @cached_property
    def preprocess(self) -> Preprocess:
        """The checkpoint's eval preprocessing (ModelLoadError, a ValueError, when malformed)."""
        return Preprocess.from_dict(self.payload["preprocess"], source=self.checkpoint or self.trial_id)

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
    checkpoints they name stay URIs and :func:`load_trial` downloads the ones it uses.

    Raises:
        SelectionError: no experiment at ``uri``, or the store cannot be read.
    """
    folder = mirror_dir(uri.rstrip("/"))
    try:
        got = download_files(uri, ENSEMBLE_INPUTS, folder)
    except (OSError, ValueError) as exc:  # credentials, endpoint, bucket
        raise SelectionError(f"cannot read the experiment at {uri}: {exc}") from None
    if EXPERIMENT_FILE not in got:
        raise SelectionError(f"no experiment at {uri} ({EXPERIMENT_FILE} is missing)")
    logger.info("downloaded %s from %s to %s", ", ".join(got), uri, folder)
    return folder


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


def load_trial(row: dict, score: float, classes: list[str]) -> Member:
    """Load and rebuild the checkpoint of one ``trials.csv`` row as an ensemble member.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: missing, unreadable, or not
            matching the experiment's classes, its own architecture or the eval preprocessing.
    """
    where = row["checkpoint"].strip()
    folder = fetch(where) if is_uri(where) else Path(where)  # a URI is downloaded once
    payload = load_checkpoint(folder)
    file = model_file(folder)
    if sorted(payload.get("classes", [])) != sorted(classes):
        raise ValueError(f"{file}: classes {payload.get('classes')} differ from the experiment's {classes}")
    model, payload = model_from_checkpoint(payload)
    member = Member(
        trial_id=str(row["trial_id"]),
        model_name=str(payload["model"]["name"]),
        score=float(score),
        checkpoint=file,
        digest=file_digest(file),
        payload=payload,
        model=model,
        status=str(row.get("status", "")),
    )
    member.preprocess  # noqa: B018 - a malformed one is refused here, where the trial is skipped
    return member


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
            selection.members.append(load_trial(row, row["_score"], experiment.classes))
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
