"""Find the images, masks and bad files of a dataset folder.

Two layouts are accepted:

* the Kaggle COVID-19 Radiography Database: ``ROOT/<class>/images/*.png`` with lung
  masks of the same file name in ``ROOT/<class>/masks/``, plus metadata files at the
  root (``*.metadata.xlsx``, ``README.md.txt``), which are not classes;
* a plain ImageFolder: ``ROOT/<class>/*.png|jpg|jpeg``.

``ROOT`` may also be the folder the Kaggle archive was unpacked into, holding
``COVID-19_Radiography_Dataset/``. Every file is decoded once: unreadable files are
excluded with a reason, readable odd ones are kept and their conversion noted, and
both lists end up in ``data_report.json``.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import imagehash
from PIL import Image

from covid_ray.data.io import BadImageError, read_grayscale
from covid_ray.data.layout import IMAGE_SUFFIXES, KAGGLE_CLASSES, KAGGLE_DIRNAME, SYNTHETIC_MARKER
from covid_ray.progress import Progress, map_in_chunks, progress_bar

logger = logging.getLogger(__name__)

# 16x16 DCT hash (256 bits): finer than the usual 8x8, so distinct radiographs of a
# homogeneous class (which share their low-frequency layout) stay apart.
PHASH_SIZE = 16


@dataclass
class ImageRecord:
    """One usable image. Paths are POSIX, relative to the dataset root."""

    path: str
    label: str
    mask: str
    sha1: str
    phash: str
    width: int
    height: int


@dataclass
class ScanResult:
    root: Path
    layout: str  # "kaggle" | "imagefolder"
    classes: list[str]
    records: list[ImageRecord]
    excluded: list[dict] = field(default_factory=list)  # {"path", "reason"}: not used
    odd: list[dict] = field(default_factory=list)  # {"path", "reason"}: used, but noteworthy
    synthetic: bool = False

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for r in self.records:
            out[r.label] += 1
        return out


class DatasetNotFoundError(FileNotFoundError):
    pass


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def find_dataset_root(data_dir: str | Path) -> Path:
    """Return the folder that holds the class folders (descends into the Kaggle dir)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset folder not found: {root}")
    nested = root / KAGGLE_DIRNAME
    if nested.is_dir():
        return nested
    return root


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p))


def detect_layout(root: Path) -> str:
    """``kaggle`` when any class folder has an ``images/`` subfolder, else ``imagefolder``."""
    return "kaggle" if any((d / "images").is_dir() for d in _class_dirs(root)) else "imagefolder"


def order_classes(names: list[str]) -> list[str]:
    """Kaggle order when the four Kaggle classes are present, else sorted."""
    if set(names) == set(KAGGLE_CLASSES):
        return list(KAGGLE_CLASSES)
    return sorted(names)


def _list_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not _is_hidden(p))


def _inspect_image(root: str, rel: str) -> dict:
    """Decode one image; runs in a worker process. Returns plain data for pickling."""
    try:
        decoded, sha1 = read_grayscale(Path(root) / rel)
    except BadImageError as exc:
        return {"path": rel, "error": exc.reason}
    arr = decoded.array
    phash = str(imagehash.phash(Image.fromarray(arr), hash_size=PHASH_SIZE))
    return {
        "path": rel,
        "sha1": sha1,
        "phash": phash,
        "height": int(arr.shape[0]),
        "width": int(arr.shape[1]),
        "notes": decoded.notes,
    }


def _inspect_mask(root: str, rel: str) -> dict:
    try:
        decoded, _ = read_grayscale(Path(root) / rel)
    except BadImageError as exc:
        return {"path": rel, "error": exc.reason}
    return {"path": rel, "notes": decoded.notes}


