"""Synthetic chest radiographs in the exact layout of the COVID-19 Radiography Database.

The demo, the tests and CI need a dataset that looks like the Kaggle one without
shipping it. :func:`synthesize` writes ``<class>/images/<class>-<i>.png`` (8-bit
grayscale, ``size`` x ``size``), ``<class>/masks/<class>-<i>.png`` (0/255 lung masks at
``mask_size``), the four ``<class>.metadata.xlsx`` files, ``README.md.txt`` and the
``SYNTHETIC.json`` marker, which every artefact built from the folder inherits.

:func:`render_radiograph` draws one frontal film from scratch with numpy: torso and
shoulders, mediastinum and spine, two lung fields of random geometry (these are the
mask), ribs, clavicles, heart, diaphragm domes and normal vessel markings, then the
class finding inside the lungs, then exposure, blur, grain and sometimes a corner
marker. Findings are drawn with a severity that reaches down to barely visible, and
every class shares the confounders (vessel markings, breast shadows, patchy tissue
density, markers), so a small CNN learns the classes well but not perfectly. Nothing
measured on these images says anything about real radiographs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from covid_ray.data.layout import (
    KAGGLE_CLASSES,
    KAGGLE_COUNTS,
    KAGGLE_IMAGE_SIZE,
    KAGGLE_MASK_SIZE,
    SYNTHETIC_MARKER,
)
from covid_ray.progress import NoProgress, Progress, map_in_chunks, progress_bar

logger = logging.getLogger(__name__)

# Bump when the rendering changes, so a dataset made by an older generator is rebuilt
# instead of being taken for a no-op. (Datasets written while the renderer was being
# tuned say 1.)
GENERATOR_VERSION = 2

# Present while a dataset is being written; a folder holding it is our own interrupted
# run and may be cleared. SYNTHETIC.json is written last because readers (prepare,
# scan) take its presence to mean "a complete synthetic dataset".
PARTIAL_MARKER = ".covid-ray-synth.partial"
README_NAME = "README.md.txt"
METADATA_COLUMNS = ("FILE NAME", "FORMAT", "SIZE", "URL")
METADATA_URL = "synthetic (covid-ray)"
MIN_SIZE = 32

# 5x7 bitmaps of the letters on lead film markers ("L", "R", "PA", "AP").
_GLYPHS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
    "A": ("01110", "10001", "10001", "11111", "10001", "10001", "10001"),
    "P": ("11110", "10001", "10001", "11110", "10000", "10000", "10000"),
}
_MARKERS = ("L", "R", "PA", "AP")


# --------------------------------------------------------------------------- counts


def class_counts(*, per_class: int | None = None, scale: float | None = None) -> dict[str, int]:
    """Images per class: ``per_class`` of each, or ``KAGGLE_COUNTS * scale`` rounded
    (at least 1 each), or the full ``KAGGLE_COUNTS`` when neither is given."""
    if per_class is not None and scale is not None:
        raise ValueError(f"give per_class or scale, not both (got per_class={per_class}, scale={scale})")
    if per_class is not None:
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
            raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
        return {c: per_class for c in KAGGLE_CLASSES}
    if scale is not None:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        return {c: max(1, math.floor(KAGGLE_COUNTS[c] * scale + 0.5)) for c in KAGGLE_CLASSES}
    return {c: KAGGLE_COUNTS[c] for c in KAGGLE_CLASSES}


# ------------------------------------------------------------------------ rendering

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1] as a (1, size) row of x and a (size, 1) column of y."""
    if size not in _GRIDS:
        t = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
        _GRIDS[size] = (t[None, :], t[:, None])
    return _GRIDS[size]


def _ramp(z: np.ndarray) -> np.ndarray:
    """z clipped to [0, 1], in place: a linear soft edge (the final blur rounds it off).

    Callers pass a fresh temporary; a sigmoid would cost an exp per pixel per edge.
    """
    return np.clip(z, 0.0, 1.0, out=z)


