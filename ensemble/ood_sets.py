"""Images that are not chest radiographs like the training data: OOD benchmark sets and proxies.

Two disjoint families, so the OOD score is never chosen on the sets it is judged on:

* :func:`benchmark_sets` (reported in ``report.md``, ``metrics.json`` and BENCHMARKS.md):
  natural photographs (scikit-image's bundled sample images, each whole and as four
  corner crops), handwritten digits (scikit-learn's ``load_digits``, 8x8 upscaled),
  rendered text pages (PIL's default font), uniform noise; plus, built by the caller
  from the test split, radiographs turned upside down (rotated 180 degrees).
* :func:`proxy_sets` (used only to *choose* the score): smooth random fields, random
  geometric shapes, sinusoidal gratings; plus, built by the caller from the validation
  split, radiographs rotated 90 degrees and photographic negatives.

Sizes are small on purpose (every image costs a forward pass of every member during
the build); the AUROCs are coarse to a few hundredths. Everything is generated from
fixed seeds, on the machine, without downloads: the
scikit-image photographs are read only when their file ships inside the package.
Images are uint8 grayscale of various sizes; inference's own resize brings them to
the model's input.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# skimage.data loader -> the file it reads, which must ship with the package (no download).
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png", "camera": "camera.png", "coffee": "coffee.png", "chelsea": "chelsea.png",
    "coins": "coins.png", "moon": "moon.png", "rocket": "rocket.jpg", "hubble_deep_field": "hubble_deep_field.jpg",
    "gravel": "gravel.png", "brick": "brick.png", "grass": "grass.png", "clock": "clock_motion.png",
    "stereo_motorcycle": "motorcycle_left.png", "retina": "retina.jpg",
}
WORDS = ("patient", "report", "the", "of", "and", "chest", "page", "invoice", "total", "date", "name", "address",
         "summary", "table", "figure", "results", "method", "data", "section", "notes", "signed", "reference",
         "number", "account", "amount", "order", "item", "price", "review", "2021", "14", "03", "A4", "No.")


def _gray(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) from skimage's uint8/float, gray/RGB/RGBA arrays."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if a.ndim == 3:
        a = np.asarray(Image.fromarray(a[..., :3]).convert("L"))
    return a


def photographs() -> list[np.ndarray]:
    """scikit-image's bundled photographs, each whole and as its four 60% corner crops.

    Raises:
        RuntimeError: scikit-image is not installed or ships none of them.
    """
    try:
        import skimage.data as data
    except ImportError as exc:
        raise RuntimeError("the photograph OOD set needs scikit-image (pip install 'scikit-image>=0.24')") from exc
    folder = Path(data.__file__).parent
    out = []
    for name, file in SKIMAGE_PHOTOS.items():
        if not (folder / file).is_file():  # only bundled files: never trigger a download
            logger.info("skimage.data.%s is not bundled here; skipped", name)
            continue
        image = getattr(data, name)()
        image = _gray(image[0] if isinstance(image, tuple) else image)
        h, w = image.shape
        ch, cw = int(h * 0.6), int(w * 0.6)
        out.append(image)
        out += [image[:ch, :cw], image[:ch, w - cw:], image[h - ch:, :cw], image[h - ch:, w - cw:]]
    if not out:
        raise RuntimeError(f"no bundled scikit-image photograph found in {folder}")
    return [np.ascontiguousarray(a) for a in out]


def digits(n: int = 100, *, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """Handwritten digits (scikit-learn's 8x8 ``load_digits``), bright ink on black, upscaled."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    rows = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
    return [np.asarray(Image.fromarray((images[i] * (255 / 16)).astype(np.uint8)).resize((size, size),
                                                                                        Image.Resampling.BILINEAR))
            for i in rows]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_pages(n: int = 64, *, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Rendered documents: lines of words in PIL's default font, dark on light paper."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        paper = int(rng.integers(200, 256))
        page = Image.new("L", (size, size), paper)
        draw = ImageDraw.Draw(page)
        font_size = int(rng.integers(9, 22))
        font = _font(font_size)
        y = int(rng.integers(4, 24))
        while y < size - font_size:
            words = rng.choice(WORDS, size=int(rng.integers(2, 9)))
            draw.text((int(rng.integers(4, 30)), y), " ".join(words), fill=int(rng.integers(0, 80)), font=font)
            y += int(font_size * rng.uniform(1.2, 2.0))
        out.append(np.asarray(page))
    return out


def uniform_noise(n: int = 64, *, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """i.i.d. uniform 8-bit noise."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]


def benchmark_sets(seed: int = 0) -> dict[str, list[np.ndarray]]:
    """The reported OOD sets built without the dataset (the caller adds ``flipped`` radiographs)."""
    return {"photos": photographs(), "digits": digits(seed=seed), "text": text_pages(seed=seed),
            "noise": uniform_noise(seed=seed)}


# --------------------------------------------------------------------------- proxies (score choice only)


def smooth_fields(n: int = 32, *, size: int = 256, seed: int = 1) -> list[np.ndarray]:
    """Low-frequency random fields of random contrast."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cells = int(rng.integers(3, 12))
        small = rng.random((cells, cells)).astype(np.float32)
        field = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
        lo, hi = sorted(rng.uniform(0, 255, 2))
        field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
        out.append(np.clip(lo + field * (hi - lo), 0, 255).astype(np.uint8))
    return out


def shapes(n: int = 32, *, size: int = 256, seed: int = 2) -> list[np.ndarray]:
    """Random ellipses and rectangles on flat backgrounds."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("L", (size, size), int(rng.integers(0, 256)))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(2, 9))):
            x0, y0 = rng.integers(0, size, 2)
            x1, y1 = x0 + rng.integers(10, size // 2), y0 + rng.integers(10, size // 2)
            box, fill = [int(x0), int(y0), int(x1), int(y1)], int(rng.integers(0, 256))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        out.append(np.asarray(im))
    return out


def gratings(n: int = 32, *, size: int = 256, seed: int = 3) -> list[np.ndarray]:
    """Sinusoidal stripes of random orientation, frequency and phase."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    out = []
    for _ in range(n):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 30), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        out.append(np.clip(128 + rng.uniform(30, 127) * wave, 0, 255).astype(np.uint8))
    return out


def proxy_sets(seed: int = 0) -> dict[str, list[np.ndarray]]:
    """The procedural proxies (the caller adds ``val_rot90`` and ``val_negative``)."""
    return {"smooth_fields": smooth_fields(seed=seed + 1), "shapes": shapes(seed=seed + 2),
            "gratings": gratings(seed=seed + 3)}


def rot180(batch: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """(B, R, R) uint8 images turned upside down."""
    return np.ascontiguousarray(batch[:, ::-1, ::-1])


def rot90(batch: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """(B, R, R) uint8 images rotated a quarter turn."""
    return np.ascontiguousarray(np.rot90(batch, k=1, axes=(1, 2)))


def negative(batch: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """(B, R, R) uint8 photographic negatives."""
    return np.ascontiguousarray(255 - batch)
