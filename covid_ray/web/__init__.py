"""The browser page of ``covid_ray.serve``: ``/`` (upload a radiograph, see the answer), its
static files, and the model card of the exported ensemble.

The page is plain HTML, CSS and JavaScript in this folder (no build step, nothing from a
CDN: the service may run without internet). It talks to the service's own JSON API
(``GET /model``, ``POST /predict?gradcam=true``) and builds its DOM with ``textContent``
only: every string derived from an upload (file name, messages) is text, never markup.

Routes added by :func:`add_web_routes`:

* ``GET /``: the page; ``GET /static/app.js`` and ``/static/style.css``: its files.
* ``GET /model-card``: ``MODEL_CARD.md`` of the exported ensemble (``ensemble.build``
  writes it beside ``preprocess.json``) as an HTML page with the Markdown escaped;
  ``GET /model-card.md``: the file itself. 404 with a message when there is none.

The page and the card are sent with a strict Content-Security-Policy: scripts and styles
from this origin only (no inline script can run, so an injected tag would be inert even
if one slipped through), images from this origin, ``data:`` (the Grad-CAM overlay) and
``blob:`` (the local preview of the upload), requests to this origin only, no framing,
and Trusted Types required for every DOM sink that parses HTML, so ``innerHTML`` with a
string throws in browsers that enforce it.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path

from fastapi import FastAPI, HTTPException, Response

from covid_ray.artifacts.bundle import CARD_FILE
from covid_ray.inference import LoadedModel

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent
STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "form-action 'none'",  # the form is submitted by fetch(), never navigated
    "base-uri 'none'",
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",
    "trusted-types 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # for browsers without frame-ancestors
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Files change with the installed version, the card with a rebuild: revalidate each time.
    "Cache-Control": "no-cache",
}


def model_card_path(model: LoadedModel) -> Path | None:
    """Where the model's card would be: beside an exported ensemble's graph; a checkpoint has none."""
    return model.path.parent / CARD_FILE if model.kind == "onnx" else None


def _read_card(model: LoadedModel) -> str:
    path = model_card_path(model)
    if path is None:
        raise HTTPException(404, detail=f"no model card: this service runs a single training checkpoint "
                                        f"({model.path.name}); ensemble.build writes {CARD_FILE} with an "
                                        f"exported ensemble")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HTTPException(404, detail=f"no model card: no {CARD_FILE} beside {model.path.name} "
                                        f"(ensemble.build writes it into the exported ensemble folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("cannot read the model card %s: %s", path, exc)
        raise HTTPException(500, detail=f"{CARD_FILE} beside {model.path.name} is unreadable "
                                        f"({type(exc).__name__})") from None


def card_page(markdown: str) -> str:
    """The card as an HTML page: the Markdown shown verbatim (escaped), styled like ``/``."""
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>Model card · covid-ray</title><link rel=\"stylesheet\" href=\"/static/style.css\"></head>"
        "<body class=\"card-page\"><header class=\"bar\"><h1>Model card</h1>"
        "<p class=\"ruo\">Research use only: not for diagnosis or treatment decisions.</p>"
        "<nav><a href=\"/\">back to the page</a> · <a href=\"/model-card.md\">Markdown file</a></nav></header>"
        f"<main><pre id=\"card\">{html.escape(markdown)}</pre></main></body></html>\n"
    )


def model_card_info(model: LoadedModel) -> dict:
    """The ``model_card`` entry of ``GET /model``: whether there is one and where to read it."""
    path = model_card_path(model)
    return {"available": bool(path and path.is_file()), "url": "/model-card"}


def add_web_routes(app: FastAPI, model: LoadedModel, info: dict | None = None) -> None:
    """Add ``/``, ``/static/*`` and the model card routes to ``app``.

    Args:
        info: the dict ``GET /model`` answers with; gets a ``model_card`` entry.
    """
    # Read once: the files ship with the package; a missing one fails at start-up, not per request.
    page = (WEB_DIR / "index.html").read_bytes()
    static = {name: (WEB_DIR / name).read_bytes() for name in STATIC_TYPES}
    if info is not None:
        info["model_card"] = model_card_info(model)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in static:
            raise HTTPException(404, detail=f"no static file {name!r}; there are {sorted(static)}")
        return Response(static[name], media_type=STATIC_TYPES[name], headers=SECURITY_HEADERS)

    @app.get("/model-card", summary="the model card (HTML; the Markdown escaped)")
    def model_card() -> Response:
        return Response(card_page(_read_card(model)), media_type="text/html; charset=utf-8",
                        headers=SECURITY_HEADERS)

    @app.get("/model-card.md", summary="the model card (Markdown)")
    def model_card_markdown() -> Response:
        return Response(_read_card(model), media_type="text/markdown; charset=utf-8", headers=SECURITY_HEADERS)
