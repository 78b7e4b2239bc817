"""Synthetic dataset: Kaggle layout, formats, determinism, refusal, class signal, pHash spread."""
from __future__ import annotations

import io
import json
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from covid_ray.data.layout import KAGGLE_CLASSES, KAGGLE_COUNTS, SYNTHETIC_MARKER
from covid_ray.data.synth import (
    PARTIAL_MARKER,
    class_counts,
    render_radiograph,
    synthesize,
)


def _pngs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Three images per class at the Kaggle sizes (299 images, 256 masks)."""
    out = tmp_path_factory.mktemp("synth") / "ds"
    assert synthesize(out, per_class=3, workers=1) == {c: 3 for c in KAGGLE_CLASSES}
    return out


# --------------------------------------------------------------------------- counts


def test_class_counts():
    assert class_counts(per_class=5) == {c: 5 for c in KAGGLE_CLASSES}
    assert class_counts() == KAGGLE_COUNTS
    assert class_counts(scale=0.01) == {"COVID": 36, "Lung_Opacity": 60, "Normal": 102, "Viral Pneumonia": 13}
    assert list(class_counts(scale=0.01)) == list(KAGGLE_CLASSES)
    assert class_counts(scale=1e-6) == {c: 1 for c in KAGGLE_CLASSES}  # never an empty class
    with pytest.raises(ValueError, match="not both"):
        class_counts(per_class=3, scale=0.1)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="per_class"):
            class_counts(per_class=bad)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            class_counts(scale=bad)


# --------------------------------------------------------------------------- layout


def test_layout_matches_kaggle(dataset):
    expected_root = {SYNTHETIC_MARKER, "README.md.txt"}
    for c in KAGGLE_CLASSES:
        expected_root |= {c, f"{c}.metadata.xlsx"}
    assert {p.name for p in dataset.iterdir()} == expected_root
    assert (dataset / "Viral Pneumonia" / "images" / "Viral Pneumonia-1.png").is_file()  # the space, as in Kaggle
    for c in KAGGLE_CLASSES:
        names = [f"{c}-{i}.png" for i in (1, 2, 3)]
        assert sorted(p.name for p in (dataset / c / "images").iterdir()) == names
        assert sorted(p.name for p in (dataset / c / "masks").iterdir()) == names
        assert {p.name for p in (dataset / c).iterdir()} == {"images", "masks"}


def test_metadata_readme_and_marker(dataset):
    pd = pytest.importorskip("pandas")
    for c in KAGGLE_CLASSES:
        df = pd.read_excel(dataset / f"{c}.metadata.xlsx")
        assert list(df.columns) == ["FILE NAME", "FORMAT", "SIZE", "URL"]
        assert df["FILE NAME"].tolist() == [f"{c}-{i}" for i in (1, 2, 3)]
        assert set(df["FORMAT"]) == {"PNG"} and set(df["SIZE"]) == {"299*299"}
        assert df["URL"].str.contains("synthetic").all()
    readme = (dataset / "README.md.txt").read_text()
    assert "SYNTHETIC" in readme and "covid-ray" in readme and "Seed: 0" in readme
    assert "says anything about real radiographs" in readme
    params = json.loads((dataset / SYNTHETIC_MARKER).read_text())
    assert params["seed"] == 0 and params["size"] == 299 and params["mask_size"] == 256
    assert params["counts"] == {c: 3 for c in KAGGLE_CLASSES}
    assert isinstance(params["version"], int)
    assert not (dataset / PARTIAL_MARKER).exists()


def test_image_and_mask_formats(dataset):
    for c in KAGGLE_CLASSES:
        for i in (1, 2, 3):
            img = Image.open(dataset / c / "images" / f"{c}-{i}.png")
            mask = Image.open(dataset / c / "masks" / f"{c}-{i}.png")
            assert (img.mode, img.size) == ("L", (299, 299))
            assert (mask.mode, mask.size) == ("L", (256, 256))
            m = np.asarray(mask)
            assert set(np.unique(m)) == {0, 255}
            assert 0.10 < (m > 0).mean() < 0.45  # two lung fields, as in the Kaggle masks
            # both lungs: the mask has pixels on each side of the midline
            assert m[:, :128].any() and m[:, 128:].any()
            a = np.asarray(img)
            assert a.std() > 20  # a radiograph, not a flat image


def test_mask_outlines_the_dark_lungs():
    """Lungs are air: darker than the body around them, and the mask is where they are."""
    img, mask = render_radiograph("Normal", np.random.default_rng([1, 2]), 299)
    assert img.dtype == mask.dtype == np.uint8 and img.shape == mask.shape == (299, 299)
    lung = mask > 0
    ring = np.zeros_like(lung)
    ring[:, 20:-20] = True
    assert img[lung].mean() + 15 < img[~lung & ring].mean()


# ---------------------------------------------------------------------- determinism


def test_rerun_with_same_parameters_is_a_noop(dataset):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert synthesize(dataset, per_class=3, workers=1) == {c: 3 for c in KAGGLE_CLASSES}
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


def test_same_seed_same_bytes_regardless_of_workers(tmp_path, dataset):
    synthesize(tmp_path / "a", per_class=3, workers=2)
    assert _pngs(tmp_path / "a") == _pngs(dataset)  # the fixture used workers=1
    synthesize(tmp_path / "b", per_class=3, size=96, mask_size=64, workers=1)
    synthesize(tmp_path / "c", per_class=3, size=96, mask_size=64, workers=2)
    assert _pngs(tmp_path / "b") == _pngs(tmp_path / "c")


def test_different_seed_different_images(tmp_path):
    synthesize(tmp_path / "a", per_class=2, size=64, mask_size=64, seed=0, workers=1)
    synthesize(tmp_path / "b", per_class=2, size=64, mask_size=64, seed=1, workers=1)
    a, b = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if "/images/" in k)


# ------------------------------------------------------------------------- refusing


def test_refuses_a_non_empty_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape(str(out))):
        synthesize(out, per_class=1, size=64)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    (out / "nothing.txt").touch()
    with pytest.raises(ValueError, match="not empty"):
        synthesize(out, per_class=1, size=64)


def test_regenerates_a_synthetic_dataset_with_new_parameters(tmp_path):
    out = tmp_path / "ds"
    synthesize(out, per_class=2, size=64, workers=1)
    assert synthesize(out, per_class=1, size=64, workers=1) == {c: 1 for c in KAGGLE_CLASSES}
    assert sorted(p.name for p in (out / "COVID" / "images").iterdir()) == ["COVID-1.png"]  # no stale files
    assert json.loads((out / SYNTHETIC_MARKER).read_text())["counts"]["COVID"] == 1
    # ...but not when someone else's files live there too
    (out / "my_notes.txt").write_text("x")
    with pytest.raises(ValueError, match="my_notes.txt"):
        synthesize(out, per_class=2, size=64, workers=1)
    assert (out / "COVID" / "images" / "COVID-1.png").is_file()


def test_finishes_an_interrupted_run(tmp_path):
    out = tmp_path / "ds"
    (out / "COVID" / "images").mkdir(parents=True)
    (out / "COVID" / "images" / "COVID-9.png").write_bytes(b"half written")
    (out / PARTIAL_MARKER).write_text("{}")
    assert synthesize(out, per_class=1, size=64, workers=1) == {c: 1 for c in KAGGLE_CLASSES}
    assert not (out / "COVID" / "images" / "COVID-9.png").exists()
    assert (out / SYNTHETIC_MARKER).is_file() and not (out / PARTIAL_MARKER).exists()


def test_rebuilds_a_dataset_with_missing_files(tmp_path):
    out = tmp_path / "ds"
    synthesize(out, per_class=2, size=64, workers=1)
    reference = _pngs(out)
    (out / "Normal" / "images" / "Normal-2.png").unlink()
    assert synthesize(out, per_class=2, size=64, workers=1) == {c: 2 for c in KAGGLE_CLASSES}
    assert _pngs(out) == reference


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown class"):
        render_radiograph("Pneumothorax", np.random.default_rng(0))
    with pytest.raises(ValueError, match="size"):
        render_radiograph("Normal", np.random.default_rng(0), 16)


# ---------------------------------------------------------------------- class signal


def test_findings_brighten_the_lungs():
    """Same generator state under each label gives the same patient and film, so the
    difference inside the lung mask is the finding alone."""
    means = {c: [] for c in KAGGLE_CLASSES}
    for i in range(6):
        normal_mask = None
        for c in KAGGLE_CLASSES:
            img, mask = render_radiograph(c, np.random.default_rng([5, i]), 128)
            normal_mask = mask if normal_mask is None else normal_mask
            assert np.array_equal(mask, normal_mask)
            means[c].append(img[mask > 0].astype(float).mean())
    normal = np.mean(means["Normal"])
    for c in ("COVID", "Lung_Opacity", "Viral Pneumonia"):
        assert np.mean(means[c]) > normal + 1.0, (c, np.mean(means[c]), normal)
        assert all(m >= n for m, n in zip(means[c], means["Normal"]))


def test_findings_differ_in_where_they_are():
    """COVID sits in the lower lung zones; its added brightness is mostly below the lung centre."""
    lower, upper = [], []
    for i in range(6):
        normal, mask = render_radiograph("Normal", np.random.default_rng([6, i]), 128)
        covid, _ = render_radiograph("COVID", np.random.default_rng([6, i]), 128)
        diff = (covid.astype(float) - normal) * (mask > 0)
        rows = np.nonzero(mask.any(1))[0]
        mid = (rows[0] + rows[-1]) // 2
        upper.append(diff[:mid].sum())
        lower.append(diff[mid:].sum())
    assert sum(lower) > 1.5 * sum(upper)


# --------------------------------------------------------------------------- pHash


def test_distinct_images_are_far_apart_in_phash_and_copies_are_close():
    imagehash = pytest.importorskip("imagehash")
    images = [Image.fromarray(render_radiograph("Normal", np.random.default_rng([0, 2, i]))[0]) for i in range(40)]
    hashes = [imagehash.phash(im, hash_size=16) for im in images]
    assert min(a - b for a, b in combinations(hashes, 2)) > 24
    for im, h in zip(images[:8], hashes):
        buf = io.BytesIO()
        ImageEnhance.Brightness(im).enhance(1.06).save(buf, "JPEG", quality=85)
        assert h - imagehash.phash(Image.open(io.BytesIO(buf.getvalue())), hash_size=16) <= 8
        assert h - imagehash.phash(im.resize((256, 256), Image.Resampling.BILINEAR), hash_size=16) <= 8
