"""ImageNet weights: cache, a real download from a server on 127.0.0.1, hash check, offline fallback in seconds."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from benchmarks.ports import free_port
from covid_ray import pretrained
from covid_ray.models import create_model, get_model_entry

NUM_CLASSES = 4


class _Files(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def file_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/served``; yields (base URL, folder, request log)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = type("Handler", (_Files,), {"requests": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **kw: handler(*a, directory=str(folder), **kw))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder, handler.requests
    server.shutdown()
    server.server_close()


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(pretrained.MIRROR_ENV, raising=False)
    return tmp_path / "torch"


def _weights_file(folder: Path) -> tuple[Path, dict]:
    """A random 3-channel torchvision resnet18 state_dict, named with its own sha256 prefix (torch.hub's rule)."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = folder / f"resnet18-{digest}.pth"
    tmp.rename(path)
    return path, state


def test_imagenet_url_is_torchvisions_and_a_mirror_keeps_the_file_name(monkeypatch):
    entry = get_model_entry("resnet18")
    assert pretrained.imagenet_url(entry) == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    monkeypatch.setenv(pretrained.MIRROR_ENV, "http://mirror.example/tv/models")
    assert pretrained.imagenet_url(entry) == "http://mirror.example/tv/models/resnet18-f37072fd.pth"
    assert pretrained.imagenet_url(get_model_entry("seed_cnn")) is None


def test_imagenet_weights_download_once_check_the_hash_and_load(file_server, torch_home, monkeypatch):
    base, folder, requests = file_server
    served, state = _weights_file(folder)
    monkeypatch.setattr(pretrained, "imagenet_url", lambda entry: f"{base}/{served.name}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        model = create_model("resnet18", NUM_CLASSES, pretrained="imagenet", in_chans=1)
    cached = torch_home / "hub" / "checkpoints" / served.name
    assert cached.read_bytes() == served.read_bytes()
    assert model.covid_ray_pretrained == str(cached)
    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.allclose(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))  # 1-channel adaptation
    create_model("resnet18", NUM_CLASSES, pretrained="imagenet")
    assert requests == [f"/{served.name}"]  # the second model came from the cache


def test_a_file_with_the_wrong_hash_is_refused_with_one_warning(file_server, torch_home, monkeypatch):
    base, folder, _ = file_server
    (folder / "resnet18-f37072fd.pth").write_bytes(b"not the published weights")
    monkeypatch.setenv(pretrained.MIRROR_ENV, base)
    with pytest.warns(UserWarning, match=r"resnet18-f37072fd.pth failed: RuntimeError.*using random init"):
        model = create_model("resnet18", NUM_CLASSES, pretrained="imagenet")
    assert model.covid_ray_pretrained is None
    assert not (torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()


def test_offline_a_server_that_never_answers_costs_one_timeout_then_nothing(torch_home, monkeypatch):
    silent = socket.socket()  # accepts connections (the kernel's backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setenv(pretrained.MIRROR_ENV, f"http://127.0.0.1:{silent.getsockname()[1]}/")
    monkeypatch.setenv(pretrained.TIMEOUT_ENV, "1.5")
    try:
        start = time.monotonic()
        with pytest.warns(UserWarning, match="download of .* failed.*using random init"):
            model = create_model("resnet18", NUM_CLASSES, pretrained="imagenet")
        first = time.monotonic() - start
        start = time.monotonic()
        with pytest.warns(UserWarning, match="unreachable recently.*using random init"):
            create_model("resnet50", NUM_CLASSES, pretrained="imagenet")  # same host: no second wait
        second = time.monotonic() - start
    finally:
        silent.close()
    assert model.covid_ray_pretrained is None
    assert 1.0 <= first < 10.0, first
    assert second < 1.0, second


def test_unreachable_address_returns_within_seconds(torch_home, monkeypatch):
    port = free_port("127.0.0.1")  # a port nobody listens on: connection refused
    monkeypatch.setenv(pretrained.MIRROR_ENV, f"http://127.0.0.1:{port}/")
    start = time.monotonic()
    with pytest.warns(UserWarning, match="failed: URLError"):
        model = create_model("efficientnet_b0", NUM_CLASSES, pretrained="imagenet")
    assert time.monotonic() - start < 5.0
    assert model.covid_ray_pretrained is None


def test_none_means_random_init_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = create_model("resnet18", NUM_CLASSES, pretrained="none")
    assert model.covid_ray_pretrained is None


def test_the_registry_names_each_architectures_grad_cam_layer():
    from covid_ray.models import cam_layer, list_models

    for name in list_models():
        model = create_model(name, NUM_CLASSES)
        layer = cam_layer(model)
        out = {}
        handle = layer.register_forward_hook(lambda m, i, o: out.update(shape=o.shape))
        model.eval()(torch.zeros(1, 1, 64, 64))
        handle.remove()
        assert len(out["shape"]) == 4, name  # a spatial feature map (B, K, h, w)
