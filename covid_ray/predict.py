"""``python -m covid_ray.predict IMAGE [IMAGE ...] --model PATH``: classify radiographs, one JSON line each.

``--model`` is an exported ensemble (``ensemble_int8.onnx`` / ``ensemble_fp32.onnx``
with ``preprocess.json`` beside it, or their folder) or one training checkpoint
(folder with ``model.pt``, or the file). Each image gets the eval preprocessing
recorded with the model (:mod:`covid_ray.inference`) and one line on stdout::

    {"image": "x.png", "class": "COVID", "probabilities": {"COVID": 0.91, ...},
     "model": ".../ensemble_int8.onnx", "synthetic": true,
     "in_distribution": true, "ood_score": 0.83, "ood_threshold": 1.42}

An ensemble exported with an OOD score abstains on images unlike its training
radiographs (a photo, a document, a digit): ``"in_distribution": false``,
``"class": null``, the probabilities still given, and ``abstain_reason`` in plain
words (:mod:`covid_ray.ood`). A model without a score (a single checkpoint, an older
export) gives ``"in_distribution": null``, ``"ood_score": null`` and ``ood_note``.

A file that cannot be read as an image prints ``{"image", "error"}`` on its line and
the others still print. ``--gradcam OUT_DIR`` writes a Grad-CAM overlay per image
(``<stem>.gradcam.png``) from the ensemble's torch members; with a lung mask
(``--mask``, or ``<class>/masks/<name>`` beside a Kaggle ``<class>/images/<name>``)
the overlay also draws the lungs' outline (magenta, as on the service's page) and
the line gives ``lung_cam_share``, the share of the map inside the lungs, and
``lung_area_share``, the share a uniform map would get.

Exit status: 0 when at least one image was classified, 1 when none could be read,
2 for a bad model path or arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from covid_ray.answer import answer_image
from covid_ray.data.io import BadImageError, read_grayscale
from covid_ray.gradcam import GradCam, GradCamUnavailable, find_kaggle_mask, gradcam_for, read_mask
from covid_ray.inference import LoadedModel, ModelLoadError, load_model


def _unique_png(out_dir: Path, image: Path, used: set[str]) -> Path:
    """``<stem>.gradcam.png``, numbered when two inputs share a stem in one run."""
    name, n = f"{image.stem}.gradcam.png", 1
    while name in used:
        name, n = f"{image.stem}-{n}.gradcam.png", n + 1
    used.add(name)
    return out_dir / name


def _mask(path: Path | None) -> tuple[dict, np.ndarray | None]:
    """(the row's ``mask`` fields, the mask or None): an unreadable mask is reported, not fatal."""
    if path is None:
        return {}, None
    try:
        return {"mask": str(path)}, read_mask(path)
    except BadImageError as exc:
        return {"mask": str(path), "mask_error": exc.reason}, None


def _overlay_writer(out_dir: Path, image: Path, used: set[str]):
    """What to do with an image's overlay PNG: write ``<stem>.gradcam.png``, report its path."""
    def write(png: bytes) -> dict:
        path = _unique_png(out_dir, image, used)
        path.write_bytes(png)
        return {"gradcam": str(path)}

    return write


def predict_files(
    model: LoadedModel,
    images: Sequence[str | Path],
    *,
    cam: GradCam | None = None,
    out_dir: Path | None = None,
    masks: Sequence[Path | None] | None = None,
) -> Iterator[dict]:
    """One result dict per image, in order (``{"image", "error"}`` for unreadable files).

    Args:
        cam: compute Grad-CAM (for the overlay in ``out_dir`` and the in-lung share).
        masks: a lung mask per image, None to look for a Kaggle mask beside each image.
    """
    used: set[str] = set()
    for i, image in enumerate(images):
        image = Path(image)
        try:
            decoded, _ = read_grayscale(image)
            mask_path = (masks[i] if masks is not None else find_kaggle_mask(image)) if cam is not None else None
            fields, mask = _mask(mask_path)
            row = answer_image(model, decoded.array, image=str(image), notes=decoded.notes, fields=fields,
                               explain=cam is not None, cam=cam, mask=mask, outline=True,
                               overlay=_overlay_writer(out_dir, image, used) if out_dir is not None else None)
        except BadImageError as exc:  # unreadable, or not an image the model can take
            row = {"image": str(image), "error": exc.reason}
        yield row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covid_ray.predict", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("images", nargs="+", metavar="IMAGE", help="radiograph files (PNG, JPEG, ...)")
    p.add_argument("--model", required=True, help="exported ensemble (.onnx or its folder) or a checkpoint")
    p.add_argument("--gradcam", metavar="OUT_DIR", default=None, help="write a Grad-CAM overlay PNG per image here")
    p.add_argument("--mask", action="append", type=Path, default=None, metavar="MASK.png",
                   help="lung mask for the in-lung Grad-CAM share; once per image, in order "
                        "(default: the Kaggle masks/ file beside each image, when there is one)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: one per core)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.mask is not None and len(args.mask) != len(args.images):
        parser.error(f"--mask given {len(args.mask)} times for {len(args.images)} images: give one per image")
    try:
        model = load_model(args.model, threads=args.threads)
        # A mask asks for the in-lung share, which needs the map even without an overlay.
        cam = gradcam_for(model) if args.gradcam or args.mask else None
    except (ModelLoadError, GradCamUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.gradcam) if args.gradcam else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    ok = 0
    for row in predict_files(model, args.images, cam=cam, out_dir=out_dir, masks=args.mask):
        ok += "error" not in row
        print(json.dumps(row), flush=True)
    if model.synthetic:
        print("note: this model was trained on SYNTHETIC data; its outputs are not clinical evidence",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
