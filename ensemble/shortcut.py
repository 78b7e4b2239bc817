"""Shortcut audit: does the ensemble still classify the test split with the lungs taken away?

Published audits of models trained on this database found them reading the source
hospital (text markers, borders, patient position, pediatric anatomy) rather than the
lungs (DeGrave et al., Nat Mach Intell 2021; Roberts et al., Nat Mach Intell 2021).
Here the test split is evaluated twice more, with the split manifest's lung masks:

* **lungs removed**: inside the mask, the image is replaced by its own surroundings,
  blurred in (normalized convolution: a Gaussian-weighted mean of the pixels outside
  the mask, sigma = 1/8 of the image), so no lung texture remains;
* **lungs only**: outside the mask, the image is replaced by the mean of the lungs.

Both are made at the working resolution from the decode cache (the mask follows the
image's resize, as in :func:`covid_ray.gradcam.mask_in_crop`) and fed through every
member and view like the intact images.

**Chance** is the label-permutation null: the same predictions scored against the
test labels randomly permuted (``PERMUTATIONS`` times). It keeps the prediction
frequencies, so a variant that answers one class everywhere sits at chance.

**The rule** (``flagged``): the ensemble is flagged as likely using shortcuts when,
with the lungs removed, its macro-F1 is above the permutation null's 99th percentile
*and* it keeps at least ``RETAINED_SKILL`` (half) of its above-chance macro-F1:
``(F1_removed - chance) / (F1_intact - chance) >= 0.5``.

When the dataset's ``<class>.metadata.xlsx`` files name a source (``URL``) per image,
the audit adds per-source test accuracy and whether the source alone predicts the
class (:mod:`ensemble.sources`).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter

from covid_ray.artifacts.experiment import Experiment
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.data.io import BadImageError, read_grayscale
from covid_ray.data.scan import find_dataset_root
from covid_ray.data.transforms import normalization_for
from covid_ray.gradcam import mask_in_crop
from covid_ray.metrics import confusion_matrix, confusion_metrics

from ensemble.calibrate import apply_temperature
from ensemble.combine import soft_vote
from ensemble.outputs import ImageSet, member_outputs, split_images
from ensemble.select import Member
from ensemble.sources import source_analysis
from ensemble.tta import IDENTITY

logger = logging.getLogger(__name__)

VARIANTS = ("lungs_removed", "lungs_only")
PERMUTATIONS = 1000
NULL_QUANTILE = 0.99
RETAINED_SKILL = 0.5
BLUR_FRACTION = 1 / 8  # sigma of the fill, as a share of the image side


def fill_lungs_removed(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (H, W) uint8 with the ``mask`` (bool) region replaced by its blurred surroundings."""
    img, keep = image.astype(np.float64), (~mask).astype(np.float64)
    if not mask.any():
        return image.copy()
    if not keep.any():
        return np.full_like(image, int(round(img.mean())))
    sigma = max(1.0, BLUR_FRACTION * image.shape[0])
    num, den = gaussian_filter(img * keep, sigma), gaussian_filter(keep, sigma)
    fill = np.where(den > 1e-6, num / np.maximum(den, 1e-6), img[~mask].mean())
    return np.where(mask, np.clip(np.round(fill), 0, 255), img).astype(np.uint8)


def fill_lungs_only(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with everything outside ``mask`` set to the mean of the lungs."""
    if not mask.any():
        return np.full_like(image, int(round(image.mean())))
    return np.where(mask, image, np.uint8(round(float(image[mask].mean())))).astype(np.uint8)


FILLS = {"lungs_removed": fill_lungs_removed, "lungs_only": fill_lungs_only}


def read_masks(root: Path, frame: pd.DataFrame, resize: int) -> tuple[np.ndarray, list[str]]:
    """(N, R, R) bool lung masks at working resolution ``resize``, aligned with the cached images.

    Returns the masks and the problems (unreadable or empty masks: all-False rows).
    """
    gray = Preprocess(image_size=resize, resize=resize, in_chans=1, mean=normalization_for(1)[0],
                      std=normalization_for(1)[1])
    out, problems = np.zeros((len(frame), resize, resize), dtype=bool), []
    for i, (path, mask) in enumerate(zip(frame["path"], frame["mask"])):
        try:
            with Image.open(root / path) as im:  # the header only: the image's size
                w, h = im.size
            out[i] = mask_in_crop(read_grayscale(root / mask)[0].array, (h, w), gray)
        except (OSError, BadImageError) as exc:
            problems.append(f"{mask}: {exc}")
            continue
        if not out[i].any():
            problems.append(f"{mask}: empty mask")
    return out, problems


def variant_images(experiment: Experiment, manifest: pd.DataFrame, variant: str, rows: np.ndarray, *,
                   data_cache_dir: str | Path | None = None) -> ImageSet:
    """The test rows ``rows`` (with masks) with the lungs removed or kept alone."""
    fill = FILLS[variant]
    root = find_dataset_root(experiment.data)
    frame = manifest[manifest["split"] == "test"].reset_index(drop=True).iloc[rows]
    masks: dict[int, np.ndarray] = {}

    def transform(batch: np.ndarray, positions: np.ndarray) -> np.ndarray:
        resize = batch.shape[-1]
        if resize not in masks:
            masks[resize], problems = read_masks(root, frame, resize)
            for p in problems[:5]:
                logger.warning("shortcut audit: %s", p)
        return np.stack([fill(im, m) for im, m in zip(batch, masks[resize][positions])])

    return split_images(experiment, manifest, "test", rows=rows, data_cache_dir=data_cache_dir,
                        transform=transform, tag=variant)


def permutation_null(labels: np.ndarray, pred: np.ndarray, k: int, *, n: int = PERMUTATIONS,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean and ``NULL_QUANTILE`` quantile of macro-F1 and accuracy under permuted labels."""
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(labels) for _ in range(n)])  # (n, N)
    cells = (np.arange(n)[:, None] * k + perms) * k + pred[None, :]
    cm = np.bincount(cells.ravel(), minlength=n * k * k).reshape(n, k, k)
    stats = confusion_metrics(cm)
    q = f"q{round(NULL_QUANTILE * 100)}"
    return {m: {"mean": float(np.mean(stats[m])), q: float(np.quantile(stats[m], NULL_QUANTILE))}
            for m in ("macro_f1", "accuracy")}