def _smooth(z: np.ndarray) -> np.ndarray:
    """Smoothstep of z clipped to [0, 1], for the few edges whose curvature shows."""
    t = np.clip(z, 0.0, 1.0, out=z)
    return t * t * (3.0 - 2.0 * t)


def _bump(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Compact round blob (1 - d^2/r^2)^2, zero beyond radius r."""
    q = np.clip(1.0 - ((X - cx) ** 2 + (Y - cy) ** 2) * (1.0 / (r * r)), 0.0, None)
    return q * q


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in about [0, 1]: a cells x cells random grid, bicubic-upsampled."""
    small = rng.random((cells, cells), dtype=np.float32)
    img = Image.fromarray(small, "F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _lung(X, Y, rng, side: int, heart_d: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One lung field: a tapered superellipse (narrow apex, wide base) cut by its
    diaphragm dome and by the heart (mostly the patient's left lung: image right, side=+1).

    Returns the soft field (for darkening), the binary mask and the lung's frame
    (cx, cy, rx, ry) in body coordinates for placing findings.
    """
    # Patient's right lung (image left) is wider and its dome higher (the liver below).
    cx = side * rng.uniform(0.39, 0.47)
    cy = rng.uniform(-0.1, 0.06) + (0.03 if side > 0 else 0.0)
    rx = rng.uniform(0.26, 0.33) * (0.93 if side > 0 else 1.0)
    ry = rng.uniform(0.52, 0.64)
    tilt = side * math.radians(rng.uniform(0.0, 9.0))  # apex leans toward the midline
    taper = rng.uniform(0.15, 0.35)
    # Squareness: u^2 + v^2 - k u^2 v^2 = 1 is an ellipse at k=0 and tends to a rectangle
    # as k -> 1 (a superellipse without the per-pixel pow).
    k = rng.uniform(0.3, 0.8)
    c, s = math.cos(tilt), math.sin(tilt)
    dx, dy = X - cx, Y - cy
    u = (dx * c + dy * s) * (1.0 / rx)
    v = (dy * c - dx * s) * (1.0 / ry)
    u = u / (1.0 + taper * np.clip(v, -1.0, 1.0))
    u2, v2 = u * u, v * v
    # Beyond |u| or |v| = 1 the quartic term would bend d back below 1; clamp it.
    d = np.maximum(np.maximum(u2 + v2 - k * u2 * v2, u2), v2)
    # Dome: highest near the middle of the lung, falling to the costophrenic angle.
    dome_top = cy + ry * rng.uniform(0.55, 0.8)
    dome_h = rng.uniform(0.08, 0.18)
    dome = dome_top + dome_h * np.clip((X - cx + side * 0.05) * (1.0 / rx), -1.5, 1.5) ** 2
    below = dome - Y
    soft = _smooth((1.0 - d) * 3.0) * _ramp(below * 12.0 + 0.2)
    mask = (d < 1.0) & (below > 0)
    soft = soft * _ramp((heart_d - 1.0) * 4.0)
    mask &= heart_d > 1.0
    # Lungs are darkest in the upper-mid zone; apices and bases carry more soft tissue.
    soft = soft * (1.0 - 0.3 * np.clip(v, -1.0, 1.0) ** 2)
    return soft, mask, (cx, cy, rx, ry)


def _anatomy(X, Y, rng):
    """Body, bones, heart and lungs in attenuation units (brighter is denser).

    Returns ``(A, lung, mask, lungs, body)``: the attenuation map, the soft lung field,
    the binary lung mask, the two lungs' frames (see :func:`_lung`) and the soft body.
    """
    ax = np.abs(X)
    # Torso with shoulders: narrow neck above the shoulder line, chest below it.
    width = rng.uniform(0.84, 0.98) * (1.0 - 0.05 * (Y - 0.2) ** 2)  # barrel-shaped chest
    neck = rng.uniform(0.16, 0.24)
    y_sh = rng.uniform(-0.92, -0.72)
    half = neck + (width - neck) * _smooth((Y - y_sh) * 3.5 + 0.3)
    half = half + 0.06 * _ramp(1.0 - np.abs(Y - y_sh - 0.12) * 6.0)  # shoulder caps
    body = _ramp((half - ax) * 12.0 + 0.5)
    A = 0.06 + body * rng.uniform(0.42, 0.52)

    # Mediastinum and spine: bright midline band, widening toward the heart.
    mx = rng.uniform(-0.03, 0.03)
    mw = 0.10 + 0.04 * _ramp((Y + 0.2) * 2.0)
    A += 0.07 * _ramp((mw - np.abs(X - mx)) * 15.0 + 0.5) * body
    spine = _ramp((0.065 - np.abs(X - mx)) * 30.0)
    # Vertebrae show plainly in the neck, faintly through the heart and mediastinum.
    vert = 0.5 + 0.5 * np.cos(Y * (2 * math.pi / rng.uniform(0.08, 0.1)))
    A += spine * (0.025 + (0.01 + 0.03 * _ramp((-0.55 - Y) * 4.0)) * vert)
    A -= 0.10 * _ramp((0.032 - np.abs(X - mx)) * 60.0) * _ramp((-0.3 - Y) * 6.0)  # trachea
    A += 0.06 * _bump(X, Y, mx + 0.1, rng.uniform(-0.42, -0.32), rng.uniform(0.07, 0.1))  # aortic knob

    # Heart: tilted ellipse, mostly on the patient's left (image right).
    hx, hy = rng.uniform(0.06, 0.14) + mx, rng.uniform(0.38, 0.48)
    hrx, hry = rng.uniform(0.30, 0.38), rng.uniform(0.26, 0.32)
    ht = math.radians(rng.uniform(-30, -10))  # long axis down toward the patient's left
    hc, hs = math.cos(ht), math.sin(ht)
    hu = ((X - hx) * hc + (Y - hy) * hs) * (1.0 / hrx)
    hv = ((Y - hy) * hc - (X - hx) * hs) * (1.0 / hry)
    heart_d = hu * hu + hv * hv
    # The heart is soft tissue, not bone: it shows mainly as the lung it displaces, and
    # its lower edge merges with the abdomen below the diaphragm.
    A += rng.uniform(0.0, 0.025) * _ramp((1.0 - heart_d) * 3.0)

    left, mask_l, frame_l = _lung(X, Y, rng, -1, heart_d)
    right, mask_r, frame_r = _lung(X, Y, rng, +1, heart_d)
    lung = np.maximum(left, right)
    A -= lung * rng.uniform(0.22, 0.30)
    # Hila: pulmonary arteries as bright medial blobs.
    hyl = rng.uniform(-0.12, 0.0)
    A += 0.07 * (_bump(X, Y, mx - 0.2, hyl, 0.12) + _bump(X, Y, mx + 0.2, hyl + 0.03, 0.11))

    A += _ribs(X, Y, ax, rng, lung, body)
    # Clavicles: from the sternal notch up and out to the shoulders.
    cy0, slope = rng.uniform(-0.62, -0.5), rng.uniform(0.2, 0.45)
    centre = cy0 - slope * (ax - 0.1) + 0.25 * (ax - 0.35) ** 2
    clav = _ramp((0.035 - np.abs(Y - centre)) * 40.0) * _ramp((ax - 0.06) * 20.0) * _ramp((0.68 - ax) * 10.0)
    A += rng.uniform(0.08, 0.16) * clav
    lungs = (frame_l, frame_r)
    return A, lung, mask_l | mask_r, lungs, body


def _ribs(X, Y, ax, rng, lung, body) -> np.ndarray:
    """Posterior ribs as arcs rising from the spine and curving down laterally, plus
    fainter anterior ribs sloping down toward the midline."""
    apex = rng.uniform(0.18, 0.3)
    curve = rng.uniform(0.7, 1.3)
    spacing = rng.uniform(0.13, 0.17)
    phase = rng.uniform(0, 1)
    # Real ribs are neither evenly spaced nor identical: bend them with smooth noise,
    # and offset the two sides so they do not mirror each other.
    bend = (_smooth_noise(rng, X.shape[0], 5) - 0.5) * rng.uniform(0.04, 0.09)
    phi = Y - curve * (ax - apex) ** 2 + rng.uniform(0.0, 0.05) * np.sign(X) + bend
    phi = phi + 0.12 * phi * phi  # lower ribs sit further apart
    width = rng.uniform(0.2, 0.45)  # threshold on the cosine: higher is thinner
    post = np.clip((np.cos((phi * (1.0 / spacing) + phase) * (2 * math.pi)) - width) * 2.0, 0.0, 1.0)
    ant = np.clip(np.cos(((Y + 0.45 * ax) * (1.0 / (spacing * 1.3)) + phase) * (2 * math.pi)) - 0.5, 0.0, 1.0)
    envelope = _ramp((Y + 0.85) * 5.0) * _ramp((0.62 - Y) * 5.0) * _ramp((ax - 0.08) * 10.0) * body
    strength = rng.uniform(0.05, 0.11)
    return strength * envelope * (0.15 + 0.85 * lung) * (post + 0.5 * ant)


def _vessels(X, Y, rng, noise, strength: float, reach: float, freq: float, thin: bool = True) -> np.ndarray:
    """Lines radiating from the hila (vessels, or interstitial streaks when strong):
    cosine stripes along lines of constant slope through each hilum, made wavy by
    ``noise``, fading with distance over ``reach``."""
    hoff, hy = rng.uniform(0.14, 0.22), rng.uniform(-0.1, 0.02)
    dx = np.abs(X) - hoff
    dy = Y - hy
    t = dy / (np.abs(dx) + 0.06)
    phase = np.where(X < 0, rng.uniform(0, 6.3), rng.uniform(0, 6.3)).astype(np.float32)
    stripes = 0.5 + 0.5 * np.cos(t * freq + phase + noise * 5.0)
    stripes = stripes * stripes
    if thin:  # vessels are fine lines; interstitial streaks are coarse enough to survive 64 px
        stripes = stripes * stripes
    fade = 1.0 / (1.0 + (dx * dx + dy * dy) * (1.0 / (reach * reach)))
    return strength * stripes * fade


def _finding(label, X, Y, rng, lungs, size: int) -> np.ndarray | float:
    """Class-specific added brightness in body coordinates (before the lung window)."""
    severity = rng.uniform(0.15, 1.25)
    if label == "COVID":
        # Ground glass: soft, hazy blobs at the lateral edges and bases of both lungs.
        out = np.zeros((size, size), np.float32)
        n = rng.integers(4, 9)
        for j in range(n):
            cx, cy, rx, ry = lungs[j % 2]
            side = -1 if j % 2 == 0 else 1
            bx = cx + side * rx * rng.uniform(0.25, 0.85)
            by = cy + ry * rng.uniform(0.0, 0.8)
            out += rng.uniform(0.5, 1.0) * _bump(X, Y, bx, by, rng.uniform(0.16, 0.32))
        haze = 0.55 + 0.9 * _smooth_noise(rng, size, 9)
        return severity * rng.uniform(0.16, 0.28) * np.minimum(out, 1.6) * haze
    if label == "Lung_Opacity":
        # Consolidation: one or two dense, sharper-edged irregular patches, usually one lung.
        out = np.zeros((size, size), np.float32)
        sides = [int(rng.integers(2))] * 2 if rng.random() < 0.8 else [0, 1]
        noise = _smooth_noise(rng, size, 7) - 0.5
        for j in range(rng.integers(1, 3)):
            cx, cy, rx, ry = lungs[sides[j]]
            bx = cx + rx * rng.uniform(-0.55, 0.55)
            by = cy + ry * rng.uniform(-0.55, 0.65)
            r = rng.uniform(0.11, 0.23)
            # Lobulated outline: a cluster of overlapping blobs, thresholded after adding
            # smooth noise so the edge is irregular but sharper than ground glass.
            blob = _bump(X, Y, bx, by, r)
            for _ in range(rng.integers(2, 5)):
                ox, oy = rng.normal(0.0, 0.6 * r, size=2)
                blob += _bump(X, Y, bx + ox, by + oy, r * rng.uniform(0.6, 1.1))
            blob += rng.uniform(0.3, 0.6) * noise
            out = np.maximum(out, _ramp((blob - 0.3) * rng.uniform(2.5, 6.0)))
        return severity * rng.uniform(0.2, 0.35) * out * (0.85 + 0.3 * noise)
    if label == "Viral Pneumonia":
        # Interstitial pattern: coarse streaks radiating from both hila across the lungs,
        # a perihilar haze, and a fine reticular net.
        wobble = _smooth_noise(rng, size, 10)
        streaks = _vessels(X, Y, rng, wobble, 1.0, rng.uniform(0.35, 0.6), rng.uniform(6.0, 10.0), thin=False)
        hy = rng.uniform(-0.1, 0.1)
        streaks += rng.uniform(0.15, 0.4) * (_bump(X, Y, -0.3, hy, 0.5) + _bump(X, Y, 0.3, hy, 0.5))
        f = max(rng.uniform(0.05, 0.07), 6.0 / size)  # at least 3 px a period: no moire when small
        net = (np.cos((X + 0.5 * Y) * (2 * math.pi / f)) * np.cos((Y - 0.5 * X) * (2 * math.pi / f)) + 1.0) * 0.5
        net = net * _smooth_noise(rng, size, 8)
        return severity * rng.uniform(0.14, 0.24) * (streaks + 0.35 * net)
    return 0.0


def _stamp_marker(img: np.ndarray, rng: np.random.Generator) -> None:
    """A lead letter marker ("L", "R", "PA", "AP") in a random corner, in place."""
    size = img.shape[0]
    text = _MARKERS[rng.integers(len(_MARKERS))]
    cell = max(1, int(round(size / 299 * rng.uniform(2.0, 3.5))))
    glyphs = [np.array([[ch == "1" for ch in row] for row in _GLYPHS[t]]) for t in text]
    gap = np.zeros((7, 1), bool)
    bitmap = np.hstack([g if k == 0 else np.hstack([gap, g]) for k, g in enumerate(glyphs)])
    bitmap = np.kron(bitmap, np.ones((cell, cell), bool))
    h, w = bitmap.shape
    pad = cell * 2
    boxed = rng.random() < 0.4  # a bright block with dark letters, as on some films
    ph, pw = h + 2 * pad, w + 2 * pad
    if ph + 4 >= size or pw + 4 >= size:
        return
    margin = int(rng.integers(2, max(3, size // 20)))
    top = margin if rng.random() < 0.5 else size - ph - margin
    left = margin if rng.random() < 0.5 else size - pw - margin
    region = img[top : top + ph, left : left + pw]
    if boxed:
        region[:] = int(rng.integers(200, 250))
        region[pad : pad + h, pad : pad + w][bitmap] = int(rng.integers(10, 60))
    else:
        region[pad : pad + h, pad : pad + w][bitmap] = int(rng.integers(215, 256))


def render_radiograph(label: str, rng: np.random.Generator, size: int = KAGGLE_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One frontal chest radiograph of class ``label`` and its lung mask.

    Args:
        label: one of ``KAGGLE_CLASSES``.
        rng: the only source of randomness; the same generator state gives the same image.
        size: side in pixels (at least 32).

    Returns:
        ``(image, mask)``, both uint8 ``(size, size)``; the mask is 0/255 and marks the
        two lung fields of this image.
    """
    if label not in KAGGLE_CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {KAGGLE_CLASSES}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")
    # The finding draws from its own stream, so one generator state gives the same
    # patient, film and exposure under every label: only the finding differs.
    finding_rng = np.random.default_rng(int(rng.integers(1 << 62)))
    x, y = _grid(size)
    # Patient placement: zoom, small rotation and shift, applied to the coordinates so
    # the image and its mask move together.
    zoom = rng.uniform(0.9, 1.1)
    rot = math.radians(float(np.clip(rng.normal(0.0, 2.5), -6.0, 6.0)))
    tx, ty = rng.uniform(-0.07, 0.07, size=2)
    c, s = math.cos(rot) / zoom, math.sin(rot) / zoom
    X = ((x - tx) * c + (y - ty) * s).astype(np.float32)
    Y = ((y - ty) * c - (x - tx) * s).astype(np.float32)

    A, lung, mask, lungs, body = _anatomy(X, Y, rng)
    tissue = _smooth_noise(rng, size, int(rng.integers(5, 9)))
    A += rng.uniform(0.03, 0.07) * (tissue - 0.5) * body
    # Normal vessel markings in every class, so streaks alone do not mean pneumonia.
    wobble = _smooth_noise(rng, size, 10)
    A += lung * _vessels(X, Y, rng, wobble, rng.uniform(0.02, 0.06), rng.uniform(0.18, 0.3), rng.uniform(8.0, 13.0))
    if rng.random() < 0.35:  # breast shadows: bilateral lower-lateral soft brightening
        by, br, amp = rng.uniform(0.45, 0.65), rng.uniform(0.28, 0.4), rng.uniform(0.03, 0.07)
        A += amp * (_bump(X, Y, -0.55, by, br) + _bump(X, Y, 0.55, by, br)) * body
    A += lung * _finding(label, X, Y, finding_rng, lungs, size)
    # Exposure: a gentle gradient across the film and grain before quantising.
    A += rng.uniform(-0.04, 0.04) * X + rng.uniform(-0.04, 0.04) * Y
    A += rng.standard_normal((size, size), dtype=np.float32) * rng.uniform(0.01, 0.03)
    img = np.clip(A * 255.0, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        _stamp_marker(img, rng)
    pil = Image.fromarray(img, "L").filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.3)))
    # Tone curve: window level/width and gamma vary between machines and exposures.
    lo, hi = rng.uniform(0, 0.08), rng.uniform(0.78, 1.0)
    gamma = rng.uniform(0.75, 1.35)
    lut = np.clip((np.arange(256, dtype=np.float32) / 255.0 - lo) / (hi - lo), 0, 1) ** gamma
    img = (lut * 255.0 + 0.5).astype(np.uint8)[np.asarray(pil)]
    return img, (mask.astype(np.uint8) * 255)


# ---------------------------------------------------------------------------- writing


def _params(counts: dict[str, int], size: int, mask_size: int, seed: int) -> dict:
    """The marker's content: everything that determines the dataset's bytes."""
    return {
        "generator": "covid_ray.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "mask_size": mask_size,
        "counts": dict(counts),
    }


def _read_marker(out: Path) -> dict | None:
    try:
        data = json.loads((out / SYNTHETIC_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _own_entries() -> set[str]:
    """Names a synthetic dataset may hold at its root."""
    names = {README_NAME, SYNTHETIC_MARKER, PARTIAL_MARKER}
    for c in KAGGLE_CLASSES:
        names |= {c, f"{c}.metadata.xlsx"}
    return names


def _files_present(out: Path, counts: dict[str, int]) -> bool:
    """Cheap completeness check: each class's last image and mask exist."""
    return all(
        (out / c / sub / f"{c}-{n}.png").is_file() for c, n in counts.items() for sub in ("images", "masks")
    )


def _prepare_folder(out: Path, params: dict) -> bool:
    """Make ``out`` ready to write; True when it already holds exactly this dataset.

    A non-empty folder is only touched when it is a synthetic dataset (complete, or an
    interrupted run of ours) holding nothing but what this module writes.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        out.mkdir(parents=True, exist_ok=True)
        return False
    marker = _read_marker(out)
    if marker is None and not (out / PARTIAL_MARKER).is_file():
        raise ValueError(
            f"refusing to write a synthetic dataset into {out}: the folder is not empty "
            f"({len(entries)} entries, e.g. {entries[0]!r}) and holds no readable {SYNTHETIC_MARKER}; "
            "choose an empty or new folder"
        )
    if marker is not None and not (out / PARTIAL_MARKER).exists():
        if {k: marker.get(k) for k in params} == params and _files_present(out, params["counts"]):
            return True
    foreign = [e for e in entries if e not in _own_entries()]
    if foreign:
        raise ValueError(
            f"refusing to regenerate the synthetic dataset in {out}: it also holds {foreign[:5]}, "
            "which this generator did not write; move them or choose another folder"
        )
    logger.warning("replacing the synthetic dataset in %s (different parameters or an interrupted run)", out)
    for name in entries:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return False


def _write_range(task: tuple[str, str, int, int, int, int, int, int]) -> int:
    """Render and save images ``start..stop-1`` (1-based names) of one class."""
    out, label, k, start, stop, seed, size, mask_size = task
    root = Path(out) / label
    for i in range(start, stop):
        # One generator per image, keyed by (seed, class, index): the bytes do not depend
        # on how images are spread over workers.
        img, mask = render_radiograph(label, np.random.default_rng([seed, k, i]), size)
        Image.fromarray(img, "L").save(root / "images" / f"{label}-{i}.png")
        m = Image.fromarray(mask, "L")
        if mask_size != size:
            m = m.resize((mask_size, mask_size), Image.Resampling.NEAREST)
        m.save(root / "masks" / f"{label}-{i}.png")
    return stop - start


def _write_metadata(out: Path, label: str, n: int, size: int) -> None:
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(list(METADATA_COLUMNS))
    for i in range(1, n + 1):
        ws.append([f"{label}-{i}", "PNG", f"{size}*{size}", METADATA_URL])
    wb.save(out / f"{label}.metadata.xlsx")


def _readme(params: dict) -> str:
    counts = params["counts"]
    lines = [
        "SYNTHETIC chest X-ray dataset generated by covid-ray (covid_ray.data.synth).",
        "",
        "These are NOT radiographs of people. Every image was drawn by a program, in the",
        "folder layout of the COVID-19 Radiography Database (Kaggle), so that covid-ray's",
        "demo and tests run without the real data. No number measured on this dataset",
        "(accuracy, F1, calibration, anything) says anything about real radiographs.",
        "",
        f"Generator version: {params['version']}",
        f"Seed: {params['seed']}",
        f"Image size: {params['size']}x{params['size']} (8-bit grayscale PNG)",
        f"Mask size: {params['mask_size']}x{params['mask_size']} (0/255 lung fields)",
        "Images per class: " + ", ".join(f"{c} {n}" for c, n in counts.items()),
        "",
        "Class findings (drawn inside the lung fields, with a severity that can be faint):",
        "  COVID: bilateral peripheral lower-zone ground-glass haze.",
        "  Lung_Opacity: focal dense consolidation, usually in one lung.",
        "  Normal: clear lungs.",
        "  Viral Pneumonia: diffuse bilateral streaky interstitial pattern.",
        "",
        f"Parameters are also in {SYNTHETIC_MARKER}. The same parameters give the same PNGs, byte for byte:",
        f"  covid_ray.data.synth.synthesize(DIR, per_class=... or scale=..., seed={params['seed']}, "
        f"size={params['size']}, mask_size={params['mask_size']})",
    ]
    return "\n".join(lines) + "\n"


def _tasks(out: Path, counts: dict[str, int], seed: int, size: int, mask_size: int, chunk: int) -> list[tuple]:
    tasks = []
    for k, label in enumerate(KAGGLE_CLASSES):
        for start in range(1, counts[label] + 1, chunk):
            stop = min(start + chunk, counts[label] + 1)
            tasks.append((str(out), label, k, start, stop, seed, size, mask_size))
    return tasks


def _run(tasks: list[tuple], workers: int, total: int, bar: Progress) -> int:
    """Run the write tasks, in this process or a pool; progress on ``bar``, else logged every ~10%."""
    step = max(1, total // 10)
    if workers == 1:
        return _count(map(_write_range, tasks), total, step, bar)
    # spawn, not fork: the caller may hold threads (Ray, a logging handler) that a forked
    # child would inherit in an undefined state.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        # Counted as each task completes (any order), so progress follows the pool.
        done = (n for _, ns in map_in_chunks(pool, _write_range, tasks, 1) for n in ns)
        return _count(done, total, step, bar)


def _count(results, total: int, step: int, bar: Progress) -> int:
    log = isinstance(bar, NoProgress)  # no bar: keep a trace of progress in the log
    done = 0
    for n in results:
        bar.update(n)
        if log and (done + n) // step > done // step:
            logger.info("synthetic images: %d / %d", done + n, total)
        done += n
    return done


def synthesize(
    out: str | Path,
    *,
    per_class: int | None = None,
    scale: float | None = None,
    size: int = KAGGLE_IMAGE_SIZE,
    mask_size: int = KAGGLE_MASK_SIZE,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """Write a synthetic dataset in the Kaggle layout into ``out``.

    Args:
        out: folder to write; must be empty, new, or a synthetic dataset made here.
        per_class, scale: how many images, see :func:`class_counts`.
        size: image side in pixels; mask_size: mask side in pixels.
        seed: with the other arguments, fixes every PNG byte for byte.
        workers: processes rendering in parallel (default: CPU count); the output does
            not depend on it.
        progress: show progress on stderr (see :mod:`covid_ray.progress`); without it,
            progress is logged every ~10%.

    Returns:
        Images written per class, in ``KAGGLE_CLASSES`` order. Calling again with the
        same arguments on a complete dataset writes nothing and returns its counts.
    """
    counts = class_counts(per_class=per_class, scale=scale)
    if size < MIN_SIZE or mask_size < 8:
        raise ValueError(f"size must be >= {MIN_SIZE} and mask_size >= 8, got size={size}, mask_size={mask_size}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    params = _params(counts, size, mask_size, seed)
    if _prepare_folder(out, params):
        logger.info("synthetic dataset in %s already matches (seed %d, size %d); nothing to do", out, seed, size)
        return dict(counts)

    (out / PARTIAL_MARKER).write_text(json.dumps(params, indent=2) + "\n")
    for label in KAGGLE_CLASSES:
        (out / label / "images").mkdir(parents=True, exist_ok=True)
        (out / label / "masks").mkdir(parents=True, exist_ok=True)
    total = sum(counts.values())
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    # At most 64 images a task: the bar then moves every few seconds per worker.
    chunk = max(8, min(64, math.ceil(total / (4 * workers))))
    tasks = _tasks(out, counts, seed, size, mask_size, chunk)
    workers = min(workers, len(tasks))
    logger.info("writing %d synthetic images to %s with %d worker(s)", total, out, workers)
    with progress_bar(total, "synthetic images", unit="img", enabled=progress) as bar:
        done = _run(tasks, workers, total, bar)
    assert done == total, (done, total)

    for label in KAGGLE_CLASSES:
        _write_metadata(out, label, counts[label], size)
    (out / README_NAME).write_text(_readme(params))
    # The marker goes last: its presence tells readers the dataset is complete.
    (out / SYNTHETIC_MARKER).write_text(json.dumps(params, indent=2) + "\n")
    (out / PARTIAL_MARKER).unlink()
    logger.info("synthetic dataset complete: %s", ", ".join(f"{c} {n}" for c, n in counts.items()))
    return dict(counts)
