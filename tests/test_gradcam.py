"""Grad-CAM: shapes per architecture, the closed form, the in-lung share on models whose output
depends on one region only, ensemble weighting, overlays, and the share in ensemble.build."""
from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.gradcam import (
    CamMember,
    GradCam,
    find_kaggle_mask,
    grad_cam,
    mask_in_crop,
    overlay_png,
    share_inside,
    target_layer,
)
from covid_ray.models import _MODEL_REGISTRY, create_model, get_model_entry, list_models

from helpers import smooth_image, write_png

PRE = Preprocess.from_dict({"image_size": 32, "resize": 36, "in_chans": 1, "mean": [0.449], "std": [0.226]},
                           source="test")


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_has_a_map_of_the_input_size(name):
    torch.manual_seed(0)
    model = create_model(name, 3, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    cams, logits = grad_cam(model, target_layer(model), x, torch.tensor([0, 2]))
    assert cams.shape == (2, 64, 64) and logits.shape == (2, 3)
    assert torch.isfinite(cams).all() and (cams >= 0).all()
    assert not any(p.grad is not None for p in model.parameters())  # nothing accumulated in the model
    assert len(target_layer(model)._forward_hooks) == 0  # the hook is removed after the call
    with torch.no_grad():
        assert torch.allclose(model(x), logits, atol=1e-5)  # the hook's copy changes nothing (DenseNet's in-place ReLU)


class _GapLinear(nn.Module):
    """conv -> ReLU -> global average pool -> linear: Grad-CAM is relu(sum_k W[c, k] A_k) / (h w)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_grad_cam_matches_its_closed_form():
    torch.manual_seed(0)
    model = _GapLinear().eval()
    x = torch.randn(1, 1, 16, 16)
    cams, _ = grad_cam(model, model.features, x, torch.tensor([1]))
    with torch.no_grad():
        acts = model.features(x)[0]
        expected = torch.relu((model.fc.weight[1].view(4, 1, 1) * acts).sum(0)) / (16 * 16)
    assert torch.allclose(cams[0], expected, atol=1e-6)


class _RegionModel(nn.Module):
    """Its class-0 logit is the mean brightness of one region of the input; class 1 is constant.

    Channel 0 of ``features`` is the image inside the region (zero outside), channel 1
    the image outside it; only channel 0 reaches the logit, so all Grad-CAM mass lies
    in the region.
    """

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())
        self.features = nn.Identity()
        self.covid_ray_args = {"name": "region"}

    def forward(self, x):
        shifted = x - x.amin(dim=(2, 3), keepdim=True) + 0.1  # positive everywhere
        a = self.features(torch.cat([shifted * self.region, shifted * (1 - self.region)], dim=1))
        return torch.stack([a[:, 0].mean(dim=(1, 2)), torch.zeros(len(x))], dim=1)


@pytest.fixture(autouse=True)
def _region_layer(monkeypatch):
    """The test model's Grad-CAM layer, registered as an architecture would be (its ``cam_layer``)."""
    entry = dataclasses.replace(get_model_entry("seed_cnn"), name="region", cam_layer="features")
    monkeypatch.setitem(_MODEL_REGISTRY, "region", entry)


def _member(region: torch.Tensor, weight: float = 1.0, name: str = "m") -> CamMember:
    model = _RegionModel(region)
    return CamMember(name, model, weight, ["COVID", "Normal"], PRE, "region")


def _left(n: int = 32) -> torch.Tensor:
    r = torch.zeros(n, n)
    r[:, : n // 2] = 1
    return r


def test_in_lung_share_is_one_inside_the_region_and_zero_outside():
    """64 px image, 48 px masks (sizes differ, as in Kaggle's 299 px images and 256 px masks)."""
    cam = GradCam([_member(_left())], ["COVID", "Normal"])
    gray = smooth_image(0, 64)
    left = np.zeros((48, 48), np.uint8)
    left[:, :24] = 255
    inside = cam(gray, target="COVID", mask=left)
    outside = cam(gray, target="COVID", mask=255 - left)
    assert inside.lung_share == pytest.approx(1.0, abs=0.02)
    assert outside.lung_share == pytest.approx(0.0, abs=0.02)
    assert inside.lung_area == pytest.approx(0.5, abs=0.05)
    assert inside.cam.shape == (32, 32) and inside.cam.sum() == pytest.approx(1.0)
    # Nothing supports class 1 (a constant): an empty map and no share rather than a number.
    assert cam(gray, target="Normal", mask=left).lung_share is None


def test_ensemble_map_is_the_weighted_mean_of_normalized_member_maps():
    right = 1 - _left()
    cam = GradCam([_member(_left(), 3.0, "L"), _member(right, 1.0, "R")], ["COVID", "Normal"])
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    result = cam(smooth_image(1, 64), target="COVID", mask=mask)
    assert result.member_shares == pytest.approx([1.0, 0.0], abs=0.02)
    assert result.lung_share == pytest.approx(0.75, abs=0.02)
    assert share_inside(result.cam, mask_in_crop(mask, (64, 64), PRE)) == pytest.approx(result.lung_share, abs=1e-9)
    assert cam(smooth_image(1, 64)).target == "COVID"  # default target: the ensemble's argmax


def test_member_classes_are_mapped_by_name():
    """A member whose outputs are in another order is explained for the same class name."""
    flipped = _member(_left())
    flipped.model.forward = lambda x, m=flipped.model: _RegionModel.forward(m, x).flip(1)
    flipped.classes = ["Normal", "COVID"]
    result = GradCam([flipped], ["COVID", "Normal"])(smooth_image(2, 64), target="COVID", mask=None)
    assert result.cam.sum() == pytest.approx(1.0)


def test_mask_alignment_follows_resize_and_crop():
    mask = np.zeros((300, 200), np.uint8)  # portrait: resize_square crops the long side
    mask[150:, :] = 255
    got = mask_in_crop(mask, (300, 200), PRE)
    assert got.shape == (32, 32)
    assert not got[:14].any() and got[18:].all()  # the lower half stays the lower half


def test_overlay_is_a_png_of_the_radiographs_size():
    gray = smooth_image(4, 64)[:, :50]
    cam = np.zeros((32, 32))
    cam[:, :16] = 1
    png = Image.open(io.BytesIO(overlay_png(gray, cam, PRE)))
    assert png.format == "PNG" and png.size == (50, 64) and png.mode == "RGB"
    arr = np.asarray(png).astype(int)
    # The crop spans columns ~3..47 of the image; the map is hot in its left half only.
    assert np.ptp(arr[30, 10]) > 30  # coloured
    assert np.ptp(arr[30, 45]) == 0 and arr[30, 45, 0] == gray[30, 45]  # the radiograph, untouched
    big = Image.open(io.BytesIO(overlay_png(np.zeros((2000, 1500), np.uint8), cam, PRE)))
    assert max(big.size) == 1024  # bounded size for the service's base64 answer


def test_kaggle_mask_is_found_beside_the_image(tmp_path):
    image = write_png(tmp_path / "COVID" / "images" / "COVID-1.png", smooth_image(0))
    assert find_kaggle_mask(image) is None
    mask = write_png(tmp_path / "COVID" / "masks" / "COVID-1.png", smooth_image(1))
    assert find_kaggle_mask(image) == mask
    assert find_kaggle_mask(write_png(tmp_path / "other" / "COVID-1.png", smooth_image(0))) is None


def test_ensemble_build_reports_the_mean_in_lung_share(easy_split, tmp_path):
    """Random-weight members (no training): the numbers are arbitrary, the plumbing is not."""
    from ensemble.build import BuildOptions, build_ensemble
    from covid_ray.artifacts.checkpoint import save_checkpoint
    from covid_ray.data.split import read_manifest
    from covid_ray.data.split import manifest_classes
    from test_ensemble_build import make_search

    classes = manifest_classes(read_manifest(easy_split[1]))
    trials = {}
    for i, name in enumerate(["seed_cnn", "mobilenet_v3_small"]):
        torch.manual_seed(i)
        save_checkpoint(tmp_path / name, create_model(name, len(classes)), classes=classes, image_size=40,
                        metrics={"val_macro_f1": 0.5}, epoch=1)
        trials[name] = {"config/model": name, "config/image_size": 40, "best_val_macro_f1": 0.5 - i / 10,
                        "checkpoint": str(tmp_path / name)}
    folder = make_search(tmp_path / "search", easy_split, trials, list(trials))
    # soft: both members keep a weight (the default may drop one), so both get a per-member share.
    result = build_ensemble(folder, BuildOptions(top=2, method="soft", export="none", n_boot=10, lung_cam_images=6))
    lung = result.metrics["lung_cam"]
    n_test = int((read_manifest(easy_split[1])["split"] == "test").sum())
    assert lung["images"] == 6 and lung["available"] == n_test
    assert 0 <= lung["mean"] <= 1 and set(lung["members"]) == {"seed_cnn", "mobilenet_v3_small"}
    assert json.loads((folder / "ensemble" / "metrics.json").read_text())["lung_cam"]["images"] == 6
    report = (folder / "ensemble" / "report.md").read_text()
    assert "in-lung" in report.lower() and f"6 of {n_test}" in report
    # The result carries the calibrated test probabilities the metrics were computed on.
    assert result.test_probs.shape == (n_test, len(classes)) and len(result.test_sha1) == n_test
    np.testing.assert_allclose(result.test_probs.sum(axis=1), 1.0, atol=1e-9)
    accuracy = float((result.test_probs.argmax(axis=1) == result.test_labels).mean())
    assert accuracy == pytest.approx(result.metrics["ensemble"]["accuracy"])