def _scores(labels: np.ndarray, probs: np.ndarray, k: int) -> dict:
    pred = probs.argmax(axis=1)
    stats = confusion_metrics(confusion_matrix(labels, pred, k))
    return {"macro_f1": float(stats["macro_f1"]), "accuracy": float(stats["accuracy"]),
            "chance": permutation_null(labels, pred, k),
            "predicted_counts": np.bincount(pred, minlength=k).tolist()}


def flag_rule(intact: dict, removed: dict) -> tuple[bool, float | None, str]:
    """(flagged, retained skill, one-line reason) of the rule in the module docstring."""
    q = f"q{round(NULL_QUANTILE * 100)}"
    chance_intact, chance_removed = intact["chance"]["macro_f1"]["mean"], removed["chance"]["macro_f1"]["mean"]
    skill = intact["macro_f1"] - chance_intact
    if skill <= 0:
        return False, None, "the ensemble is not above chance on the intact images; the rule does not apply"
    retained = (removed["macro_f1"] - chance_removed) / skill
    above = removed["macro_f1"] > removed["chance"]["macro_f1"][q]
    flagged = bool(above and retained >= RETAINED_SKILL)
    reason = (f"with the lungs removed macro-F1 is {removed['macro_f1']:.3f} (chance {chance_removed:.3f}, "
              f"permutation {round(NULL_QUANTILE * 100)}th percentile {removed['chance']['macro_f1'][q]:.3f}); "
              f"it keeps {round(retained, 2) + 0.0:.0%} of its above-chance macro-F1 (flagged at >= "
              f"{RETAINED_SKILL:.0%} and above the percentile)")
    return flagged, float(retained), reason


def shortcut_audit(members: Sequence[Member], weights: Sequence[float], temperature: float,
                   experiment: Experiment, manifest: pd.DataFrame, test_probs: np.ndarray, *,
                   views: Sequence[str] = (IDENTITY,), cache_dir: str | Path | None = None,
                   data_cache_dir: str | Path | None = None) -> dict:
    """The ``shortcut`` section of metrics.json (see the module docstring).

    Args:
        test_probs: the ensemble's calibrated probabilities on the intact test split.
    """
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    has_mask = test["mask"].astype(str).str.strip() != "" if "mask" in test.columns else pd.Series(False, test.index)
    rows = np.flatnonzero(has_mask.to_numpy())
    base = {"rule": {"permutations": PERMUTATIONS, "null_quantile": NULL_QUANTILE, "retained_skill": RETAINED_SKILL,
                     "chance": "the same predictions against permuted test labels (mean over permutations)"}}
    try:
        base["sources"] = source_analysis(manifest, find_dataset_root(experiment.data), experiment.classes,
                                          np.asarray(test_probs).argmax(axis=1))
    except (OSError, ValueError) as exc:  # a diagnostic: never lose the audit over it
        base["sources"] = {"available": False, "note": f"failed: {type(exc).__name__}: {exc}"}
    if not len(rows):
        return {**base, "status": "skipped", "note": "no test image has a lung mask in the split manifest"}
    k = len(experiment.classes)
    lookup = {c: i for i, c in enumerate(experiment.classes)}
    labels = test["label"].map(lookup).to_numpy(dtype=np.int64)[rows]
    out = {**base, "status": "ok", "images": int(len(rows)), "test_images": int(len(test)),
           "intact": _scores(labels, np.asarray(test_probs)[rows], k)}
    keep = [i for i, w in enumerate(weights) if w > 0]
    for variant in VARIANTS:
        images = variant_images(experiment, manifest, variant, rows, data_cache_dir=data_cache_dir)
        probs = np.stack([member_outputs(members[i], images, experiment.classes, views=views,
                                         cache_dir=cache_dir).probs().mean(axis=0) for i in keep])
        mix = apply_temperature(soft_vote(probs, [weights[i] for i in keep]), temperature)
        out[variant] = _scores(labels, mix, k)
    out["flagged"], out["retained_skill"], out["reason"] = flag_rule(out["intact"], out["lungs_removed"])
    return out
