"""Scanning both layouts, and every kind of bad or odd file."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from covid_ray.data.io import BadImageError, decode_grayscale
from covid_ray.data.layout import KAGGLE_CLASSES
from covid_ray.data.prepare import split_dataset
from covid_ray.data.scan import DatasetNotFoundError, scan_dataset
from helpers import bomb_png, make_kaggle, png_bytes, smooth_image, write_png

KAGGLE_SMALL = {"Viral Pneumonia": 3, "Normal": 4, "COVID": 3, "Lung_Opacity": 3}


def reasons(entries):
    """path -> all its reasons joined by '; ' (a file can be odd in two ways)."""
    out: dict[str, str] = {}
    for e in entries:
        out[e["path"]] = f"{out[e['path']]}; {e['reason']}" if e["path"] in out else e["reason"]
    return out


def test_kaggle_layout_classes_masks_and_root_files(tmp_path):
    make_kaggle(tmp_path / "COVID-19_Radiography_Dataset", KAGGLE_SMALL)
    scan = scan_dataset(tmp_path, workers=1)  # the unpack folder: descends into the Kaggle dir
    assert scan.layout == "kaggle"
    assert scan.classes == list(KAGGLE_CLASSES)  # Kaggle order, not alphabetical
    assert scan.counts() == {c: KAGGLE_SMALL[c] for c in KAGGLE_CLASSES}
    rec = next(r for r in scan.records if r.path == "Viral Pneumonia/images/Viral Pneumonia-2.png")
    assert rec.mask == "Viral Pneumonia/masks/Viral Pneumonia-2.png"
    assert (rec.width, rec.height) == (64, 64)
    assert not scan.excluded and not scan.odd  # README.md.txt and *.metadata.xlsx are not classes


def test_imagefolder_layout(tmp_path):
    for k, label in enumerate(["pneumonia", "normal"]):
        for i in range(3):
            arr = smooth_image(10 * k + i)
            ext = "jpg" if i == 2 else "png"
            (tmp_path / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / label / f"x{i}.{ext}")
    (tmp_path / "normal" / "notes.txt").write_text("hello")
    scan = scan_dataset(tmp_path, workers=1)
    assert scan.layout == "imagefolder"
    assert scan.classes == ["normal", "pneumonia"]
    assert scan.counts() == {"normal": 3, "pneumonia": 3}
    assert all(r.mask == "" for r in scan.records)
    assert reasons(scan.excluded) == {"normal/notes.txt": "not an image file name (.txt)"}


def test_bad_files_are_excluded_with_reasons(tmp_path):
    root = make_kaggle(tmp_path, {"COVID": 3, "Normal": 3})
    imgs = root / "COVID" / "images"
    (imgs / "zero.png").write_bytes(b"")
    (imgs / "truncated.png").write_bytes(png_bytes(smooth_image(99))[:200])
    (imgs / "text.png").write_bytes(b"this is not a png at all")
    (imgs / "bomb.png").write_bytes(bomb_png())
    scan = scan_dataset(root, workers=1)
    got = reasons(scan.excluded)
    assert got["COVID/images/zero.png"] == "empty file (0 bytes)"
    assert got["COVID/images/truncated.png"].startswith("unreadable image data")
    assert got["COVID/images/text.png"] == "not an image (unrecognised content)"
    assert got["COVID/images/bomb.png"].startswith("decompression bomb")
    assert scan.counts() == {"COVID": 3, "Normal": 3}  # the rest goes on


def test_odd_files_are_kept_and_converted(tmp_path):
    root = make_kaggle(tmp_path, {"COVID": 2, "Normal": 2})
    imgs = root / "Normal" / "images"
    base = smooth_image(7)
    rgba = np.dstack([base, base, base, np.full_like(base, 255)])
    write_png(imgs / "rgba.png", rgba)
    Image.fromarray(base.astype(np.uint16) * 200).save(imgs / "deep.png")  # 16-bit
    Image.fromarray(base).save(imgs / "jpeg_inside.png", format="JPEG")
    write_png(imgs / "rgb.png", np.dstack([base] * 3))
    write_png(root / "Normal" / "masks" / "orphan.png", np.zeros((64, 64), np.uint8))
    scan = scan_dataset(root, workers=1)
    odd = reasons(scan.odd)
    assert "alpha" in odd["Normal/images/rgba.png"]
    assert "16-bit" in odd["Normal/images/deep.png"]
    assert "JPEG data under a .png name" in odd["Normal/images/jpeg_inside.png"]
    assert "RGB converted" in odd["Normal/images/rgb.png"]
    assert odd["Normal/masks/orphan.png"] == "mask without an image (ignored)"
    for name in ("rgba", "deep", "jpeg_inside", "rgb"):
        assert "image without a lung mask (kept)" in odd[f"Normal/images/{name}.png"]
        assert f"Normal/images/{name}.png" in {r.path for r in scan.records}
    assert scan.counts()["Normal"] == 6 and not scan.excluded


def test_image_without_mask_is_kept_and_reported(tmp_path):
    root = make_kaggle(tmp_path, {"COVID": 2, "Normal": 2})
    (root / "COVID" / "masks" / "COVID-1.png").unlink()
    scan = scan_dataset(root, workers=1)
    assert reasons(scan.odd) == {"COVID/images/COVID-1.png": "image without a lung mask (kept)"}
    rec = {r.path: r for r in scan.records}["COVID/images/COVID-1.png"]
    assert rec.mask == ""


def test_16bit_rescale_uses_full_range():
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7 + 1000)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_grayscale(buf.getvalue(), name="x.png")
    assert out.array.dtype == np.uint8 and out.array.min() == 0 and out.array.max() == 255


def test_bomb_refused_before_decoding():
    with pytest.raises(BadImageError, match="decompression bomb"):
        decode_grayscale(bomb_png(), name="bomb.png")


def test_split_cli_reports_and_exit_status(tmp_path, capsys):
    from covid_ray.data.__main__ import main

    root = make_kaggle(tmp_path / "ds", {"COVID": 3, "Normal": 3})
    (root / "COVID" / "images" / "zero.png").write_bytes(b"")
    assert main(["split", "--data", str(root), "--out", str(tmp_path / "out" / "split.csv"), "--workers", "1"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("6 images in 2 classes") and "1 excluded" in line
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["excluded"] == [{"path": "COVID/images/zero.png", "reason": "empty file (0 bytes)"}]
    assert report["synthetic"] is False


def test_nothing_usable_is_a_clear_failure(tmp_path, capsys):
    from covid_ray.data.__main__ import main

    imgs = tmp_path / "ds" / "COVID" / "images"
    imgs.mkdir(parents=True)
    (imgs / "a.png").write_bytes(b"")
    (imgs / "b.png").write_bytes(b"garbage")
    code = main(["split", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "s.csv"), "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "no usable images" in out and "Kaggle layout" in out and "2 files excluded" in out
    assert not (tmp_path / "s.csv").exists() and (tmp_path / "data_report.json").exists()


def test_missing_folder_names_it(tmp_path, capsys):
    from covid_ray.data.__main__ import main

    assert main(["split", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "s.csv")]) == 1
    assert "nope" in capsys.readouterr().err
    with pytest.raises(DatasetNotFoundError, match="no class folders"):
        scan_dataset(tmp_path)


def test_parallel_scan_matches_serial(tmp_path):
    root = make_kaggle(tmp_path, {"COVID": 40, "Normal": 40})
    a = split_dataset(root, tmp_path / "a" / "s.csv", workers=1)
    b = split_dataset(root, tmp_path / "b" / "s.csv", workers=2)
    assert (tmp_path / "a" / "s.csv").read_bytes() == (tmp_path / "b" / "s.csv").read_bytes()
    assert a.report["counts"] == b.report["counts"]


def test_default_split_is_made_once_then_reused(tmp_path, monkeypatch):
    from covid_ray.data.prepare import default_split_path, ensure_split

    monkeypatch.chdir(tmp_path)
    root = make_kaggle(tmp_path / "ds", {"COVID": 3, "Normal": 3})
    path = ensure_split(root)
    assert path == default_split_path(root) and path.is_file()
    assert path.parts[:2] == ("results", "splits")
    stamp = path.stat().st_mtime_ns
    assert ensure_split(root) == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ensure_split(root, tmp_path / "nope.csv")


def test_extreme_aspect_ratio_is_refused():
    strip = np.full((2, 400), 128, np.uint8)
    with pytest.raises(BadImageError, match="aspect ratio"):
        decode_grayscale(png_bytes(strip), name="strip.png")
