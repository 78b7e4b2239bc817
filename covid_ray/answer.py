"""One decoded radiograph in, one prediction row out: the flow the CLI and the service share.

``covid_ray.predict`` (a line per file) and ``covid_ray.serve`` (an answer per upload)
differ only in how they get the image and the mask and where an overlay goes; the rest
is :func:`answer_image`: the model's preprocessing, the class with its OOD verdict
(:meth:`~covid_ray.inference.LoadedModel.classify`), and on request Grad-CAM with the
in-lung share of a lung mask and the overlay PNG. The row's fields, in order: ``image``,
the prediction's, ``notes`` (the decoder's), the caller's ``fields`` (e.g. the CLI's
``mask``), then the overlay's and the in-lung share's.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np

from covid_ray.gradcam import GradCam, overlay_png, share_fields
from covid_ray.inference import LoadedModel

NO_GRADCAM = "Grad-CAM is not available for this model"


def answer_image(
    model: LoadedModel,
    gray: np.ndarray,
    *,
    image: str,
    notes: list[str] | None = None,
    fields: dict | None = None,
    explain: bool = False,
    cam: GradCam | None = None,
    cam_error: str | None = None,
    mask: np.ndarray | None = None,
    overlay: Callable[[bytes], dict] | None = None,
    outline: bool = False,
    cam_slot: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> dict:
    """The prediction row of one decoded image (``gray``: (H, W) uint8).

    Args:
        image: the ``image`` field (a path, an upload's name).
        notes: what the decoder noticed (16-bit, RGB, ...), kept in the row.
        fields: the caller's own fields, after the prediction's.
        explain: run Grad-CAM (for the overlay and, with ``mask``, the in-lung share);
            without ``cam`` the row says why there is none (``gradcam_error``).
        mask: a lung mask (any size) for ``lung_cam_share`` and ``lung_area_share``.
        overlay: given the overlay PNG, the fields that report it (a file's path, base64);
            None: no overlay.
        outline: draw the mask's outline on the overlay.
        cam_slot: held while Grad-CAM runs (the service's admission limit).

    Raises:
        BadImageError: the image cannot be fed to the model (an aspect ratio no radiograph has).
    """
    prepared = model.prepare(gray)
    row = {"image": image, **model.classify(prepared.x)}  # with the OOD verdict
    if notes:
        row["notes"] = notes
    row.update(fields or {})
    if not explain:
        return row
    if cam is None:
        row["gradcam_error"] = cam_error or NO_GRADCAM
        return row
    with cam_slot():
        result = cam(gray, target=row["class"], mask=mask)
    if overlay is not None and result.cam is not None:
        row.update(overlay(overlay_png(gray, result.cam, model.preprocess, mask=mask if outline else None)))
    if mask is not None:
        row.update(share_fields(result))
    return row
