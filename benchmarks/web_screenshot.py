"""The README's picture of the service's page: ``python -m benchmarks.web_screenshot`` (``make screenshot``).

Serves a model with ``python -m covid_ray.serve`` on 127.0.0.1, opens ``/`` in Debian's
chromium (headless, through Playwright), uploads a test-split radiograph of the model's
own search with its lung mask, and saves the page as ``docs/web-page.png``. When the
model has an out-of-distribution check, a second picture, ``docs/web-page-abstain.png``,
shows the page's answer to an image that is not a radiograph.

The model is ``results/demo/ensemble`` once ``make demo`` has built it (``--model`` for
another exported ensemble of a search). Without it, a small stand-in search is trained
here without Ray (two ResNet-18s at 64 px, a few epochs on the synthetic 5% set, under
``data/web_screenshot/``) and built with ``ensemble.build``. Both are trained on
synthetic images, and the page says so (from the model's metadata). The uploaded image is the first COVID image of the
search's test split, whatever the model answers for it (not chosen by its result); the
second picture's image is a page of text from ``ensemble.ood_sets``.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from benchmarks.common import REPO
from benchmarks.serve import Service
from covid_ray.artifacts.bundle import GRAPH_FILES, PREPROCESS_FILE, read_json_object
from covid_ray.artifacts.experiment import ENSEMBLE_DIRNAME, read_experiment

DEMO_ENSEMBLE = REPO / "results" / "demo" / ENSEMBLE_DIRNAME
WORK = REPO / "data" / "web_screenshot"
OUT = REPO / "docs" / "web-page.png"
# (model, seed, lr, epochs): benchmarks.ensemble's best members, fewer of them and shorter.
STANDIN_MEMBERS = [("resnet18", 0, 1e-3, 4), ("resnet18", 1, 2e-3, 4)]
VIEWPORT = {"width": 1280, "height": 900}
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]


def has_export(folder: Path) -> bool:
    return any((folder / name).is_file() for name in GRAPH_FILES)


def build_standin(work: Path = WORK) -> Path:
    """A small finished search on the synthetic 5% set, built into ``work/search/ensemble``."""
    from benchmarks.ensemble import make_search
    from covid_ray.data.prepare import DEFAULT_SYNTHETIC_DIR, ensure_synthetic
    from ensemble.build import BuildOptions, build_ensemble

    data = ensure_synthetic(REPO / DEFAULT_SYNTHETIC_DIR)
    folder = make_search(data, work, image_size=64, cache_dir=work / "cache", members=STANDIN_MEMBERS)
    if not has_export(folder / ENSEMBLE_DIRNAME):
        build_ensemble(folder, BuildOptions(top=len(STANDIN_MEMBERS), n_boot=200, latency_repeats=0,
                                            data_cache_dir=str(work / "cache")))
    return folder / ENSEMBLE_DIRNAME


def pick_radiograph(ensemble_dir: Path) -> tuple[Path, Path]:
    """(image, mask) of the first COVID image with a mask in the search's test split."""
    from covid_ray.data.scan import find_dataset_root
    from covid_ray.data.split import read_manifest

    experiment = read_experiment(ensemble_dir.parent)
    manifest = read_manifest(experiment.split)
    root = find_dataset_root(experiment.data)
    rows = manifest[(manifest["split"] == "test") & (manifest["mask"] != "")].sort_values("path")
    covid = rows[rows["label"] == "COVID"]
    row = (covid if len(covid) else rows).iloc[0]
    return root / row["path"], root / row["mask"]


def not_a_radiograph() -> bytes:
    """A PNG that is plainly no chest radiograph: a page of text from ensemble.build's OOD benchmark sets."""
    from ensemble.ood_sets import text_pages
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(text_pages(1)[0]).save(buf, format="PNG")
    return buf.getvalue()


def shoot(url: str, image: Path, mask: Path, out: Path, *, chromium: str, abstain_out: Path | None) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
        page.set_default_timeout(120_000)
        page.goto(url + "/")
        page.locator("#model-facts dt").first.wait_for()
        page.set_input_files("#file", str(image))
        page.set_input_files("#mask", str(mask))
        page.click("#submit")
        page.locator("#result:not([hidden]), #error:not([hidden])").first.wait_for()
        page.locator("#submit:enabled").wait_for()
        page.evaluate("document.fonts.ready")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}: "
              f"{page.locator('#verdict-class').text_content()!r} for {image.name}")
        if abstain_out is not None:
            page.click("#clear")
            page.set_input_files("#file", {"name": "letter.png", "mimeType": "image/png", "buffer": not_a_radiograph()})
            page.click("#submit")
            page.locator("#result:not([hidden]), #error:not([hidden])").first.wait_for()
            page.locator("#submit:enabled").wait_for()
            page.locator("#result").screenshot(path=str(abstain_out))
            print(f"wrote {abstain_out.relative_to(REPO) if abstain_out.is_relative_to(REPO) else abstain_out}: "
                  f"{page.locator('#verdict-class').text_content()!r}")
        browser.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.web_screenshot", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="an exported ensemble folder of a search (default: results/demo/ensemble, else a stand-in)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--chromium", default="/usr/bin/chromium", help="Debian's chromium (never `playwright install`)")
    args = p.parse_args(argv)
    if args.model:
        model = Path(args.model)
    elif has_export(DEMO_ENSEMBLE):
        model = DEMO_ENSEMBLE
    else:
        print(f"no exported ensemble in {DEMO_ENSEMBLE.relative_to(REPO)}: training a small stand-in search "
              f"under {WORK.relative_to(REPO)} (synthetic data, no Ray)", flush=True)
        model = build_standin()
    if not Path(args.chromium).is_file():
        print(f"error: no browser at {args.chromium}; install Debian's chromium (`make browser`)", file=sys.stderr)
        return 2
    image, mask = pick_radiograph(model)
    out = Path(args.out)
    # A path relative to the repository: the page shows the model's path as the service reports it.
    served = model.resolve().relative_to(REPO) if model.resolve().is_relative_to(REPO) else model
    with Service(served, threads=2, gradcam=True) as service:
        ood = "ood" in read_json_object(model / PREPROCESS_FILE)
        shoot(service.url, image, mask, out, chromium=args.chromium,
              abstain_out=out.with_name(out.stem + "-abstain.png") if ood else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
