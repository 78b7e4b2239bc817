"""Each member's logits (per TTA view) and pooled features on any set of images, cached on disk.

The OOD score (:mod:`ensemble.ood`), test-time augmentation (:mod:`ensemble.tta`) and
the shortcut audit (:mod:`ensemble.shortcut`) all need more than the class
probabilities :mod:`ensemble.members` stores: logits under several views, the
penultimate features, and images other than the split's (OOD sets, the test images
with the lungs removed). They are predicted here once per member, image set and list
of views, in batches, and kept under ``<experiment>/ensemble/cache/`` keyed by the
member's sha256, the image set's content fingerprint and the views, as
:mod:`ensemble.members` does for probabilities.

*Features* are the input of the final classification ``Linear`` (the registry's
``classifier`` path: ResNet's ``fc``, the last ``Linear`` of MobileNetV3's and the
seed CNN's two-layer heads, ...): the member's pooled, penultimate representation.
:func:`split_classifier` cuts a model there without hooks, so the same split exports
into the ONNX graph.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from covid_ray.artifacts.experiment import Experiment
from covid_ray.data.io import resize_square
from covid_ray.models import get_model_entry
from covid_ray.vote import class_order

from ensemble.members import load_split_dataset, split_fingerprint
from ensemble.select import Member
from ensemble.tta import IDENTITY, Views

logger = logging.getLogger(__name__)

CACHE_VERSION = "out1"


# --------------------------------------------------------------------------- body / head


def classifier_path(model: nn.Module, arch: str | None = None) -> str:
    """Dotted path of the final classification Linear (the registry's, else the last Linear)."""
    arch = arch or getattr(model, "covid_ray_args", {}).get("name")
    if arch:
        try:
            path = get_model_entry(arch).classifier
            if isinstance(model.get_submodule(path), nn.Linear):
                return path
        except (ValueError, AttributeError):
            pass
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} ({arch}) has no Linear layer to take features before")
    return linears[-1]


def _without(module: nn.Module, path: str) -> nn.Module:
    """A copy of ``module`` sharing every submodule except ``path``, which becomes Identity."""
    first, _, rest = path.partition(".")
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = dict(module.__dict__)
    clone._modules = dict(module._modules)  # the children are shared, not copied
    clone._modules[first] = nn.Identity() if not rest else _without(module._modules[first], rest)
    return clone


class SplitMember(nn.Module):
    """``model(x)`` as ``head(body(x))``: returns ``(logits, features)``; parameters shared with ``model``.

    Only valid when the final Linear is the model's last operation, which holds for
    every registered architecture (a test checks ``logits == model(x)``).
    """

    def __init__(self, model: nn.Module, arch: str | None = None):
        super().__init__()
        path = classifier_path(model, arch)
        self.head = model.get_submodule(path)
        self.body = _without(model, path)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.body(x), 1)
        return self.head(features), features


def split_classifier(member: Member) -> SplitMember:
    return SplitMember(member.model, member.model_name).eval()


# --------------------------------------------------------------------------- image sets


@dataclass
class ImageSet:
    """Images to predict on, delivered as uint8 (B, R, R) batches at a member's working resolution.

    ``batches(resize, batch_size)`` yields them; ``key`` fingerprints the content (the
    cache key), ``labels`` are class indices when known.
    """

    name: str
    key: str
    size: int
    batches: Callable[[int, int], Iterator[np.ndarray]]
    labels: np.ndarray | None = None


def split_images(experiment: Experiment, manifest: pd.DataFrame, split: str, *, rows: np.ndarray | None = None,
                 data_cache_dir: str | Path | None = None,
                 transform: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None, tag: str = "") -> ImageSet:
    """A split's images (or ``rows`` of it) from the decode cache.

    ``transform(batch, positions)``, when given, changes each (B, R, R) batch; ``positions``
    are the batch's indices into ``rows``. ``tag`` names the transform in the cache key.
    """
    frame = manifest[manifest["split"] == split].reset_index(drop=True)
    rows = np.arange(len(frame)) if rows is None else np.asarray(rows, dtype=np.int64)
    key = hashlib.sha1(f"{split_fingerprint(frame)}:{rows.tolist()}:{tag}".encode()).hexdigest()[:12]
    lookup = {c: i for i, c in enumerate(experiment.classes)}
    labels = frame["label"].map(lookup).to_numpy(dtype=np.int64)[rows]
    loaded: dict[int, object] = {}

    def batches(resize: int, batch_size: int) -> Iterator[np.ndarray]:
        if resize not in loaded:
            loaded[resize] = load_split_dataset(experiment, manifest, split, resize=resize,
                                                data_cache_dir=data_cache_dir)
        dataset = loaded[resize]
        for i in range(0, len(rows), batch_size):
            images = dataset.array[dataset.rows[rows[i : i + batch_size]]]
            yield transform(images, np.arange(i, i + len(images))) if transform else np.ascontiguousarray(images)

    return ImageSet(f"{split}{'-' + tag if tag else ''}", key, len(rows), batches, labels)


