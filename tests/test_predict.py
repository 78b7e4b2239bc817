"""``covid_ray.predict`` and ``covid_ray.inference``: model loading, exact eval preprocessing,
one JSON line per image, unreadable files, exit codes, Grad-CAM outputs on the CLI."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_ray.artifacts.bundle import ModelLoadError, member_checkpoints
from covid_ray.artifacts.checkpoint import model_from_checkpoint, save_checkpoint
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.data.io import BadImageError, read_grayscale, resize_square
from covid_ray.data.layout import SYNTHETIC_MARKER
from covid_ray.data.transforms import EvalPreset
from covid_ray.gradcam import OUTLINE_RGB
from covid_ray.inference import load_model
from covid_ray.models import create_model
from covid_ray.predict import main

from helpers import bomb_png, make_kaggle, png_bytes, smooth_image

CLASSES = ["COVID", "Normal"]


# --------------------------------------------------------------------------- builders (also used by test_serve)


def make_dataset(root: Path) -> Path:
    """Two classes of 64 px images with lung masks, marked synthetic."""
    make_kaggle(root, {"COVID": 3, "Normal": 3}, size=64)
    (root / SYNTHETIC_MARKER).write_text("{}\n")
    return root


def make_checkpoint(folder: Path, name: str = "seed_cnn", *, image_size: int = 32, in_chans: int = 1, seed: int = 0,
                    data: Path | None = None, classes=CLASSES) -> Path:
    """A randomly initialised, loadable checkpoint (weights do not matter to these tests)."""
    torch.manual_seed(seed)
    model = create_model(name, len(classes), in_chans=in_chans)
    return save_checkpoint(folder, model, classes=list(classes), image_size=image_size,
                           metrics={"val_macro_f1": 0.5, "val_accuracy": 0.5}, epoch=1,
                           config={"data": str(data) if data else None})


def make_onnx_ensemble(folder: Path, checkpoints: list[tuple[str, Path]], weights: list[float], temperature: float = 1.3,
                       *, synthetic: bool = True) -> Path:
    """An exported ensemble folder: ``ensemble_fp32.onnx`` + ``preprocess.json`` from ensemble.export.

    The graph is written by the TorchScript exporter (about 1 s) instead of
    ``export_onnx``'s dynamo exporter (tens of seconds here, and tested in
    test_ensemble): the predictor reads the same graph either way.
    """
    from covid_ray.artifacts.bundle import write_preprocess_json
    from ensemble.export import EnsembleModule, preprocess_json
    from ensemble.select import load_trial

    members = [load_trial({"trial_id": t, "checkpoint": str(p)}, 0.5, CLASSES) for t, p in checkpoints]
    module = EnsembleModule(members, weights, temperature, CLASSES).eval()
    folder.mkdir(parents=True, exist_ok=True)
    s, c = module.spec["image_size"], module.spec["in_chans"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, c, s, s),), str(folder / "ensemble_fp32.onnx"), dynamo=False,
                          input_names=["images"], output_names=["probs"], opset_version=17,
                          dynamic_axes={"images": {0: "batch"}, "probs": {0: "batch"}})
    write_preprocess_json(preprocess_json(module, CLASSES, synthetic=synthetic), folder / "preprocess.json")
    return folder


def reference_input(path: Path, image_size: int, in_chans: int) -> torch.Tensor:
    """The eval preprocessing written out by hand: decode, resize_square, EvalPreset."""
    gray = read_grayscale(path)[0].array
    resized = resize_square(gray, int(round(image_size * 256 / 224)))
    return EvalPreset(image_size=image_size, in_chans=in_chans)(torch.from_numpy(resized.copy())[None])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, two checkpoints (1- and 3-channel) and their exported ensemble."""
    base = tmp_path_factory.mktemp("predict")
    data = make_dataset(base / "data")
    a = make_checkpoint(base / "train" / "a", "mobilenet_v3_small", data=data, seed=0)
    b = make_checkpoint(base / "train" / "b", "mobilenet_v3_small", in_chans=3, data=data, seed=1)
    seed = make_checkpoint(base / "train" / "seed", "seed_cnn", data=data, seed=2)
    ens = make_onnx_ensemble(base / "exp" / "ensemble", [("a", a), ("b", b)], [0.7, 0.3])
    bad = base / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("this is text, not a PNG\n")
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(png_bytes(smooth_image(7, 64))[:60])
    (bad / "bomb.png").write_bytes(bomb_png())
    return {"data": data, "a": a, "b": b, "seed": seed, "ensemble": ens, "bad": bad}


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# --------------------------------------------------------------------------- tests


