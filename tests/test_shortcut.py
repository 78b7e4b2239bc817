"""The shortcut audit: the fills, chance, the rule, sources, and two trained models: one with a planted
shortcut (a bright corner marker gives the class, the lungs carry nothing), flagged; one whose signal is
in the lungs only, not flagged."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covid_ray.data.split import read_manifest
from ensemble.shortcut import fill_lungs_only, fill_lungs_removed, flag_rule, permutation_null
from ensemble.sources import source_analysis

from helpers import smooth_image, write_png

CLASSES = ["COVID", "Normal"]
SIZE = 64


def lung_mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[14:50, 10:54] = 255
    return mask


def make_marker_dataset(root: Path, *, shortcut: bool, per_class: int = 60) -> Path:
    """Two classes in the Kaggle layout. ``shortcut``: COVID images carry a bright corner marker outside the
    lungs and the lungs are the same noise for both classes; otherwise COVID has a bright disk inside the
    lungs and nothing outside differs."""
    rng = np.random.default_rng(1 if shortcut else 2)
    yy, xx = np.ogrid[:SIZE, :SIZE]
    for label in CLASSES:
        for i in range(1, per_class + 1):
            img = smooth_image(rng.integers(1 << 30), SIZE).astype(np.int32) // 4 + 40
            if label == "COVID" and shortcut:
                img[2:14, 2:14] = 255
            elif label == "COVID":
                cy, cx = rng.integers(24, 40), rng.integers(20, 44)
                img += 110 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 36)
            write_png(root / label / "images" / f"{label}-{i}.png", np.clip(img, 0, 255).astype(np.uint8))
            write_png(root / label / "masks" / f"{label}-{i}.png", lung_mask())
    return root


def write_metadata(root: Path, urls: dict[str, str]) -> None:
    """``<class>.metadata.xlsx`` with one URL per class (the Kaggle columns)."""
    import openpyxl

    for label, url in urls.items():
        wb = openpyxl.Workbook()
        ws = wb.active
        ws.append(["FILE NAME", "FORMAT", "SIZE", "URL"])
        for png in sorted((root / label / "images").glob("*.png")):
            ws.append([png.stem.upper(), "PNG", "64*64", url])  # Kaggle's names differ in case from the files'
        wb.save(root / f"{label}.metadata.xlsx")


# --------------------------------------------------------------------------- pieces


def test_fills_remove_the_lungs_or_everything_else():
    img = np.full((SIZE, SIZE), 60, np.uint8)
    img[20:40, 20:40] = 250  # a finding inside the lungs
    img[2:8, 2:8] = 200  # a marker outside
    mask = lung_mask() > 0
    removed = fill_lungs_removed(img, mask)
    assert (removed[~mask] == img[~mask]).all()  # outside untouched
    assert removed[20:40, 20:40].max() < 100  # the finding is gone: the fill comes from outside only
    only = fill_lungs_only(img, mask)
    assert (only[mask] == img[mask]).all() and (only[~mask] == round(img[mask].mean())).all()
    assert (fill_lungs_removed(img, np.zeros_like(mask)) == img).all()


def test_chance_is_the_permutation_null_of_the_same_predictions():
    labels = np.array([0] * 30 + [1] * 70)
    constant = permutation_null(labels, np.ones(100, np.int64), 2, n=200)
    assert constant["accuracy"]["mean"] == pytest.approx(0.7) and constant["accuracy"]["q99"] == pytest.approx(0.7)
    assert constant["macro_f1"]["mean"] == pytest.approx((2 * 70 / 170) / 2)  # F1 of class 1; class 0 never predicted
    perfect = permutation_null(labels, labels, 2, n=2000)
    assert perfect["accuracy"]["mean"] == pytest.approx(0.3 ** 2 + 0.7 ** 2, abs=0.01)  # agreement by chance
    assert perfect["accuracy"]["q99"] > perfect["accuracy"]["mean"]


def test_the_rule_flags_only_skill_kept_without_the_lungs():
    def scores(f1, chance, q99):
        return {"macro_f1": f1, "chance": {"macro_f1": {"mean": chance, "q99": q99}}}

    intact = scores(0.9, 0.5, 0.6)
    assert flag_rule(intact, scores(0.85, 0.5, 0.6))[:2] == (True, pytest.approx(0.875))
    assert flag_rule(intact, scores(0.62, 0.5, 0.6))[0] is False  # above the null but keeps only 30%
    assert flag_rule(intact, scores(0.7, 0.45, 0.72))[0] is False  # keeps 62%, but within the null's spread
    assert flag_rule(scores(0.4, 0.5, 0.6), scores(0.9, 0.5, 0.6))[0] is False  # no skill to keep


def test_sources_say_whether_the_source_alone_predicts_the_class(tmp_path):
    from covid_ray.data.prepare import split_dataset

    root = make_marker_dataset(tmp_path / "ds", shortcut=False, per_class=30)
    split_dataset(root, tmp_path / "split.csv", workers=1)
    manifest = read_manifest(tmp_path / "split.csv")
    test = manifest[manifest["split"] == "test"]
    truth = test["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    write_metadata(root, {"COVID": "https://hospital-a.example", "Normal": "https://pediatric-b.example"})
    out = source_analysis(manifest, root, CLASSES, truth)
    assert out["available"] and out["sources"] == 2 and out["images_with_source"] == len(manifest)
    assert out["source_only_classifier"] == {"fitted_on": "train", "evaluated_on": "test", "accuracy": 1.0,
                                             "macro_f1": 1.0}
    assert out["independence"]["p_value"] < 1e-6 and out["independence"]["cramers_v"] == pytest.approx(1.0)
    assert {r["source"] for r in out["per_source"]} == {"https://hospital-a.example", "https://pediatric-b.example"}
    write_metadata(root, {"COVID": "one place", "Normal": "one place"})
    single = source_analysis(manifest, root, CLASSES, truth)
    assert "one source for every image" in single["note"] and "independence" not in single
    (root / "Normal.metadata.xlsx").write_bytes(b"not a workbook")
    broken = source_analysis(manifest, root, CLASSES, truth)
    assert any("Normal.metadata.xlsx: unreadable" in p for p in broken["metadata_problems"])


# --------------------------------------------------------------------------- trained models


def _audit(tmp_path: Path, *, shortcut: bool) -> dict:
    from covid_ray.data.prepare import split_dataset
    from ensemble.members import member_probabilities
    from covid_ray.artifacts.experiment import Experiment
    from ensemble.select import load_trial
    from ensemble.shortcut import shortcut_audit
    from test_ensemble_build import _train

    root = make_marker_dataset(tmp_path / "ds", shortcut=shortcut)
    split_dataset(root, tmp_path / "split.csv", workers=1)
    # 6 epochs: measured flagged / not flagged for seeds 0, 1, 2 (retained skill 1.0 / 0.0).
    _train(root, tmp_path / "split.csv", tmp_path / "ckpt", "resnet18", 40, 1, 6, 0, 2e-3)
    member = load_trial({"trial_id": "m", "checkpoint": str(tmp_path / "ckpt")}, 1.0, CLASSES)
    experiment = Experiment(tmp_path, "audit", root, tmp_path / "split.csv", True, "val_macro_f1", "max", CLASSES)
    manifest = read_manifest(tmp_path / "split.csv")
    probs = member_probabilities([member], experiment, manifest, ("test",), cache_dir=tmp_path / "cache")
    return shortcut_audit([member], [1.0], 1.0, experiment, manifest, probs["test"].probs[0],
                          cache_dir=tmp_path / "cache")


def test_a_planted_corner_marker_is_flagged(tmp_path):
    audit = _audit(tmp_path, shortcut=True)
    assert audit["status"] == "ok" and audit["images"] == audit["test_images"] == 24
    assert audit["intact"]["accuracy"] >= 0.9
    assert audit["lungs_removed"]["accuracy"] >= 0.9  # the marker is outside the lungs
    assert audit["flagged"] is True and audit["retained_skill"] >= 0.8
    assert "keeps 100% of its above-chance macro-F1" in audit["reason"]
    assert audit["sources"]["available"] is False  # no metadata files in this dataset
    # Said in ensemble.build's terminal summary and in report.md.
    from ensemble.trust import summary_lines
    from ensemble.trust_report import shortcut_section

    assert any(line.startswith("shortcut audit: LIKELY USING SHORTCUTS") for line in summary_lines({"shortcut": audit}))
    report = "\n".join(shortcut_section({"shortcut": audit, "synthetic": True}))
    assert "**FLAGGED: the ensemble is likely using shortcuts**" in report and "99th percentile" in report


def test_a_model_reading_the_lungs_is_not_flagged(tmp_path):
    audit = _audit(tmp_path, shortcut=False)
    assert audit["intact"]["accuracy"] >= 0.9
    removed = audit["lungs_removed"]
    assert removed["macro_f1"] <= removed["chance"]["macro_f1"]["q99"] + 0.05
    assert audit["flagged"] is False and audit["retained_skill"] < 0.5
    assert audit["lungs_only"]["accuracy"] >= 0.8  # the evidence is in the lungs
    from ensemble.trust import summary_lines

    assert any(line.startswith("shortcut audit: not flagged") for line in summary_lines({"shortcut": audit}))
