"""``python -m covid_ray.serve --model PATH``: the classifier as an HTTP service (FastAPI + uvicorn).

Endpoints:

* ``POST /predict`` (multipart form: ``file`` = the radiograph; optional ``mask`` = a
  lung mask): the JSON line of ``covid_ray.predict`` for the upload. With
  ``?gradcam=true`` it adds ``gradcam_png`` (base64 PNG overlay); with a mask it adds
  ``lung_cam_share`` and ``lung_area_share``.
* ``GET /``: a page to upload a radiograph (and its mask) and see the answer with the
  Grad-CAM overlay; ``GET /model-card``: the exported ensemble's card (:mod:`covid_ray.web`).
* ``GET /health``: ``{"status": "ok"}`` once the model is loaded.
* ``GET /model``: classes, preprocessing, members, the test metrics summary from
  ``metrics.json`` when present, the synthetic flag, Grad-CAM availability and limits,
  and ``ood``: the OOD abstention score and threshold with their measured rates.

Bad uploads get a 4xx with ``{"detail": message}``, never a 500: a request body over
the limit 413 (FastAPI's ``max_body_size``: checked against Content-Length before the
body is read, and counted while it streams), a missing field 422, content that is not
an image 415, a decompression bomb 413, a truncated or empty image 400. Images are
decoded by :func:`covid_ray.data.io.decode_grayscale` (Pillow, with its pixel limit).

Concurrency: the endpoints are plain functions, run in the server's thread pool.
ONNX Runtime sessions are safe to ``run`` from several threads at once; Grad-CAM
(torch backward passes with hooks) is serialized by a lock on models of its own.
Requests waiting for that lock hold pool threads, so at most ``--gradcam-queue``
Grad-CAM requests are admitted at a time; more get 503 with ``Retry-After`` rather
than starving plain predictions of threads.
The server binds 127.0.0.1 unless ``--host`` says otherwise: put an authenticating
reverse proxy in front before exposing it.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import sys
import threading
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, Query, UploadFile

from covid_ray.answer import answer_image
from covid_ray.data.io import MAX_PIXELS, BadImageError, decode_grayscale
from covid_ray.gradcam import GradCam, GradCamUnavailable, gradcam_for
from covid_ray.inference import LoadedModel, ModelLoadError, load_model
from covid_ray.web import add_web_routes

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_GRADCAM_QUEUE = 4
# Multipart boundaries and part headers around the files: a few hundred bytes in
# practice; the slack keeps an upload of exactly the limit acceptable.
MULTIPART_SLACK = 16 * 1024


def _status_for(exc: BadImageError) -> int:
    reason = exc.reason
    if reason.startswith("not an image"):
        return 415
    if reason.startswith("decompression bomb"):
        return 413
    return 400


def _decode(upload: UploadFile, field: str, max_pixels: int):
    data = upload.file.read()
    try:
        return decode_grayscale(data, name=upload.filename or "", max_pixels=max_pixels)
    except BadImageError as exc:
        raise HTTPException(_status_for(exc), detail=f"{field}: {exc.reason}") from None


def create_app(
    model: LoadedModel,
    *,
    cam: GradCam | None = None,
    cam_error: str | None = None,
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6),
    max_pixels: int = MAX_PIXELS,
    gradcam_queue: int = DEFAULT_GRADCAM_QUEUE,
) -> FastAPI:
    """The FastAPI app serving ``model``.

    Args:
        cam: Grad-CAM of the model (None: ``?gradcam=true`` answers with ``gradcam_error``).
        cam_error: why there is no Grad-CAM, reported by ``/model`` and ``/predict``.
        max_upload_bytes: limit on the uploaded files together (request body minus a
            small allowance for the multipart envelope).
        max_pixels: decoded images larger than this are refused (decompression bombs).
        gradcam_queue: Grad-CAM requests admitted at once (running or waiting for the lock).
    """
    cam_slots = threading.BoundedSemaphore(gradcam_queue)
    app = FastAPI(title="covid-ray", summary="Chest X-ray classification" +
                  (" (SYNTHETIC-data model)" if model.synthetic else ""))
    info = model.describe()
    info["gradcam"] = {"available": cam is not None, **({"reason": cam_error} if cam is None else {})}
    info["limits"] = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "gradcam_queue": gradcam_queue}
    add_web_routes(app, model, info)  # the page at /, its files, /model-card

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/model")
    def describe() -> dict:
        return info

    @contextlib.contextmanager
    def cam_slot():
        """A Grad-CAM admission, or 503: waiting for the lock would hold a pool thread."""
        if not cam_slots.acquire(blocking=False):
            raise HTTPException(503, detail=f"Grad-CAM busy ({gradcam_queue} requests in progress); retry later",
                                headers={"Retry-After": "1"})
        try:
            yield
        finally:
            cam_slots.release()

    def base64_overlay(png: bytes) -> dict:
        return {"gradcam_png": base64.b64encode(png).decode("ascii")}

    @app.post("/predict", max_body_size=max_upload_bytes + MULTIPART_SLACK)
    def predict(
        file: Annotated[UploadFile, File(description="the radiograph (PNG, JPEG, ...)")],
        mask: Annotated[UploadFile | None, File(description="optional lung mask, for the in-lung Grad-CAM share")] = None,
        gradcam: Annotated[bool, Query(description="add a base64 PNG Grad-CAM overlay")] = False,
    ) -> dict:
        decoded = _decode(file, "file", max_pixels)
        mask_array = _decode(mask, "mask", max_pixels).array if mask is not None else None
        try:
            return answer_image(model, decoded.array, image=file.filename or "upload", notes=decoded.notes,
                                explain=gradcam or mask_array is not None, cam=cam, cam_error=cam_error,
                                mask=mask_array, overlay=base64_overlay if gradcam else None, outline=True,
                                cam_slot=cam_slot)
        except BadImageError as exc:
            raise HTTPException(400, detail=f"file: {exc.reason}") from None

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covid_ray.serve", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--model", required=True, help="exported ensemble (.onnx or its folder) or a checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest accepted upload in MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"largest decoded image in pixels (default {MAX_PIXELS})")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per request (default: one per core)")
    p.add_argument("--no-gradcam", action="store_true", help="do not load the torch members for Grad-CAM")
    p.add_argument("--gradcam-queue", type=int, default=DEFAULT_GRADCAM_QUEUE,
                   help=f"Grad-CAM requests admitted at once; more get 503 (default {DEFAULT_GRADCAM_QUEUE})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        model = load_model(args.model, threads=args.threads)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cam, cam_error = None, "disabled with --no-gradcam"
    if not args.no_gradcam:
        try:
            cam, cam_error = gradcam_for(model), None
        except GradCamUnavailable as exc:
            cam_error = str(exc)
            logger.warning("serving without Grad-CAM: %s", exc)
    if model.synthetic:
        logger.warning("this model was trained on SYNTHETIC data: its outputs are not clinical evidence")
    app = create_app(model, cam=cam, cam_error=cam_error, max_upload_bytes=int(args.max_upload_mb * 1e6),
                     max_pixels=args.max_pixels, gradcam_queue=args.gradcam_queue)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
