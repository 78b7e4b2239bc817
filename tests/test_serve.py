"""``covid_ray.serve`` through a real uvicorn server on 127.0.0.1 and a real HTTP client (httpx):
good uploads, oversized ones, non-images, Grad-CAM, ``/model``, and 50 concurrent requests."""
from __future__ import annotations

import base64
import io
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from benchmarks.ports import free_port
from covid_ray.gradcam import gradcam_for
from covid_ray.inference import load_model
from covid_ray.predict import predict_files
from covid_ray.serve import create_app

from helpers import bomb_png, png_bytes, smooth_image
from test_predict import CLASSES, make_checkpoint, make_dataset, make_onnx_ensemble

LIMIT = 300_000  # bytes: small, so the oversized upload is cheap to send


class _Server:
    """uvicorn in a background thread on a port the OS picked; stopped by the fixture."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    data = make_dataset(base / "data")
    a = make_checkpoint(base / "train" / "a", "mobilenet_v3_small", data=data, seed=0)
    b = make_checkpoint(base / "train" / "b", "mobilenet_v3_small", in_chans=3, data=data, seed=1)
    ens = make_onnx_ensemble(base / "exp" / "ensemble", [("a", a), ("b", b)], [0.5, 0.5])
    images = sorted(data.glob("*/images/*.png"))
    return {"data": data, "ensemble": ens, "images": images, "checkpoint": a}


@pytest.fixture(scope="module")
def server(world):
    model = load_model(world["ensemble"], threads=1)
    app = create_app(model, cam=gradcam_for(model), max_upload_bytes=LIMIT, gradcam_queue=16)
    with _Server(app) as srv:
        yield srv, model


def _post(url: str, data: bytes, name: str = "x.png", **kw) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (name, data, "image/png")}, timeout=60, **kw)


def test_health_and_model_description(server, world):
    srv, _ = server
    assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{srv.url}/model").json()
    assert info["classes"] == CLASSES and info["synthetic"] is True and info["kind"] == "onnx"
    assert info["preprocess"]["image_size"] == 32 and info["preprocess"]["resize"] == 37
    assert [m["trial_id"] for m in info["members"]] == ["a", "b"]
    assert all("checkpoint" not in m for m in info["members"])  # no server paths in the answer
    assert info["gradcam"] == {"available": True}
    assert info["limits"]["max_upload_bytes"] == LIMIT
    assert info["metrics"] is None  # no metrics.json beside this export


def test_a_good_upload_gets_what_the_cli_prints(server, world):
    srv, model = server
    path = world["images"][0]
    r = _post(srv.url, path.read_bytes(), name=path.name)
    assert r.status_code == 200, r.text
    got = r.json()
    (expected,) = predict_files(model, [path])
    assert got["image"] == path.name
    assert {k: got[k] for k in ("class", "probabilities", "model", "synthetic")} == \
        {k: expected[k] for k in ("class", "probabilities", "model", "synthetic")}
    assert "gradcam_png" not in got


def test_gradcam_and_mask_uploads(server, world):
    srv, _ = server
    image = world["images"][1]
    mask = image.parent.parent / "masks" / image.name
    r = httpx.post(f"{srv.url}/predict", params={"gradcam": "true"}, timeout=60,
                   files={"file": (image.name, image.read_bytes()), "mask": (mask.name, mask.read_bytes())})
    assert r.status_code == 200, r.text
    got = r.json()
    png = Image.open(io.BytesIO(base64.b64decode(got["gradcam_png"])))
    assert png.format == "PNG" and png.size == Image.open(image).size
    assert 0 <= got["lung_cam_share"] <= 1 and 0 < got["lung_area_share"] < 1
    bad_mask = httpx.post(f"{srv.url}/predict", timeout=60,
                          files={"file": (image.name, image.read_bytes()), "mask": ("m.png", b"nope")})
    assert bad_mask.status_code == 415 and "mask" in bad_mask.json()["detail"]


def test_bad_uploads_get_4xx_with_a_message(server):
    srv, _ = server
    cases = {
        "text": (b"hello, not an image", 415, "not an image"),
        "empty": (b"", 400, "empty"),
        "truncated": (png_bytes(smooth_image(5, 64))[:70], 400, "unreadable"),
        "bomb": (bomb_png(), 413, "decompression bomb"),
        "aspect": (png_bytes(np.zeros((4, 400), np.uint8)), 400, "aspect ratio"),
    }
    for name, (data, status, words) in cases.items():
        r = _post(srv.url, data, name=f"{name}.png")
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["detail"], name
    missing = httpx.post(f"{srv.url}/predict", files={"other": ("x.png", b"...")}, timeout=30)
    assert missing.status_code == 422
    raw = httpx.post(f"{srv.url}/predict", content=b"\x89PNG...", headers={"content-type": "image/png"}, timeout=30)
    assert raw.status_code == 422


def test_oversized_uploads_get_413(server):
    srv, _ = server
    big = np.random.default_rng(0).integers(0, 256, (700, 700), dtype=np.uint8)  # noise: PNG cannot shrink it
    data = png_bytes(big)
    assert len(data) > LIMIT
    r = _post(srv.url, data, name="big.png")
    assert r.status_code == 413

    # Without Content-Length (chunked): counted while it streams.
    def chunks():
        body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
                b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--b--\r\n")
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = httpx.post(f"{srv.url}/predict", content=chunks(), timeout=30,
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert httpx.get(f"{srv.url}/health").status_code == 200  # the server is still fine


def test_fifty_concurrent_requests_are_all_answered_correctly(server, world):
    srv, model = server
    images = world["images"]
    expected = {p.name: row["probabilities"] for p, row in zip(images, predict_files(model, images))}
    names = [images[i % len(images)] for i in range(50)]

    def one(path: Path) -> tuple[str, dict]:
        r = _post(srv.url, path.read_bytes(), name=path.name)
        r.raise_for_status()
        return r.json()["image"], r.json()["probabilities"]

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, names, timeout=120))
    assert len(results) == 50
    assert [name for name, _ in results] == [p.name for p in names]
    assert all(probs == expected[name] for name, probs in results)  # no answer went to another request


def test_concurrent_gradcam_requests_are_serialized_correctly(server, world):
    srv, _ = server
    image = world["images"][2]
    single = httpx.post(f"{srv.url}/predict?gradcam=true", files={"file": ("a.png", image.read_bytes())},
                        timeout=60).json()["gradcam_png"]

    def one(_):
        return httpx.post(f"{srv.url}/predict?gradcam=true", files={"file": ("a.png", image.read_bytes())},
                          timeout=60).json()["gradcam_png"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(one, range(8), timeout=120)) == {single}


class _SlowCam:
    """A Grad-CAM stand-in that takes its time, to fill the Grad-CAM queue."""

    def __init__(self, real):
        self.real = real

    def __call__(self, gray, **kw):
        time.sleep(0.5)
        return self.real(gray, **kw)


def test_grad_cam_beyond_its_queue_gets_503_and_plain_predictions_still_flow(server, world):
    _, model = server
    app = create_app(model, cam=_SlowCam(gradcam_for(model)), gradcam_queue=1)
    image = world["images"][0].read_bytes()
    with _Server(app) as srv, ThreadPoolExecutor(max_workers=6) as pool:
        cams = [pool.submit(httpx.post, f"{srv.url}/predict?gradcam=true", files={"file": ("a.png", image)},
                            timeout=60) for _ in range(4)]
        time.sleep(0.2)
        assert _post(srv.url, image).status_code == 200  # plain predictions never wait for Grad-CAM
        codes = sorted(f.result().status_code for f in cams)
        assert codes[0] == 200 and 503 in codes
        busy = next(f.result() for f in cams if f.result().status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]


def test_a_single_checkpoint_is_served_too(world):
    """The torch path: predictions on the shared module, Grad-CAM on its own copy, concurrently."""
    model = load_model(world["checkpoint"])
    with _Server(create_app(model, cam=gradcam_for(model), gradcam_queue=16)) as srv:
        info = httpx.get(f"{srv.url}/model").json()
        assert info["kind"] == "checkpoint" and info["metrics"]["split"] == "val" and info["synthetic"] is True
        images = world["images"]
        expected = {p.name: row["probabilities"] for p, row in zip(images, predict_files(model, images))}

        def one(i: int) -> bool:
            path = images[i % len(images)]
            r = httpx.post(f"{srv.url}/predict", params={"gradcam": str(i % 2 == 0).lower()}, timeout=60,
                           files={"file": (path.name, path.read_bytes())})
            return r.status_code == 200 and r.json()["probabilities"] == expected[path.name] and \
                ("gradcam_png" in r.json()) == (i % 2 == 0)

        with ThreadPoolExecutor(max_workers=12) as pool:
            assert all(pool.map(one, range(24), timeout=120))


@pytest.mark.slow
def test_the_cli_serves_on_loopback(world):
    """``python -m covid_ray.serve`` as a user starts it (a subprocess: imports and load, ~10 s)."""
    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "covid_ray.serve", "--model", str(world["ensemble"]), "--port", str(port),
           "--threads", "1", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the service did not come up"
            time.sleep(0.3)
        r = _post(f"http://127.0.0.1:{port}", world["images"][0].read_bytes())
        assert r.status_code == 200 and r.json()["class"] in CLASSES
        if shutil.which("ss"):  # bound to loopback only, as by default
            conns = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
            assert f"127.0.0.1:{port}" in conns and f"0.0.0.0:{port}" not in conns
    finally:
        proc.terminate()
        proc.wait(timeout=20)
