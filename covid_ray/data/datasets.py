"""Torch datasets over the decode cache: whole uint8 batches, no per-image work.

A :class:`CachedImageDataset` yields ``(images uint8 (B, 1, R, R), labels, indices)``
batches by fancy-indexing the memory-mapped store (``__getitems__``), so a DataLoader
does one copy per batch. The indices let distributed evaluation drop the padding that
``DistributedSampler`` adds and gather every validation image exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from covid_ray.data.cache import ImageStore, build_cache
from covid_ray.data.split import SPLITS


class CachedImageDataset(Dataset):
    """Rows of an :class:`ImageStore` with integer labels.

    The memory map is opened lazily in each process, so the dataset pickles small
    (to DataLoader workers and Ray workers) instead of copying the array.
    """

    def __init__(self, store_path: str | Path, rows: np.ndarray, labels: np.ndarray):
        if len(rows) != len(labels):
            raise ValueError("rows and labels differ in length")
        self.store_path = str(store_path)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = torch.tensor(np.asarray(labels, dtype=np.int64))
        self._array: np.ndarray | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"] = None
        return state

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.store_path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        images, labels, index = self.__getitems__([i])
        return images[0], labels[0], index[0]

    def __getitems__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self.array[self.rows[idx]])).unsqueeze(1)
        return images, self.labels[idx], torch.from_numpy(idx)


def collate_batch(batch):
    """Batches come out of ``__getitems__`` already stacked."""
    return batch


@dataclass
class SplitData:
    """The three splits of a manifest over one cache store, with the class order."""

    classes: list[str]
    datasets: dict[str, CachedImageDataset]
    store: ImageStore
    frames: dict[str, pd.DataFrame]


def load_splits(
    root: str | Path,
    manifest: pd.DataFrame,
    classes: list[str],
    resize: int,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
) -> SplitData:
    """Build (or reuse) the cache for ``manifest`` and one dataset per split.

    Raises:
        ValueError: the manifest has labels outside ``classes``.
    """
    unknown = sorted(set(manifest["label"]) - set(classes))
    if unknown:
        raise ValueError(f"manifest labels {unknown} are not among the classes {classes}")
    store = build_cache(root, manifest, resize, cache_dir=cache_dir, workers=workers)
    lookup = {c: i for i, c in enumerate(classes)}
    datasets, frames = {}, {}
    for split in SPLITS:
        frame = manifest[manifest["split"] == split].reset_index(drop=True)
        rows = store.rows(frame["sha1"])
        labels = frame["label"].map(lookup).to_numpy(dtype=np.int64)
        datasets[split] = CachedImageDataset(store.path, rows, labels)
        frames[split] = frame
    return SplitData(classes, datasets, store, frames)


def make_loader(
    dataset: CachedImageDataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(uint8 images, labels, indices)`` batches."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_batch,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