def test_checkpoint_cli_applies_the_recorded_preprocessing_and_reports_bad_files(world, capsys):
    good = world["data"] / "COVID" / "images" / "COVID-1.png"
    bad = world["bad"]
    files = [good, bad / "notes.png", bad / "empty.png", bad / "missing.png", bad / "truncated.png", bad / "bomb.png"]
    assert main([*map(str, files), "--model", str(world["seed"])]) == 0
    rows = _lines(capsys)
    assert [r["image"] for r in rows] == [str(f) for f in files]  # one line per image, in order
    ok, *errors = rows
    assert set(ok) == {"image", "class", "probabilities", "model", "synthetic", "in_distribution", "ood_score",
                       "ood_threshold", "ood_note"}
    # A single checkpoint has no OOD score: it classifies as before and says so.
    assert ok["in_distribution"] is None and ok["ood_score"] is None and "no OOD score" in ok["ood_note"]
    assert ok["synthetic"] is True and ok["model"] == str(world["seed"] / "model.pt")
    model, _ = model_from_checkpoint(world["seed"])
    with torch.no_grad():
        expected = torch.softmax(model(reference_input(good, 32, 1)).double(), 1)[0].numpy()
    assert list(ok["probabilities"]) == CLASSES
    assert np.allclose(list(ok["probabilities"].values()), expected, atol=2e-6)
    assert ok["class"] == CLASSES[int(expected.argmax())]
    assert [set(r) for r in errors] == [{"image", "error"}] * 5
    reasons = [r["error"] for r in errors]
    assert "not an image" in reasons[0] and "empty" in reasons[1] and "cannot read" in reasons[2]
    assert "unreadable" in reasons[3] and "decompression bomb" in reasons[4]


def test_no_readable_image_exits_1_and_a_bad_model_exits_2(world, tmp_path, capsys):
    bad = world["bad"]
    assert main([str(bad / "notes.png"), str(bad / "empty.png"), "--model", str(world["seed"])]) == 1
    assert all("error" in r for r in _lines(capsys))
    assert main([str(bad / "notes.png"), "--model", str(tmp_path / "nothing")]) == 2
    assert "model not found" in capsys.readouterr().err
    (tmp_path / "model.pt").write_bytes(b"not torch")
    assert main([str(bad / "notes.png"), "--model", str(tmp_path)]) == 2
    assert "not a usable covid-ray checkpoint" in capsys.readouterr().err
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "ensemble_fp32.onnx").write_bytes(b"x")
    assert main([str(bad / "notes.png"), "--model", str(lone / "ensemble_fp32.onnx")]) == 2
    assert "no preprocess.json beside it" in capsys.readouterr().err


def test_onnx_ensemble_cli_matches_the_torch_ensemble(world, capsys):
    from ensemble.export import EnsembleModule
    from ensemble.select import load_trial

    images = [world["data"] / c / "images" / f"{c}-{i}.png" for c in CLASSES for i in (1, 2)]
    for model_arg in (world["ensemble"], world["ensemble"] / "ensemble_fp32.onnx", world["ensemble"].parent):
        assert main([*map(str, images), "--model", str(model_arg)]) == 0
        rows = _lines(capsys)
        assert [r["model"] for r in rows] == [str(world["ensemble"] / "ensemble_fp32.onnx")] * 4
    members = [load_trial({"trial_id": t, "checkpoint": str(world[t])}, 0.5, CLASSES) for t in ("a", "b")]
    module = EnsembleModule(members, [0.7, 0.3], 1.3, CLASSES).eval()
    with torch.no_grad():
        expected = module(torch.cat([reference_input(p, 32, 1) for p in images])).numpy()
    got = np.array([list(r["probabilities"].values()) for r in rows])
    assert np.abs(got - expected).max() < 1e-4
    assert all(r["synthetic"] is True for r in rows)


def test_gradcam_cli_writes_overlays_and_the_in_lung_share(world, tmp_path, capsys):
    kaggle = world["data"] / "Normal" / "images" / "Normal-1.png"
    loose = tmp_path / "loose.png"  # not in a Kaggle folder: no mask found
    Image.fromarray(smooth_image(3, 80)[:, :60]).save(loose)
    out = tmp_path / "cams"
    assert main([str(kaggle), str(loose), "--model", str(world["ensemble"]), "--gradcam", str(out)]) == 0
    with_mask, without = _lines(capsys)
    assert with_mask["mask"] == str(world["data"] / "Normal" / "masks" / "Normal-1.png")
    assert 0 <= with_mask["lung_cam_share"] <= 1 and 0 < with_mask["lung_area_share"] < 1
    assert "lung_cam_share" not in without and "mask" not in without
    for row, size in ((with_mask, (64, 64)), (without, (60, 80))):
        png = Image.open(row["gradcam"])
        assert png.format == "PNG" and png.mode == "RGB" and png.size == size  # the radiograph's own size
    # The lungs' outline is drawn (magenta, a hue the map's colormap never takes) only with a mask.
    magenta = tuple(round(255 * v) for v in OUTLINE_RGB)
    def outline_pixels(row):
        return int((np.asarray(Image.open(row["gradcam"])) == magenta).all(axis=-1).sum())
    assert outline_pixels(with_mask) > 20 and outline_pixels(without) == 0
    # An explicit --mask (any size: it is resized to the image), without --gradcam: share only.
    mask = np.zeros((40, 30), np.uint8)
    mask[:, :15] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert main([str(loose), "--model", str(world["seed"]), "--mask", str(tmp_path / "m.png")]) == 0
    (row,) = _lines(capsys)
    assert 0 <= row["lung_cam_share"] <= 1 and "gradcam" not in row
    assert row["lung_area_share"] == pytest.approx(0.5, abs=0.1)
    with pytest.raises(SystemExit):
        main([str(loose), str(kaggle), "--model", str(world["seed"]), "--mask", str(tmp_path / "m.png")])


