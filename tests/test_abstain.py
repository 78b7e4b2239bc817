"""Abstention on out-of-distribution images: the CLI line (``covid_ray.predict``) and the service
(``/predict``, ``/model``) of an exported ensemble with an OOD score, and of models without one."""
from __future__ import annotations

import json

import numpy as np
import pytest
import httpx

from covid_ray.inference import load_model
from covid_ray.predict import main
from covid_ray.serve import create_app
from ensemble.ood import fit_gaussian

from helpers import png_bytes
from test_ood import _members, export_with_ood
from test_predict import CLASSES, make_dataset, make_onnx_ensemble
from test_serve import _Server  # uvicorn on 127.0.0.1, as the service runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Members' Gaussians fitted on the dataset's radiographs; the threshold between a radiograph and noise."""
    from covid_ray.data.io import read_grayscale
    from ensemble.outputs import array_images, member_outputs

    base = tmp_path_factory.mktemp("abstain")
    data = make_dataset(base / "data")
    members = _members(base / "train")
    images = sorted(data.glob("*/images/*.png"))
    grays = [read_grayscale(p)[0].array for p in images]
    labels = np.array([CLASSES.index(p.parent.parent.name) for p in images])
    fits = [fit_gaussian(member_outputs(m, array_images("fit", grays), CLASSES).features, labels) for m in members]
    noise = base / "noise.png"
    noise.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, (80, 80), dtype=np.uint8)))
    folder = export_with_ood(base / "exp" / "ensemble", members, fits)
    model = load_model(folder)
    score = {p: float(model.predict_with_ood(model.prepare(read_grayscale(p)[0].array).x)[1][0])
             for p in (images[0], noise)}
    # Distances of the images the Gaussians were fitted on are small; noise is far from them.
    assert score[noise] > score[images[0]]
    threshold = (score[noise] + score[images[0]]) / 2
    meta = json.loads((folder / "preprocess.json").read_text())
    meta["ood"]["threshold"] = threshold
    meta["ood"]["thresholds_by_graph"] = {"ensemble_fp32.onnx": threshold}
    (folder / "preprocess.json").write_text(json.dumps(meta))
    plain = make_onnx_ensemble(base / "plain" / "ensemble", [("a", members[0].checkpoint.parent)], [1.0])
    return {"ensemble": folder, "plain": plain, "radiograph": images[0], "noise": noise, "threshold": threshold,
            "scores": score}


def _check_abstained(row: dict, threshold: float) -> None:
    assert row["in_distribution"] is False and row["class"] is None
    assert row["ood_score"] > threshold and row["ood_threshold"] == pytest.approx(threshold)
    assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4) and list(row["probabilities"]) == CLASSES
    reason = row["abstain_reason"]
    assert reason.startswith("not a chest radiograph like the training data: OOD score")
    assert f"above threshold {threshold:.4g}" in reason and "accept 95% of validation radiographs" in reason


def _check_accepted(row: dict, threshold: float) -> None:
    assert row["in_distribution"] is True and row["class"] in CLASSES
    assert row["ood_score"] <= threshold and "abstain_reason" not in row


def test_cli_abstains_on_an_image_unlike_the_training_data(world, capsys):
    assert main([str(world["radiograph"]), str(world["noise"]), "--model", str(world["ensemble"])]) == 0
    accepted, abstained = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    _check_accepted(accepted, world["threshold"])
    _check_abstained(abstained, world["threshold"])
    assert accepted["ood_score"] == pytest.approx(world["scores"][world["radiograph"]], rel=1e-5)


def test_cli_gradcam_still_explains_an_abstained_image(world, tmp_path, capsys):
    assert main([str(world["noise"]), "--model", str(world["ensemble"]), "--gradcam", str(tmp_path / "cams")]) == 0
    row = json.loads(capsys.readouterr().out)
    _check_abstained(row, world["threshold"])
    assert (tmp_path / "cams" / "noise.gradcam.png").is_file()  # the map of the most probable class


def test_service_abstains_and_reports_its_ood_section(world):
    from covid_ray.gradcam import gradcam_for

    model = load_model(world["ensemble"])
    with _Server(create_app(model, cam=gradcam_for(model))) as srv:
        info = httpx.get(f"{srv.url}/model").json()["ood"]
        assert info["available"] is True and info["score"] == "mahalanobis"
        assert info["threshold"] == pytest.approx(world["threshold"]) and info["higher_is"] == "out-of-distribution"
        assert info["fitted_on"] == "val" and info["val_accept_rate"] == 0.95
        r = httpx.post(f"{srv.url}/predict", files={"file": ("noise.png", world["noise"].read_bytes(), "image/png")},
                       params={"gradcam": "true"}, timeout=60)
        assert r.status_code == 200, r.text
        _check_abstained(r.json(), world["threshold"])
        assert r.json()["gradcam_png"]
        r = httpx.post(f"{srv.url}/predict", files={"file": ("x.png", world["radiograph"].read_bytes())}, timeout=60)
        _check_accepted(r.json(), world["threshold"])


def test_a_model_without_an_ood_score_predicts_as_before_and_says_so(world):
    model = load_model(world["plain"])
    with _Server(create_app(model)) as srv:
        assert httpx.get(f"{srv.url}/model").json()["ood"] == {"available": False,
                                                                "note": model.describe()["ood"]["note"]}
        row = httpx.post(f"{srv.url}/predict", files={"file": ("n.png", world["noise"].read_bytes())},
                         timeout=60).json()
    assert row["class"] in CLASSES and row["in_distribution"] is None
    assert row["ood_score"] is None and row["ood_threshold"] is None and "no OOD score" in row["ood_note"]
