"""Tests for covid_ray.models: registry, shapes, gradients, freezing, local pretrained weights."""
from __future__ import annotations

import io
import json
import urllib.request
import warnings

import pytest
import torch
import torchvision
from torch import nn

from covid_ray import models
from covid_ray.models import (
    create_model,
    get_model_entry,
    head_parameters,
    list_models,
    model_spec,
    normalization_for,
)
from covid_ray.pretrained import adapt_input_conv, cache_path

ALL_MODELS = list_models()
NUM_CLASSES = 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def no_network(monkeypatch):
    """Make every download path raise, so a test fails if one is attempted."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_registry_lists_expected_models():
    assert ALL_MODELS == sorted(
        ["seed_cnn", "resnet18", "resnet50", "efficientnet_b0", "densenet121", "mobilenet_v3_small"]
    )
    assert list_models("res*") == ["resnet18", "resnet50"]
    assert list_models("vit*") == []


def test_unknown_model_error_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'") as info:
        create_model("resnet19", NUM_CLASSES)
    for name in ALL_MODELS:
        assert name in str(info.value)


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        models.register_model(models.resnet18)


def test_normalization_for():
    assert normalization_for(1) == ((0.449,), (0.226,))
    assert normalization_for(3) == (models.IMAGENET_MEAN, models.IMAGENET_STD)
    assert normalization_for(3) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with pytest.raises(ValueError):
        normalization_for(0)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_eval_logits_shape(name, in_chans):
    model = create_model(name, NUM_CLASSES, in_chans=in_chans).eval()
    with torch.no_grad():
        for size in (64, 224):
            out = model(torch.randn(2, in_chans, size, size))
            assert out.shape == (2, NUM_CLASSES), (name, size)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_train_mode_all_parameters_get_gradients(name):
    model = create_model(name, NUM_CLASSES).train()
    logits = model(torch.randn(2, 1, 64, 64))
    nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_seed_cnn_matches_reference_layout():
    model = create_model("seed_cnn", NUM_CLASSES)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert model.classifier[0].in_features == 256 * 14 * 14
    assert model.classifier[0].out_features == 512
    assert model.classifier[2].p == 0.5
    # At 224 px the feature map is already 14x14, so the adaptive pool is an identity.
    feats = model.features(torch.randn(1, 1, 224, 224))
    assert feats.shape[-2:] == (14, 14)
    assert torch.equal(model.pool(feats), feats)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_freeze_backbone_leaves_only_head_trainable(name):
    model = create_model(name, NUM_CLASSES, freeze_backbone=True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = {id(p) for p in head_parameters(model)}
    assert trainable == head and head
    assert len(trainable) < len(list(model.parameters()))


def test_first_conv_takes_in_chans():
    model = create_model("resnet18", NUM_CLASSES)
    assert model.conv1.in_channels == 1
    assert create_model("resnet18", NUM_CLASSES, in_chans=3).conv1.in_channels == 3


def _random_tv_resnet18(path):
    """A random 3-channel, 1000-class torchvision resnet18 state_dict saved to ``path``."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    return state


def test_pretrained_local_file_adapts_conv_and_replaces_head(tmp_path, no_network):
    path = tmp_path / "resnet18_imagenet.pth"
    state = _random_tv_resnet18(path)
    model = create_model("resnet18", NUM_CLASSES, pretrained=str(path), in_chans=1)
    own = model.state_dict()
    assert torch.allclose(own["conv1.weight"], state["conv1.weight"].sum(dim=1, keepdim=True))
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias"):
        assert torch.equal(own[key], state[key])
    assert own["fc.weight"].shape == (NUM_CLASSES, 512)
    assert not torch.equal(own["fc.weight"], state["fc.weight"][:NUM_CLASSES])
    assert model.covid_ray_pretrained == str(path)