def test_grad_cam_of_an_ensemble_needs_its_member_checkpoints(world, tmp_path, capsys):
    """preprocess.json names each member's model.pt; older files fall back to trials.csv."""
    meta = json.loads((world["ensemble"] / "preprocess.json").read_text())
    assert [(m["trial_id"], m["model"]) for m in meta["members"]] == [("a", "mobilenet_v3_small"),
                                                                      ("b", "mobilenet_v3_small")]
    assert meta["members"][0]["checkpoint"] == str((world["a"] / "model.pt").resolve())
    assert len(meta["members"][0]["sha256"]) == 64 and meta["members"][0]["weight"] == pytest.approx(0.7)

    old = tmp_path / "exp" / "ensemble"
    old.mkdir(parents=True)
    (old / "ensemble_fp32.onnx").write_bytes((world["ensemble"] / "ensemble_fp32.onnx").read_bytes())
    meta["members"] = [{"trial_id": m["trial_id"], "weight": m["weight"]} for m in meta["members"]]
    (old / "preprocess.json").write_text(json.dumps(meta))
    model = load_model(old)
    with pytest.raises(ModelLoadError, match="checkpoint of member 'a' not found"):
        member_checkpoints(model.path, model.meta)
    (tmp_path / "exp" / "trials.csv").write_text(f"trial_id,checkpoint\na,{world['a']}\nb,{world['b']}\n")
    found = member_checkpoints(model.path, model.meta)
    assert [(e["trial_id"], e["checkpoint"]) for e in found] == [("a", world["a"]), ("b", world["b"])]

    (tmp_path / "exp" / "trials.csv").write_text("trial_id,checkpoint\n")
    image = world["data"] / "COVID" / "images" / "COVID-1.png"
    assert main([str(image), "--model", str(old), "--gradcam", str(tmp_path / "c")]) == 2
    assert "Grad-CAM needs the ensemble's torch members" in capsys.readouterr().err
    assert main([str(image), "--model", str(old)]) == 0  # predicting alone does not need them


def test_preprocessing_guards(tmp_path):
    pre = Preprocess.from_dict({"image_size": 32, "in_chans": 1, "mean": [0.449], "std": [0.226]}, source="x")
    assert pre.resize == 37 and pre.crop_box(64, 64) == pytest.approx((2 * 64 / 37, 2 * 64 / 37, 32 * 64 / 37, 32 * 64 / 37))
    with pytest.raises(BadImageError, match="aspect ratio"):
        pre.resized(np.zeros((2, 400), np.uint8))  # would otherwise resize to 37 x 7400
    with pytest.raises(ModelLoadError, match="normalization"):
        Preprocess.from_dict({"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.226]}, source="x")
    with pytest.raises(ModelLoadError, match="unsupported crop"):
        Preprocess.from_dict({"image_size": 32, "in_chans": 1, "mean": [0.449], "std": [0.226], "crop": "random"},
                             source="x")


def test_model_description_reports_the_builds_test_metrics(world, tmp_path):
    folder = tmp_path / "ensemble"
    folder.mkdir()
    for name in ("ensemble_fp32.onnx", "preprocess.json"):
        (folder / name).write_bytes((world["ensemble"] / name).read_bytes())
    metrics = {"test_images": 40, "ensemble": {"accuracy": 0.9, "macro_f1": 0.8, "covid_sensitivity": 0.95},
               "export": {"weights": {"a": 0.7, "b": 0.3}, "gate": {"passed": True}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    info = load_model(folder).describe()
    assert info["metrics"] == {"split": "test", "test_images": 40, "accuracy": 0.9, "macro_f1": 0.8,
                               "covid_sensitivity": 0.95, "int8_gate_passed": True}
    assert info["synthetic"] is True and info["classes"] == CLASSES and info["temperature"] == pytest.approx(1.3)
    metrics["export"]["weights"] = {"c": 1.0}  # a later build's metrics beside an older graph
    (folder / "metrics.json").write_text(json.dumps(metrics))
    info = load_model(folder).describe()
    assert info["metrics"] is None and "describes another build" in info["notes"][0]
