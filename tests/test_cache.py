"""Decode-once cache: contents, reuse across runs, concurrent builders, stale files."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from covid_ray.data import cache as cache_mod
from covid_ray.data.cache import build_cache
from covid_ray.data.datasets import load_splits, make_loader
from covid_ray.data.io import resize_square
from covid_ray.data.prepare import split_dataset
from covid_ray.data.split import read_manifest
from helpers import make_kaggle

CLASSES = ["COVID", "Normal"]


@pytest.fixture
def split(tmp_path):
    root = make_kaggle(tmp_path / "ds", {"COVID": 8, "Normal": 12}, size=80)
    split_dataset(root, tmp_path / "s.csv", workers=1)
    return root, read_manifest(tmp_path / "s.csv")


def test_store_holds_resized_images_by_sha1(split, tmp_path):
    root, df = split
    store = build_cache(root, df, 48, cache_dir=tmp_path / "c")
    assert store.built and store.array.shape == (20, 48, 48) and store.array.dtype == np.uint8
    row = df.iloc[3]
    expected = resize_square(np.asarray(Image.open(root / row.path).convert("L")), 48)
    np.testing.assert_array_equal(store.array[store.index[row.sha1]], expected)


def test_reused_without_decoding(split, tmp_path, monkeypatch):
    root, df = split
    first = build_cache(root, df, 48, cache_dir=tmp_path / "c")

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "_decode_resized", boom)
    again = build_cache(root, df.sample(frac=1.0, random_state=1), 48, cache_dir=tmp_path / "c")
    assert not again.built and again.path == first.path
    other_size = pytest.raises(AssertionError, build_cache, root, df, 40, cache_dir=tmp_path / "c")
    assert "decoded again" in str(other_size.value)  # another resolution is another store


def test_changed_file_is_refused_by_name(split, tmp_path):
    root, df = split
    victim = root / df.path[0]
    Image.fromarray(np.zeros((80, 80), np.uint8)).save(victim)
    with pytest.raises(ValueError, match=r"changed since the split was made"):
        build_cache(root, df, 48, cache_dir=tmp_path / "c2")
    assert not list((tmp_path / "c2" / "r48").glob("*.json"))  # nothing half-written published


def test_two_concurrent_builders_decode_once(split, tmp_path):
    root, df = split
    code = textwrap.dedent(
        f"""
        import json, sys
        from covid_ray.data.cache import build_cache
        from covid_ray.data.split import read_manifest
        s = build_cache({str(root)!r}, read_manifest({str(tmp_path / 's.csv')!r}), 40, cache_dir={str(tmp_path / 'cc')!r}, workers=1)
        print(json.dumps({{"built": s.built, "sum": int(s.array.sum()), "path": str(s.path)}}))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(o["built"] for o in outs) == [False, True]
    assert outs[0]["sum"] == outs[1]["sum"] and outs[0]["path"] == outs[1]["path"]
    assert not list((tmp_path / "cc" / "r40").glob("*.tmp*"))


def test_datasets_yield_uint8_batches_with_indices(split, tmp_path):
    root, df = split
    data = load_splits(root, df, CLASSES, 48, cache_dir=tmp_path / "c")
    train = data.datasets["train"]
    assert len(train) == (df.split == "train").sum()
    loader = make_loader(train, batch_size=4, shuffle=True, seed=0)
    images, labels, index = next(iter(loader))
    assert images.shape == (4, 1, 48, 48) and images.dtype.is_floating_point is False
    assert labels.tolist() == train.labels[index].tolist()
    expected_label = CLASSES.index(data.frames["train"].label[int(index[0])])
    assert int(labels[0]) == expected_label
    with pytest.raises(ValueError, match="not among the classes"):
        load_splits(root, df, ["COVID"], 48, cache_dir=tmp_path / "c")
