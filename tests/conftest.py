"""Shared fixtures: tiny synthetic datasets and an isolated cache folder."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for every test: tiny models gain nothing from more, and on a
    loaded 2-core machine a 2-thread OpenMP region waits for a descheduled thread (one
    step took 19 s instead of 0.3 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/covid_ray from tests."""
    monkeypatch.setenv("COVID_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def make_easy_dataset(root: Path, per_class: int = 40, size: int = 64) -> Path:
    """Two classes a small network separates in a few epochs: a bright blob or not.

    Kaggle layout, class names from the real database (order: COVID, Normal).
    """
    import numpy as np

    from helpers import smooth_image, write_png

    rng = np.random.default_rng(0)
    for k, label in enumerate(["COVID", "Normal"]):
        for i in range(per_class):
            img = (smooth_image(1000 * k + i, size) // 2).astype(np.int32)
            if label == "COVID":
                cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                yy, xx = np.ogrid[:size, :size]
                img += (110 * ((yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2)).astype(np.int32)
            write_png(root / label / "images" / f"{label}-{i + 1}.png", np.clip(img, 0, 255).astype(np.uint8))
            mask = np.zeros((size, size), np.uint8)
            mask[8:-8, 8:-8] = 255
            write_png(root / label / "masks" / f"{label}-{i + 1}.png", mask)
    return root


@pytest.fixture(scope="session")
def easy_split(tmp_path_factory):
    """(dataset root, split manifest) of the easy two-class dataset."""
    from covid_ray.data.prepare import split_dataset

    base = tmp_path_factory.mktemp("easy")
    root = make_easy_dataset(base / "ds", per_class=80)
    split_dataset(root, base / "split.csv", workers=1)
    return root, base / "split.csv"


@pytest.fixture(scope="module")
def ray_session():
    """One embedded Ray per test module (starting it costs seconds).

    Module-scoped, not session-scoped, and each module runs its subprocess tests
    (which start their own Ray) before the tests that use this fixture: with two Ray
    instances on one machine, Ray Train's placement-group cleaner cannot tell which
    cluster it belongs to, finished trials keep their CPUs and the next trial's
    worker group times out.
    """
    import ray

    from covid_ray.ray_setup import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