def array_images(name: str, images: Sequence[np.ndarray], labels: np.ndarray | None = None) -> ImageSet:
    """Decoded grayscale images of any size, resized as inference resizes them (``resize_square``)."""
    h = hashlib.sha1()
    for im in images:
        h.update(f"{im.shape}".encode())
        h.update(np.ascontiguousarray(im, dtype=np.uint8).tobytes())
    items = list(images)

    def batches(resize: int, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(items), batch_size):
            yield np.stack([resize_square(np.asarray(im, dtype=np.uint8), resize) for im in items[i : i + batch_size]])

    return ImageSet(name, h.hexdigest()[:12], len(items), batches, labels)


# --------------------------------------------------------------------------- predicting


@dataclass
class Outputs:
    """One member on one image set: logits per view and the identity view's features."""

    logits: np.ndarray  # (views, images, classes) float32, the experiment's class order
    features: np.ndarray  # (images, D) float32

    def probs(self) -> np.ndarray:
        """(views, images, classes) float64 softmax."""
        z = self.logits.astype(np.float64)
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)


@torch.inference_mode()
def predict_outputs(member: Member, images: ImageSet, views: Sequence[str] = (IDENTITY,), *,
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(logits (V, N, K) in the member's class order, features (N, D)) without the cache."""
    net = split_classifier(member)
    pre = member.preprocess
    preset = pre.preset()
    stack = Views(list(views), image_size=pre.image_size, mean=pre.mean, std=pre.std)
    logits, features = [], []
    for batch in images.batches(pre.resize, batch_size):
        x = preset(torch.from_numpy(np.ascontiguousarray(batch)).unsqueeze(1))
        z, f = net(stack(x))
        b = len(batch)
        logits.append(z.float().numpy().reshape(len(views), b, -1))
        features.append(f[:b].float().numpy())
    if not logits:
        raise ValueError(f"image set {images.name!r} is empty")
    return np.concatenate(logits, axis=1), np.concatenate(features)


def _read(file: Path, views: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as z:
            logits, features, cached_views = z["logits"], z["features"], [str(v) for v in z["views"]]
    except Exception as exc:  # a truncated or foreign file: recompute
        logger.warning("ignoring unreadable output cache %s (%s)", file, exc)
        return None
    if cached_views != list(views) or logits.shape[:2] != (len(views), n) or len(features) != n:
        return None
    return logits, features


def _write(file: Path, logits: np.ndarray, features: np.ndarray, views: Sequence[str]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, logits=logits, features=features, views=np.array(list(views)))
    os.replace(tmp, file)  # readers never see a half-written file


def member_outputs(member: Member, images: ImageSet, classes: Sequence[str], *, views: Sequence[str] = (IDENTITY,),
                   cache_dir: str | Path | None = None, batch_size: int = 64) -> Outputs:
    """Logits and features of one member on ``images`` (columns in ``classes`` order), cached."""
    perm = class_order(member.classes, classes)
    file = None
    if cache_dir is not None:
        tag = hashlib.sha1(",".join(views).encode()).hexdigest()[:8]
        file = Path(cache_dir) / f"{member.digest[:20]}-{CACHE_VERSION}-{images.name}-{images.key}-{tag}.npz"
        cached = _read(file, views, images.size)
        if cached is not None:
            return Outputs(cached[0][..., perm], cached[1])
    logits, features = predict_outputs(member, images, views, batch_size=batch_size)
    logger.info("trial %s: predicted %d %s images x %d views", member.trial_id, images.size, images.name, len(views))
    if file is not None:
        _write(file, logits, features, views)
    return Outputs(logits[..., perm], features)
