"""Each member's class probabilities on the validation and test splits, cached on disk.

Every member is fed exactly as it was evaluated during the search: the split's images
at the member's own working resolution from the decode cache, centre-cropped to its
own ``image_size`` and normalized for its own ``in_chans`` (its checkpoint's
``preprocess``). Members trained at different sizes therefore each see their own input.

Predicting is the slow part of a build, so probabilities are stored per member and
split under ``<experiment>/ensemble/cache/``, keyed by the sha256 of ``model.pt``, the
split name and a fingerprint of that split's rows (image hashes and labels): a rebuild
with another K, method or calibration reuses them, and a changed checkpoint or
manifest cannot be served stale.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from covid_ray.artifacts.experiment import Experiment
from covid_ray.data.datasets import CachedImageDataset, SplitData, load_splits, make_loader
from covid_ray.data.scan import find_dataset_root
from covid_ray.data.transforms import EvalPreset
from covid_ray.engine import predict_logits
from covid_ray.metrics import softmax
from covid_ray.progress import progress_bar
from covid_ray.vote import class_order

from ensemble.select import Member

logger = logging.getLogger(__name__)


@dataclass
class SplitProbs:
    """All members' probabilities on one split, columns in the experiment's class order."""

    probs: np.ndarray  # (members, images, classes) float64
    labels: np.ndarray  # (images,) int64
    sha1: list[str]  # image content hashes, row order

    def __post_init__(self):
        if self.probs.ndim != 3 or self.probs.shape[1] != len(self.labels):
            raise ValueError(f"probs {self.probs.shape} do not match {len(self.labels)} labels")


def split_fingerprint(frame: pd.DataFrame) -> str:
    """Short hash of a split's rows (image hash and label, in order)."""
    h = hashlib.sha1()
    for sha1, label in zip(frame["sha1"], frame["label"]):
        h.update(f"{sha1}\t{label}\n".encode())
    return h.hexdigest()[:12]


def predict_member(member: Member, dataset: CachedImageDataset, *, batch_size: int = 64) -> np.ndarray:
    """(images, classes) probabilities of one member on a dataset, in dataset order."""
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False)
    index, logits, _ = predict_logits(member.model, loader, member.preprocess.preset(), torch.device("cpu"), amp="off")
    return softmax(logits[np.argsort(index, kind="stable")])


def _cache_file(cache_dir: Path, member: Member, split: str, fingerprint: str) -> Path:
    return cache_dir / f"{member.digest[:20]}-{split}-{fingerprint}.npz"


def _read_cached(file: Path, classes: Sequence[str], labels: np.ndarray) -> np.ndarray | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            probs, cached_labels, cached_classes = z["probs"], z["labels"], json.loads(str(z["classes"]))
    except Exception as exc:  # a truncated or foreign file: recompute
        logger.warning("ignoring unreadable probability cache %s (%s)", file, exc)
        return None
    if cached_classes != list(classes) or not np.array_equal(cached_labels, labels):
        return None
    return probs


def _write_cached(file: Path, probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, probs=probs, labels=labels, classes=np.array(json.dumps(list(classes))))
    os.replace(tmp, file)  # readers never see a half-written file


def member_probabilities(
    members: Sequence[Member],
    experiment: Experiment,
    manifest: pd.DataFrame,
    splits: Sequence[str] = ("val", "test"),
    *,
    cache_dir: str | Path,
    data_cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, SplitProbs]:
    """Probabilities of every member on each of ``splits``, from the cache where possible.

    Args:
        cache_dir: the probability cache (``<experiment>/ensemble/cache``).
        data_cache_dir: the decode cache of images (``covid_ray.data.cache``'s default
            when None: the one the search's trials used).
        progress: one bar on stderr over members x splits, counted in images (cached
            ones count at once); see :mod:`covid_ray.progress`.

    Raises:
        ValueError: a split is empty, or the manifest has labels outside the classes.
    """
    cache_dir = Path(cache_dir)
    classes = experiment.classes
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(manifest["label"]) - set(classes))
    if unknown:
        raise ValueError(f"{experiment.split}: labels {unknown} are not among the experiment's classes {classes}")
    frames = {s: manifest[manifest["split"] == s].reset_index(drop=True) for s in splits}
    for split, frame in frames.items():
        if frame.empty:
            raise ValueError(f"{experiment.split}: the {split!r} split holds no images")
    fingerprints = {s: split_fingerprint(f) for s, f in frames.items()}
    labels = {s: f["label"].map(lookup).to_numpy(dtype=np.int64) for s, f in frames.items()}

    root = find_dataset_root(experiment.data)
    loaded: dict[int, SplitData] = {}  # one decode-cache store per working resolution
    out: dict[str, list[np.ndarray]] = {s: [] for s in splits}
    total = len(members) * sum(len(f) for f in frames.values())
    bar = progress_bar(total, "member predictions", unit="img", enabled=progress)
    for member in members:
        perm = class_order(member.classes, classes)
        for split in splits:
            file = _cache_file(cache_dir, member, split, fingerprints[split])
            probs = _read_cached(file, classes, labels[split])
            if probs is None:
                resize = member.preprocess.resize
                if resize not in loaded:
                    loaded[resize] = load_splits(root, manifest, classes, resize, cache_dir=data_cache_dir)
                dataset = loaded[resize].datasets[split]
                if not np.array_equal(dataset.labels.numpy(), labels[split]):
                    raise ValueError(f"{experiment.split}: the {split} split changed while reading it")
                probs = predict_member(member, dataset, batch_size=batch_size)[:, perm]
                _write_cached(file, probs, labels[split], classes)
                logger.info("trial %s: predicted %d %s images", member.trial_id, len(probs), split)
            else:
                logger.info("trial %s: %s probabilities from %s", member.trial_id, split, file.name)
            out[split].append(probs)
            bar.update(len(probs))
    bar.close()
    return {
        s: SplitProbs(np.stack(out[s]).astype(np.float64), labels[s], frames[s]["sha1"].tolist()) for s in splits
    }


def load_split_dataset(
    experiment: Experiment,
    manifest: pd.DataFrame,
    split: str,
    *,
    resize: int,
    data_cache_dir: str | Path | None = None,
) -> CachedImageDataset:
    """One split's uint8 images at working resolution ``resize`` (from the decode cache)."""
    root = find_dataset_root(experiment.data)
    return load_splits(root, manifest, experiment.classes, resize, cache_dir=data_cache_dir).datasets[split]


def preprocessed_batches(
    dataset: CachedImageDataset, preset: EvalPreset, *, rows: np.ndarray | None = None, batch_size: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(float32 (B, C, S, S), labels)`` batches of ``rows`` (default: all, in order).

    Batches rather than one array: a real test split at 224 px is gigabytes as float32.
    """
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    for i in range(0, len(rows), batch_size):
        images, labels, _ = dataset.__getitems__(rows[i : i + batch_size])
        yield preset(images).numpy().astype(np.float32, copy=False), labels.numpy()


def sample_rows(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """A sorted, seeded random subset of ``range(n)`` of size ``min(n, limit)``."""
    if limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
