"""The page at ``/`` of ``covid_ray.serve`` in a real browser: Debian's chromium, headless,
driven by Playwright, against a real uvicorn server on 127.0.0.1 serving a real
``ensemble.build`` export (OOD score, metrics.json, MODEL_CARD.md) of a tiny search
trained here in seconds on tiny synthetic radiographs.

Covered: the model panel and its card, a radiograph upload with its mask (class, bars,
overlay with the lung outline, in-lung share, OOD score), a non-radiograph (abstention),
a non-image (the service's message), a hostile file name (shown as text, never run);
and without a browser: security headers, the card routes, the outline ``overlay_png`` draws.

The browser is ``/usr/bin/chromium`` (or ``$COVID_RAY_CHROMIUM``); never ``playwright
install``, which downloads a browser build. A missing browser fails these tests with a
message rather than skipping them: CI installs it (``make test``).
"""
from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from covid_ray.artifacts.bundle import CARD_FILE
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.data.io import read_grayscale
from covid_ray.data.layout import SYNTHETIC_MARKER
from covid_ray.data.prepare import split_dataset
from covid_ray.gradcam import OUTLINE_RGB, gradcam_for, lung_outline, overlay_png
from covid_ray.inference import load_model
from covid_ray.serve import create_app
from covid_ray.web import CSP, card_page

from helpers import make_kaggle, png_bytes
from test_ensemble_build import _train, make_search
from test_predict import CLASSES
from test_serve import _Server

