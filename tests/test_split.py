"""The split: per-class shares, determinism, duplicate grouping, label conflicts."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from covid_ray.data.prepare import split_dataset
from covid_ray.data.scan import scan_dataset
from covid_ray.data.split import (
    assign_splits,
    near_duplicate_pairs,
    parse_ratios,
    read_manifest,
    split_targets,
)
from helpers import make_kaggle

COUNTS = {"COVID": 37, "Lung_Opacity": 23, "Normal": 51, "Viral Pneumonia": 9}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    return make_kaggle(tmp_path_factory.mktemp("kaggle"), COUNTS)


def test_split_targets_within_one_of_exact():
    for n in range(0, 60):
        sizes = split_targets(n, (0.7, 0.1, 0.2))
        assert sum(sizes) == n
        assert all(abs(s - n * r) < 1 for s, r in zip(sizes, (0.7, 0.1, 0.2)))


def test_per_class_shares_within_one_image(kaggle, tmp_path):
    res = split_dataset(kaggle, tmp_path / "split.csv", workers=1)
    df = pd.read_csv(tmp_path / "split.csv", keep_default_na=False)
    assert list(df.columns[:5]) == ["path", "label", "split", "mask", "sha1"]
    for label, n in COUNTS.items():
        got = df[df.label == label].split.value_counts()
        for split, ratio in zip(("train", "val", "test"), (0.7, 0.1, 0.2)):
            assert abs(got.get(split, 0) - n * ratio) < 1, (label, split, got.get(split, 0))
    assert res.report["counts"]["Viral Pneumonia"] == {"train": 6, "val": 1, "test": 2}
    # paths are relative to the dataset root, as found on disk; masks too
    assert (kaggle / df.path[0]).is_file() and (kaggle / df["mask"][0]).is_file()


def test_same_seed_is_byte_identical_other_seed_differs(kaggle, tmp_path):
    split_dataset(kaggle, tmp_path / "a.csv", seed=42, workers=1)
    split_dataset(kaggle, tmp_path / "b.csv", seed=42, workers=1)
    split_dataset(kaggle, tmp_path / "c.csv", seed=7, workers=1)
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.csv", "b.csv", "c.csv"))
    assert a == b
    assert a != c


def test_custom_ratios_and_bad_ratios(kaggle, tmp_path):
    split_dataset(kaggle, tmp_path / "s.csv", ratios=(0.5, 0.25, 0.25), workers=1)
    df = read_manifest(tmp_path / "s.csv")
    assert (df.split == "train").sum() == pytest.approx(len(df) / 2, abs=4)
    for bad in ("0.7,0.1", "0.5,0.5,0.5", "a,b,c", "-0.1,0.6,0.5"):
        with pytest.raises(ValueError, match="--ratios"):
            parse_ratios(bad)


def _near_copy(arr: np.ndarray) -> bytes:
    """Brightened, resized and JPEG re-encoded: a near-duplicate with new bytes."""
    side = int(arr.shape[0] * 1.1)
    im = ImageEnhance.Brightness(Image.fromarray(arr)).enhance(1.05).resize((side, side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def test_exact_and_near_duplicates_never_straddle_splits(tmp_path):
    root = make_kaggle(tmp_path, {"COVID": 30, "Normal": 30}, size=96, radiographs=True)
    # five exact copies and five near copies of COVID-1..COVID-10, inside the COVID class
    for i in range(1, 6):
        (root / "COVID" / "images" / f"dup-{i}.png").write_bytes((root / "COVID/images" / f"COVID-{i}.png").read_bytes())
    for i in range(6, 11):
        src = np.asarray(Image.open(root / "COVID" / "images" / f"COVID-{i}.png"))
        (root / "COVID" / "images" / f"near-{i}.png").write_bytes(_near_copy(src))
    res = split_dataset(root, tmp_path / "out" / "s.csv", workers=1)
    df = read_manifest(tmp_path / "out" / "s.csv")
    assert res.report["grouping"]["duplicate_groups"] == 10
    assert res.report["grouping"]["exact_duplicate_files"] == 10
    for i in range(1, 6):
        pair = df[df.path.isin([f"COVID/images/COVID-{i}.png", f"COVID/images/dup-{i}.png"])]
        assert pair.group.nunique() == 1 and pair.split.nunique() == 1
    for i in range(6, 11):
        pair = df[df.path.isin([f"COVID/images/COVID-{i}.png", f"COVID/images/near-{i}.png"])]
        assert pair.group.nunique() == 1 and pair.split.nunique() == 1
    assert (df.groupby("group").split.nunique() == 1).all()


def test_large_group_goes_whole_and_others_fill_around_it():
    labels = ["A"] * 20
    groups = [0] * 6 + list(range(1, 15))  # one group of 6, 14 singletons
    out = assign_splits(labels, groups, (0.7, 0.1, 0.2), seed=0)
    assert len({out[i] for i in range(6)}) == 1
    assert [out.count(s) for s in ("train", "val", "test")] == [14, 2, 4]


def test_label_conflicts_are_excluded_and_reported(tmp_path):
    root = make_kaggle(tmp_path, {"COVID": 5, "Normal": 5})
    same = (root / "COVID" / "images" / "COVID-1.png").read_bytes()
    (root / "Normal" / "images" / "Normal-x.png").write_bytes(same)
    scan = scan_dataset(root, workers=1)
    paths = {r.path for r in scan.records}
    assert "COVID/images/COVID-1.png" not in paths and "Normal/images/Normal-x.png" not in paths
    conflicts = {e["path"]: e["reason"] for e in scan.excluded}
    assert conflicts["COVID/images/COVID-1.png"] == (
        "label conflict: identical content in another class (Normal/images/Normal-x.png)"
    )
    assert "label conflict" in conflicts["Normal/images/Normal-x.png"]


def test_near_duplicate_pairs_counts_bits():
    a = "ff" * 32
    b = "fe" + "ff" * 31  # 1 bit apart
    c = "00" * 32  # 256 bits apart
    assert near_duplicate_pairs([a, b, c], max_bits=1) == [(0, 1)]
    assert near_duplicate_pairs([a, b, c], max_bits=0) == []


def test_no_over_grouping_on_a_homogeneous_class(tmp_path):
    """Distinct radiographs of one class share their layout; none may be grouped."""
    root = make_kaggle(tmp_path, {"Normal": 150, "COVID": 10}, size=128, radiographs=True)
    res = split_dataset(root, tmp_path / "out" / "s.csv", workers=1)
    assert res.report["grouping"]["duplicate_groups"] == 0
    df = read_manifest(tmp_path / "out" / "s.csv")
    assert df.group.nunique() == len(df) == 160
