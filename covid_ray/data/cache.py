"""Decode-once store of uint8 images at the working resolution.

Decoding and resizing a 299x299 PNG costs milliseconds; an epoch over the database
does it 21k times, and a search runs hundreds of epochs. So each image is decoded
once per working resolution into one ``.npy`` array (N, R, R) that every trial and
every run memory-maps; augmentation then runs on whole batches of tensors.

The store is keyed by the sorted content hashes (sha1 of the file bytes) of its
images and by the resolution, so a re-split of the same files reuses it and a changed
file cannot be served stale. Builders take a file lock and publish with atomic
renames, so two processes (two trials, two DDP workers on one node) asking for the
same store at once decode it once; readers never see a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from covid_ray.data.io import BadImageError, read_grayscale, resize_square
from covid_ray.progress import map_in_chunks, progress_bar

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$COVID_RAY_CACHE``, else ``~/.cache/covid_ray``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("COVID_RAY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "covid_ray"


def cache_key(sha1s: list[str], resize: int) -> str:
    h = hashlib.sha1(f"v{FORMAT_VERSION}:{resize}:".encode())
    for s in sorted(set(sha1s)):
        h.update(s.encode())
    return h.hexdigest()[:20]


@dataclass
class ImageStore:
    """A memory-mapped (N, R, R) uint8 array and its sha1 -> row index."""

    path: Path
    array: np.ndarray
    index: dict[str, int]
    resize: int
    built: bool  # True when this call decoded the images, False when it reused them

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, sha1s) -> np.ndarray:
        """Row numbers for a sequence of sha1s (raises KeyError naming a missing one)."""
        try:
            return np.fromiter((self.index[s] for s in sha1s), dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"image {exc.args[0]} is not in cache {self.path}") from None


def _decode_resized(args: tuple[str, str, int]) -> np.ndarray:
    path, sha1, resize = args
    try:
        decoded, actual = read_grayscale(path)
    except BadImageError as exc:
        raise ValueError(f"{path}: {exc.reason}") from None
    if actual != sha1:
        raise ValueError(f"{path} changed since the split was made (sha1 {actual} != {sha1}); make the split again")
    return resize_square(decoded.array, resize)


def _open(npy: Path, meta: Path, resize: int, built: bool) -> ImageStore:
    info = json.loads(meta.read_text())
    array = np.load(npy, mmap_mode="r")
    index = {s: i for i, s in enumerate(info["sha1"])}
    return ImageStore(npy, array, index, resize, built)


def build_cache(
    root: str | Path,
    manifest: pd.DataFrame,
    resize: int,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> ImageStore:
    """Return the store for ``manifest``'s images at ``resize`` x ``resize``, building it if needed.

    Args:
        root: dataset root the manifest's paths are relative to.
        manifest: needs ``path`` and ``sha1`` columns.
        resize: working resolution (the Resize before the crop: 256 for 224-px models).
        cache_dir: where stores live (see :func:`cache_root`).
        workers: decoding processes for a build (default: CPU count).
        progress: show a build's progress on stderr (see :mod:`covid_ray.progress`).
    """
    root = Path(root)
    first = manifest.drop_duplicates("sha1").sort_values("sha1")
    sha1s = first["sha1"].tolist()
    key = cache_key(sha1s, resize)
    folder = cache_root(cache_dir) / f"r{resize}"
    folder.mkdir(parents=True, exist_ok=True)
    npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
    if meta.is_file():
        return _open(npy, meta, resize, built=False)
    with FileLock(str(folder / f"{key}.lock")):
        if meta.is_file():  # another process built it while we waited
            return _open(npy, meta, resize, built=False)
        logger.info("decoding %d images at %dpx into %s", len(sha1s), resize, npy)
        tmp = folder / f"{key}.{os.getpid()}.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(sha1s), resize, resize))
        jobs = [(str(root / p), s, resize) for p, s in zip(first["path"], sha1s)]
        workers = workers or os.cpu_count() or 1
        with progress_bar(len(jobs), f"decode cache {resize}px", unit="img", enabled=progress) as bar:
            if workers > 1 and len(jobs) >= 256:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    for start, arrays in map_in_chunks(pool, _decode_resized, jobs, 64):
                        out[start : start + len(arrays)] = np.stack(arrays)
                        bar.update(len(arrays))
            else:
                for i, job in enumerate(jobs):
                    out[i] = _decode_resized(job)
                    bar.update(1)
        out.flush()
        del out
        os.replace(tmp, npy)
        # The index is written last: its presence is what marks the store complete.
        tmp_meta = meta.with_suffix(f".{os.getpid()}.tmp")
        tmp_meta.write_text(json.dumps({"version": FORMAT_VERSION, "resize": resize, "sha1": sha1s}))
        os.replace(tmp_meta, meta)
        return _open(npy, meta, resize, built=True)
