"""``ensemble.build``'s in-lung Grad-CAM share: where the ensemble looks, over a sample of test images.

The map is the ensemble's Grad-CAM for its predicted class, members weighted as in
the ensemble (:mod:`covid_ray.gradcam`); the share is the part of it inside the lung
mask. Grad-CAM costs a backward pass per member and image, so a seeded sample of the
test images with masks is scored (``--lung-cam-images``). Only the test split is read,
and nothing is fitted on it.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from covid_ray.artifacts.experiment import Experiment
from covid_ray.data.io import read_grayscale
from covid_ray.data.scan import find_dataset_root
from covid_ray.gradcam import CamMember, GradCam, read_mask

from ensemble.members import sample_rows
from ensemble.select import Member


def cam_members(members: Sequence[Member], weights: Sequence[float]) -> list[CamMember]:
    """The Grad-CAM members of an ensemble; zero weights left out."""
    return [CamMember(m.trial_id, m.model, float(w), m.classes, m.preprocess, m.model_name)
            for m, w in zip(members, weights) if w > 0]


def lung_share_summary(cam: GradCam, items: Sequence[tuple[Path, Path]], *, available: int | None = None) -> dict:
    """Mean in-lung Grad-CAM share over ``(image, mask)`` files.

    Args:
        available: how many images with masks the sample was drawn from (reported).

    Returns:
        ``images`` (scored), ``available``, ``mean``, ``median``, ``min``, ``max``,
        ``below_half`` (images with less than half the map in the lungs),
        ``lung_area_mean`` (what a uniform map would score), ``members`` (mean share
        per member name), ``skipped`` (unreadable files or empty maps/masks).
    """
    shares, areas, per_member, skipped = [], [], [[] for _ in cam.members], []
    for image_path, mask_path in items:
        try:
            gray = read_grayscale(image_path)[0].array
            result = cam(gray, mask=read_mask(mask_path))
        except (ValueError, OSError) as exc:  # BadImageError is a ValueError
            skipped.append(f"{image_path}: {exc}")
            continue
        if result.lung_share is None or not result.lung_area:
            skipped.append(f"{image_path}: empty Grad-CAM map or empty mask in the crop")
            continue
        shares.append(result.lung_share)
        areas.append(result.lung_area)
        for acc, s in zip(per_member, result.member_shares):
            if s is not None:
                acc.append(s)
    arr = np.asarray(shares, dtype=np.float64)
    return {
        "images": int(len(arr)),
        "available": int(available if available is not None else len(items)),
        "mean": float(arr.mean()) if len(arr) else None,
        "median": float(np.median(arr)) if len(arr) else None,
        "min": float(arr.min()) if len(arr) else None,
        "max": float(arr.max()) if len(arr) else None,
        "below_half": int((arr < 0.5).sum()),
        "lung_area_mean": float(np.mean(areas)) if areas else None,
        "members": {m.name: (float(np.mean(v)) if v else None) for m, v in zip(cam.members, per_member)},
        "skipped": skipped[:10],
        "skipped_count": len(skipped),
    }


def lung_cam_summary(experiment: Experiment, manifest: pd.DataFrame, members: list[Member], weights: np.ndarray,
                     limit: int) -> dict:
    """The ``lung_cam`` section of metrics.json: the share over a seeded sample of test images with masks."""
    test = manifest[manifest["split"] == "test"]
    if "mask" in test.columns:
        test = test[test["mask"].astype(str).str.strip() != ""]
    else:
        test = test.iloc[:0]
    if test.empty:
        return {"images": 0, "available": 0, "note": "no test image has a lung mask in the split manifest"}
    root = find_dataset_root(experiment.data)
    picked = test.iloc[sample_rows(len(test), limit)]
    items = [(root / p, root / m) for p, m in zip(picked["path"], picked["mask"])]
    cam = GradCam(cam_members(members, weights), experiment.classes)
    start = time.perf_counter()
    summary = lung_share_summary(cam, items, available=len(test))
    summary.update(sample_seed=0, seconds=round(time.perf_counter() - start, 1),
                   member_models={m.trial_id: m.model_name for m in members})
    return summary