CHROMIUM = os.environ.get("COVID_RAY_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]
HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"
MAGENTA = tuple(round(255 * v) for v in OUTLINE_RGB)
LIMIT = 300_000  # bytes: small, so the oversized upload is cheap to send
TIMEOUT_MS = 60_000  # Grad-CAM on a loaded 2-core machine: seconds, not minutes
# (trial, model, in_chans, seed): a few epochs at 32 px, seconds each.
TRIALS = [("t0", "resnet18", 1, 0), ("t1", "mobilenet_v3_small", 3, 1)]


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny search over synthetic radiographs, built by ensemble.build (with its OOD score), served by uvicorn."""
    from ensemble.build import BuildOptions, build_ensemble

    base = tmp_path_factory.mktemp("web")
    data = make_kaggle(base / "data", {c: 10 for c in CLASSES}, size=64, radiographs=True)
    (data / SYNTHETIC_MARKER).write_text("{}\n")
    split = base / "split.csv"
    split_dataset(data, split, workers=1)
    trials = {}
    for trial_id, name, in_chans, seed in TRIALS:
        metrics = _train(data, split, base / trial_id, name, 32, in_chans, 3, seed, 2e-3)
        trials[trial_id] = {"config/model": name, "config/image_size": 32, "checkpoint": str(base / trial_id),
                            "best_val_macro_f1": metrics["val_macro_f1"]}
    folder = make_search(base / "search", (data, split), trials, list(trials))
    build_ensemble(folder, BuildOptions(top=2, export="onnx", n_boot=20, latency_repeats=0, calibration_images=16,
                                        lung_cam_images=0, shortcut=False))
    model = load_model(folder / "ensemble", threads=1)
    assert model.ood is not None, "ensemble.build exported no OOD score"
    with _Server(create_app(model, cam=gradcam_for(model), max_upload_bytes=LIMIT)) as srv:
        yield {"url": srv.url, "model": model, "data": data}


def _predict(site, image: Path, mask: Path | None = None) -> dict:
    files = {"file": (image.name, image.read_bytes())}
    if mask is not None:
        files["mask"] = (mask.name, mask.read_bytes())
    r = httpx.post(f"{site['url']}/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def radiographs(site) -> list[tuple[Path, Path]]:
    """(image, mask) of the dataset's radiographs that the model accepts as in distribution.

    The threshold accepts 95% of the validation radiographs, so a few may be refused:
    the upload tests use accepted ones (what the page shows for them is what they test).
    """
    images = sorted(site["data"].glob("*/images/*.png"))
    accepted = [(p, p.parent.parent / "masks" / p.name) for p in images if _predict(site, p)["in_distribution"]]
    assert len(accepted) >= len(images) // 2, f"the model accepts only {len(accepted)} of {len(images)} radiographs"
    return accepted


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e '.[dev]'` installs it (the [dev] extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no browser at {CHROMIUM}: these tests drive Debian's chromium. Install it with "
                    "`apt-get install -y chromium` (`make test` does so when it can), or point "
                    "COVID_RAY_CHROMIUM at a chromium binary. Do not run `playwright install` (it downloads).")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield b
        b.close()


class Tab:
    """One page on the site, recording script errors, console errors (CSP violations) and dialogs."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(url + "/")
        self.page.locator("#model-facts dt").first.wait_for()  # GET /model answered

    def _console(self, msg) -> None:
        # The browser logs every 4xx answer; those are the tests' own bad uploads.
        if msg.type == "error" and "responded with a status of 4" not in msg.text:
            self.errors.append(msg.text)

    def upload(self, file, mask=None) -> None:
        """Choose the files (paths, or Playwright's {name, mimeType, buffer}) and press Classify."""
        self.page.set_input_files("#file", file)
        if mask is not None:
            self.page.set_input_files("#mask", mask)
        self.page.click("#submit")
        self.page.locator("#result:not([hidden]), #error:not([hidden])").first.wait_for()
        self.page.locator("#submit:enabled").wait_for()

    def drop(self, zone: str, name: str, data: bytes) -> None:
        """Drop a file on a drop zone as a drag from the desktop does (a DataTransfer with one File)."""
        self.page.evaluate("""([zone, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            const target = document.querySelector(zone);
            for (const type of ["dragover", "drop"]) {
                target.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
            }
        }""", [zone, name, base64.b64encode(data).decode("ascii")])

    def text(self, selector: str) -> str:
        return self.page.locator(selector).text_content()


@pytest.fixture
def tab(browser, site):
    t = Tab(browser, site["url"])
    yield t
    t.context.close()


def _number_after(word: str, text: str) -> float:
    """The number the page prints after ``word`` (four significant digits)."""
    match = re.search(rf"{word} (-?[0-9.]+(?:e[-+]?[0-9]+)?)", text)
    assert match, f"no number after {word!r} in {text!r}"
    return float(match.group(1))


def _png_in_img(page, selector: str) -> np.ndarray:
    src = page.locator(selector).get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


# --------------------------------------------------------------------------- tests in the browser


@pytest.mark.slow
def test_the_page_describes_the_model_and_links_its_card(tab, site):
    page = tab.page
    info = httpx.get(f"{site['url']}/model", timeout=30).json()
    assert page.title().startswith("covid-ray")
    assert page.locator("#ruo").is_visible() and "Research use only" in tab.text("#ruo")
    assert info["synthetic"] is True and page.locator("#synthetic-badge").is_visible()
    facts = dict(zip(page.locator("#model-facts dt").all_text_contents(),
                     page.locator("#model-facts dd").all_text_contents()))
    assert facts["Model"] == info["model"] == str(site["model"].path)
    assert facts["Classes"] == ", ".join(CLASSES)
    assert all(f"{m['trial_id']} · {m['model']}" in facts["Members"] for m in info["members"])
    assert facts["Out-of-distribution check"].startswith(f"{info['ood']['score']}, abstains above ")
    assert facts["Grad-CAM"] == "available"
    shown = dict(zip(page.locator("#metrics th").all_text_contents(), page.locator("#metrics td").all_text_contents()))
    numbers = {k: v for k, v in info["metrics"].items() if isinstance(v, float)}
    assert {"accuracy", "macro_f1", "covid_sensitivity"} <= set(numbers) and len(shown) >= len(numbers)
    labels = {"accuracy": "Accuracy", "macro_f1": "Macro-F1", "covid_sensitivity": "COVID sensitivity"}
    for key, label in labels.items():
        assert float(shown[label]) == pytest.approx(numbers[key], rel=1e-3, abs=1e-4)
    assert tab.text("#metrics-caption") == f"test split, {info['metrics']['test_images']} images (synthetic data)"
    page.click("#card-link")
    page.wait_for_url("**/model-card")
    card = (site["model"].path.parent / CARD_FILE).read_text()
    assert tab.text("#card") == card and "# Model card" in card  # ensemble.build's card, shown verbatim
    assert tab.errors == []


@pytest.mark.slow
def test_a_radiograph_with_its_mask_gets_class_bars_overlay_and_lung_share(tab, site, radiographs):
    image, mask = radiographs[0]
    expected = _predict(site, image, mask)
    tab.upload(str(image), str(mask))
    page = tab.page
    assert page.locator("#error").is_hidden()
    assert tab.text("#result-name") == image.name
    assert tab.text("#verdict-label") == "Predicted class"
    assert tab.text("#verdict-class") == expected["class"] in CLASSES
    assert page.locator("#prob-note").is_hidden()
    shown = dict(zip(page.locator("#prob-list .name").all_text_contents(),
                     page.locator("#prob-list .value").all_text_contents()))
    assert shown == {c: f"{100 * p:.1f}%" for c, p in expected["probabilities"].items()}
    assert page.locator("#prob-list li.top .name").text_content() == expected["class"]
    top_width = page.locator("#prob-list li.top .fill").evaluate("e => e.getBoundingClientRect().width")
    track = page.locator("#prob-list li.top .track").evaluate("e => e.getBoundingClientRect().width")
    assert top_width == pytest.approx(track * expected["probabilities"][expected["class"]], abs=1.5)
    ood = tab.text("#ood")
    assert expected["in_distribution"] is True and ood.endswith("within the training distribution.")
    assert _number_after("Score", ood) == pytest.approx(expected["ood_score"], rel=1e-3)
    assert _number_after("threshold", ood) == pytest.approx(expected["ood_threshold"], rel=1e-3)
    # The overlay, decoded by the browser at the radiograph's size, with the lung outline drawn in it.
    overlay = page.locator("#overlay")
    assert overlay.is_visible()
    assert overlay.evaluate("img => img.complete && img.naturalWidth") == Image.open(image).size[0]
    rgb = _png_in_img(page, "#overlay")
    outline = lung_outline(read_grayscale(mask)[0].array, rgb.shape[:2])
    assert outline.any() and (rgb[outline] == MAGENTA).all()
    assert page.locator("#preview").evaluate("img => img.complete && img.naturalWidth") == 64
    assert "magenta line is the lung outline" in tab.text("#cam-caption")
    share = tab.text("#lung-share")
    assert share.startswith(f"{100 * expected['lung_cam_share']:.1f}% of the Grad-CAM evidence lies inside the lungs")
    assert f"cover {100 * expected['lung_area_share']:.1f}%" in share
    assert tab.errors == []


@pytest.mark.slow
def test_a_non_radiograph_gets_no_prediction_and_the_reason(tab, site):
    from ensemble.ood_sets import text_pages

    page_of_text = png_bytes(text_pages(1)[0])  # one of ensemble.build's OOD benchmark images
    expected = httpx.post(f"{site['url']}/predict", files={"file": ("letter.png", page_of_text)}, timeout=60).json()
    assert expected["in_distribution"] is False and expected["class"] is None  # the model's own verdict
    tab.upload({"name": "letter.png", "mimeType": "image/png", "buffer": page_of_text})
    page = tab.page
    assert page.locator("#verdict").get_attribute("class") == "verdict abstain"
    assert tab.text("#verdict-label") == "No prediction"
    assert tab.text("#verdict-class") == "Not a chest radiograph, no prediction"
    assert tab.text("#verdict-reason") == expected["abstain_reason"]
    assert page.locator("#prob-note").is_visible() and "not a prediction" in tab.text("#prob-note")
    assert "Not applicable" in tab.text("#lung-share")
    assert page.locator("#prob-list li.top").count() == 0  # no class is highlighted
    assert tab.text("#ood").endswith("outside the training distribution.")
    assert _number_after("Score", tab.text("#ood")) == pytest.approx(expected["ood_score"], rel=1e-3)
    assert _number_after("threshold", tab.text("#ood")) == pytest.approx(expected["ood_threshold"], rel=1e-3)
    assert tab.errors == []


@pytest.mark.slow
def test_a_non_image_shows_the_services_message_and_the_page_still_works(tab, radiographs):
    tab.upload({"name": "notes.png", "mimeType": "image/png", "buffer": b"hello, not an image"})
    page = tab.page
    assert page.locator("#error").is_visible() and page.locator("#result").is_hidden()
    assert tab.text("#error-message") == "415: file: not an image (unrecognised content)"
    tab.upload({"name": "empty.png", "mimeType": "image/png", "buffer": b""})
    assert tab.text("#error-message") == "400: file: empty file (0 bytes)"
    noise = png_bytes(np.random.default_rng(0).integers(0, 256, (700, 700), dtype=np.uint8))  # PNG cannot shrink it
    assert len(noise) > LIMIT
    tab.upload({"name": "big.png", "mimeType": "image/png", "buffer": noise})
    assert tab.text("#error-message") == "413: Content Too Large (this service accepts uploads up to 0.3 MB)"
    tab.upload(str(radiographs[0][0]))  # the next good upload replaces the message with a result
    assert page.locator("#error").is_hidden() and page.locator("#result").is_visible()
    assert tab.text("#verdict-class") in CLASSES
    assert "Upload the lung mask too" in tab.text("#lung-share")
    assert tab.errors == []


@pytest.mark.slow
def test_a_dropped_file_with_a_hostile_name_is_shown_as_text(tab, radiographs):
    image, _ = radiographs[-1]
    tab.drop("#drop-file", HOSTILE_NAME, image.read_bytes())
    page = tab.page
    assert page.locator("#file").evaluate("input => input.files.length && input.files[0].name") == HOSTILE_NAME
    page.click("#submit")
    page.locator("#result:not([hidden])").wait_for()
    assert tab.text("#result-name") == HOSTILE_NAME
    assert tab.text("#file-name").startswith(HOSTILE_NAME)
    assert page.locator("img[src='x']").count() == 0  # no element was made from the name
    assert page.locator("#result-name").evaluate("e => e.children.length") == 0
    assert tab.dialogs == [] and tab.errors == []


# --------------------------------------------------------------------------- without a browser


@pytest.mark.slow
def test_security_headers_and_the_card_routes(site):
    url = site["url"]
    r = httpx.get(url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP and "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    js = httpx.get(url + "/static/app.js", timeout=30)
    assert js.headers["content-type"].startswith("text/javascript")
    assert ".innerHTML =" not in js.text and "insertAdjacentHTML" not in js.text  # the DOM is built from text
    assert httpx.get(url + "/static/../serve.py", timeout=30).status_code == 404
    missing = httpx.get(url + "/static/index.py", timeout=30)
    assert missing.status_code == 404 and "no static file 'index.py'" in missing.json()["detail"]
    card = (site["model"].path.parent / CARD_FILE).read_text()
    md = httpx.get(url + "/model-card.md", timeout=30)
    assert md.headers["content-type"].startswith("text/markdown") and md.text == card
    assert httpx.get(url + "/model-card", timeout=30).headers["content-security-policy"] == CSP
    assert httpx.get(url + "/model", timeout=30).json()["model_card"] == {"available": True, "url": "/model-card"}


@pytest.mark.slow
def test_no_card_is_a_404_with_a_message(site, tmp_path):
    ckpt = load_model(site["model"].meta["members"][0]["checkpoint"])
    with _Server(create_app(ckpt)) as srv:
        r = httpx.get(f"{srv.url}/model-card", timeout=30)
        assert r.status_code == 404 and "single training checkpoint" in r.json()["detail"]
        assert httpx.get(f"{srv.url}/model", timeout=30).json()["model_card"]["available"] is False
    bare = tmp_path / "ensemble"
    bare.mkdir()
    for name in (site["model"].path.name, "preprocess.json"):  # the graph without its card
        (bare / name).write_bytes((site["model"].path.parent / name).read_bytes())
    with _Server(create_app(load_model(bare, threads=1))) as srv:
        r = httpx.get(f"{srv.url}/model-card", timeout=30)
        assert r.status_code == 404
        assert r.json()["detail"].startswith(f"no model card: no {CARD_FILE} beside {site['model'].path.name}")


def test_the_card_is_escaped():
    page = card_page("# Card\n<script>alert(1)</script> <img src=x onerror=alert(2)>")
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=alert(2)&gt;" in page
    assert "<script>alert" not in page and "<img src=x" not in page


def test_the_overlay_draws_the_lung_outline_only_with_a_mask(tmp_path):
    data = make_kaggle(tmp_path, {"COVID": 1}, size=64, radiographs=True)
    gray = read_grayscale(data / "COVID" / "images" / "COVID-1.png")[0].array
    lungs = read_grayscale(data / "COVID" / "masks" / "COVID-1.png")[0].array
    pre = Preprocess.from_dict({"image_size": 32, "in_chans": 1, "mean": [0.449], "std": [0.226]}, source="test")
    cam = np.random.default_rng(0).random((32, 32))
    plain = np.asarray(Image.open(io.BytesIO(overlay_png(gray, cam, pre))))
    drawn = np.asarray(Image.open(io.BytesIO(overlay_png(gray, cam, pre, mask=lungs))))
    outline = lung_outline(lungs, gray.shape)
    inside = np.asarray(Image.fromarray(lungs).resize(gray.shape[::-1], Image.Resampling.BILINEAR)) >= 128
    assert outline.any() and not (outline & ~inside).any()  # the border lies on the mask
    assert outline.sum() < 0.5 * inside.sum()  # a line, not the filled mask
    assert (drawn[outline] == MAGENTA).all()
    assert (drawn[~outline] == plain[~outline]).all()  # nothing else changed
    assert not (plain == MAGENTA).all(axis=-1).any()  # the colour the map never takes
    # A mask at another size (the Kaggle masks are 256 px for 299 px images) is resized to the image.
    small = np.asarray(Image.fromarray(lungs).resize((40, 40), Image.Resampling.NEAREST))
    resized = np.asarray(Image.open(io.BytesIO(overlay_png(gray, cam, pre, mask=small))))
    assert (resized == MAGENTA).all(axis=-1).sum() == pytest.approx(outline.sum(), rel=0.35)