def test_pretrained_same_classes_keeps_head(tmp_path):
    path = tmp_path / "r18.pth"
    state = _random_tv_resnet18(path)
    model = create_model("resnet18", 1000, pretrained=path, in_chans=3)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_pretrained_torchvision_cache_file(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cache_path(get_model_entry("resnet18")) == expected
    expected.parent.mkdir(parents=True)
    state = _random_tv_resnet18(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = create_model("resnet18", NUM_CLASSES, pretrained=True)
    assert torch.equal(model.layer2[0].conv1.weight, state["layer2.0.conv1.weight"])


@pytest.mark.parametrize("pretrained", [True, "torchvision", "missing.pth"])
def test_missing_pretrained_file_warns_once_without_download(tmp_path, monkeypatch, no_network, pretrained):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if pretrained == "missing.pth":
        pretrained = tmp_path / pretrained
        looked_for = str(pretrained)
    else:
        looked_for = str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = create_model("resnet18", NUM_CLASSES, pretrained=pretrained)
    assert len(caught) == 1
    assert looked_for in str(caught[0].message)
    assert caught[0].filename == __file__  # stacklevel points at the caller
    assert model.covid_ray_pretrained is None


def test_seed_cnn_pretrained_true_warns_once(no_network):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_model("seed_cnn", NUM_CLASSES, pretrained=True)
    assert len(caught) == 1 and "no torchvision pretrained weights" in str(caught[0].message)


def test_seed_cnn_loads_its_own_state_dict(tmp_path):
    source = create_model("seed_cnn", NUM_CLASSES)
    torch.save(source.state_dict(), tmp_path / "seed.pth")
    loaded = create_model("seed_cnn", NUM_CLASSES, pretrained=tmp_path / "seed.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_pretrained_unexpected_keys_raise(tmp_path):
    path = tmp_path / "bad.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="extra.weight"):
        create_model("resnet18", NUM_CLASSES, pretrained=path)


def test_pretrained_missing_body_keys_raise(tmp_path):
    path = tmp_path / "partial.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer3.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="layer3.0.conv1.weight"):
        create_model("resnet18", NUM_CLASSES, pretrained=path)


def test_densenet_old_style_keys_are_remapped(tmp_path):
    state = torchvision.models.densenet121(weights=None).state_dict()
    # torchvision's published file predates both the key rename and num_batches_tracked.
    old = {
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    torch.save(old, tmp_path / "densenet121.pth")
    model = create_model("densenet121", NUM_CLASSES, pretrained=tmp_path / "densenet121.pth", in_chans=3)
    key = "features.denseblock1.denselayer1.conv2.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def test_adapt_input_conv_rules():
    weight = torch.randn(8, 3, 3, 3)
    assert torch.equal(adapt_input_conv(3, weight), weight)
    assert torch.allclose(adapt_input_conv(1, weight), weight.sum(1, keepdim=True))
    five = adapt_input_conv(5, weight)
    assert five.shape == (8, 5, 3, 3)
    assert torch.allclose(five[:, 3:], weight[:, :2] * 3 / 5)
    # A gray image through the summed kernel responds as its RGB copy does through the original.
    gray = torch.randn(1, 1, 9, 9)
    assert torch.allclose(
        nn.functional.conv2d(gray, adapt_input_conv(1, weight)),
        nn.functional.conv2d(gray.expand(1, 3, 9, 9), weight),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="cannot adapt"):
        adapt_input_conv(2, torch.randn(8, 4, 3, 3))


@pytest.mark.parametrize("name", ["seed_cnn", "resnet18", "mobilenet_v3_small"])
def test_rebuild_from_recorded_args_gives_identical_outputs(name):
    kwargs = {"dropout": 0.3} if name == "seed_cnn" else {}
    model = create_model(name, NUM_CLASSES, in_chans=1, freeze_backbone=True, **kwargs)
    spec = model_spec(model)
    assert json.loads(json.dumps(spec)) == spec
    assert spec["name"] == name and spec["num_classes"] == NUM_CLASSES and spec["in_chans"] == 1

    buffer = io.BytesIO()
    torch.save({"model": spec, "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=True)

    rebuilt = create_model(**checkpoint["model"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    assert model_spec(rebuilt) == spec
    x = torch.randn(2, 1, 64, 64)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_create_model_drops_none_kwargs_and_rejects_non_json():
    model = create_model("seed_cnn", NUM_CLASSES, dropout=None)
    assert "dropout" not in model_spec(model)
    assert model.classifier[2].p == 0.5
    with pytest.raises(ValueError, match="JSON"):
        create_model("seed_cnn", NUM_CLASSES, dropout=torch.tensor(0.1))


def test_model_spec_requires_registry_model():
    with pytest.raises(ValueError, match="not built by"):
        model_spec(nn.Linear(2, 2))