def _map(fn, root: Path, rels: list[str], workers: int, bar: Progress) -> list[dict]:
    if workers <= 1 or len(rels) < 64:
        out = []
        for r in rels:
            out.append(fn(str(root), r))
            bar.update(1)
        return out
    # At most 256 files a chunk, so the bar moves every second or so even with two
    # workers on the full database; a chunk still amortizes its pickling over many decodes.
    chunk = max(16, min(256, len(rels) // (workers * 8)))
    results: list[dict] = [{}] * len(rels)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for start, part in map_in_chunks(pool, partial(fn, str(root)), rels, chunk):
            results[start : start + len(part)] = part
            bar.update(len(part))
    return results


def scan_dataset(data_dir: str | Path, *, workers: int | None = None, progress: bool = False) -> ScanResult:
    """Scan a dataset folder and decode every image and mask once.

    Args:
        data_dir: the dataset root (class folders) or the folder holding the Kaggle dir.
        workers: decoding processes (default: the CPU count).
        progress: show progress on stderr (see :mod:`covid_ray.progress`).

    Raises:
        DatasetNotFoundError: the folder does not exist or holds no class folders.
    """
    root = find_dataset_root(data_dir)
    workers = workers or os.cpu_count() or 1
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise DatasetNotFoundError(
            f"no class folders in {root}: expected the Kaggle layout "
            f"(<class>/images/*.png) or an ImageFolder (<class>/*.png|jpg)"
        )
    layout = detect_layout(root)
    result = ScanResult(root=root, layout=layout, classes=[], records=[])
    result.synthetic = (root / SYNTHETIC_MARKER).is_file()

    image_rels: list[tuple[str, str]] = []  # (rel path, label)
    mask_for: dict[str, str] = {}
    for cdir in class_dirs:
        label = cdir.name
        if layout == "kaggle":
            if not (cdir / "images").is_dir():
                logger.warning("ignoring %s: no images/ folder in a Kaggle layout", cdir.name)
                continue
            images = _list_files(cdir / "images")
            masks = {p.name: p for p in _list_files(cdir / "masks")}
            image_names = {p.name for p in images}
            for name in sorted(set(masks) - image_names):
                result.odd.append(
                    {"path": masks[name].relative_to(root).as_posix(), "reason": "mask without an image (ignored)"}
                )
        else:
            images = _list_files(cdir)
            masks = {}
        kept = 0
        for p in images:
            rel = p.relative_to(root).as_posix()
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                result.excluded.append({"path": rel, "reason": f"not an image file name ({p.suffix or 'no suffix'})"})
                continue
            image_rels.append((rel, label))
            kept += 1
            if p.name in masks:
                mask_for[rel] = masks[p.name].relative_to(root).as_posix()
            elif layout == "kaggle":
                result.odd.append({"path": rel, "reason": "image without a lung mask (kept)"})
        if kept:
            result.classes.append(label)
        else:
            logger.warning("class folder %s holds no image files", cdir.name)
    result.classes = order_classes(result.classes)

    logger.info("decoding %d images and %d masks in %s", len(image_rels), len(mask_for), root)
    with progress_bar(len(image_rels) + len(mask_for), "scan", unit="file", enabled=progress) as bar:
        infos = _map(_inspect_image, root, [r for r, _ in image_rels], workers, bar)
        mask_infos = {m["path"]: m for m in _map(_inspect_mask, root, sorted(mask_for.values()), workers, bar)}

    for (rel, label), info in zip(image_rels, infos):
        if "error" in info:
            result.excluded.append({"path": rel, "reason": info["error"]})
            continue
        for note in info["notes"]:
            result.odd.append({"path": rel, "reason": f"{note} (kept)"})
        mask = mask_for.get(rel, "")
        if mask:
            minfo = mask_infos[mask]
            if "error" in minfo:
                result.odd.append({"path": mask, "reason": f"mask unusable, image kept without it: {minfo['error']}"})
                mask = ""
        result.records.append(
            ImageRecord(rel, label, mask, info["sha1"], info["phash"], info["width"], info["height"])
        )
    _exclude_label_conflicts(result)
    result.classes = [c for c in result.classes if any(r.label == c for r in result.records)]
    return result


def _exclude_label_conflicts(result: ScanResult) -> None:
    """Identical bytes under two classes cannot both be right: drop every copy."""
    labels_by_sha: dict[str, set[str]] = defaultdict(set)
    paths_by_sha: dict[str, list[str]] = defaultdict(list)
    for r in result.records:
        labels_by_sha[r.sha1].add(r.label)
        paths_by_sha[r.sha1].append(r.path)
    conflicts = {s for s, labels in labels_by_sha.items() if len(labels) > 1}
    if not conflicts:
        return
    keep = []
    for r in result.records:
        if r.sha1 in conflicts:
            others = [p for p in paths_by_sha[r.sha1] if p != r.path]
            result.excluded.append(
                {"path": r.path, "reason": f"label conflict: identical content in another class ({', '.join(others)})"}
            )
        else:
            keep.append(r)
    result.records = keep
