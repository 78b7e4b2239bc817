"""Decode one radiograph file into an 8-bit grayscale array, defensively.

Every reader of image files in covid-ray goes through :func:`read_grayscale`, so the
scan, the cache and inference agree on what a file contains and on which files are
unusable. Radiographs are single-channel; RGB, RGBA, palette and 16-bit files are
converted, and the conversion is reported so odd files never pass silently.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# The database's images are 299x299. Anything past this many pixels is refused before
# it is decoded: a small PNG whose header claims 30000x30000 would otherwise allocate
# gigabytes (a "decompression bomb").
MAX_PIXELS = 8192 * 8192
# A radiograph is roughly square; a 1x60000 strip passes the pixel limit but would
# become a 73 x 4.4-million array once its short side is resized up.
MAX_ASPECT = 10.0


class BadImageError(ValueError):
    """A file that cannot be used as an image; ``reason`` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Decoded:
    """A decoded image and the conversions applied to it (empty when none)."""

    array: np.ndarray  # uint8, (H, W)
    notes: list[str] = field(default_factory=list)


def sha1_of_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _to_uint8(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        notes.append(f"{'16-bit' if mode.startswith('I;16') else mode + '-mode'} image rescaled to 8-bit")
        if hi <= lo:
            return np.zeros(arr.shape, dtype=np.uint8)
        return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        # Composite on black: the background of a radiograph is dark.
        notes.append(f"{mode} with alpha composited on black and converted to grayscale")
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("L"), dtype=np.uint8)
    if mode == "1":
        notes.append("1-bit image converted to grayscale")
    elif mode != "RGB":
        notes.append(f"{mode} image converted to grayscale")
    elif mode == "RGB":
        notes.append("RGB converted to grayscale")
    return np.asarray(im.convert("L"), dtype=np.uint8)


def decode_grayscale(data: bytes, *, name: str = "", max_pixels: int = MAX_PIXELS) -> Decoded:
    """Decode image bytes to a uint8 (H, W) array.

    Args:
        data: the file's bytes.
        name: the file name, used to notice content whose format differs from its suffix.
        max_pixels: refuse images whose header claims more pixels than this.

    Raises:
        BadImageError: empty, not an image, truncated, or a decompression bomb.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImageError(f"decompression bomb: header claims {w}x{h} pixels")
            im.load()
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognised content)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(f"unreadable image data: {exc}") from None
    suffix = Path(name).suffix.lower()
    fmt = (im.format or "").upper()
    expected = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix)
    if expected and fmt and fmt != expected:
        notes.append(f"{fmt} data under a {suffix} name")
    if w == 0 or h == 0:
        raise BadImageError(f"image has zero size ({w}x{h})")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise BadImageError(f"implausible shape for a radiograph: {w}x{h} (aspect ratio over {MAX_ASPECT:g}:1)")
    return Decoded(_to_uint8(im, notes), notes)


def read_grayscale(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> tuple[Decoded, str]:
    """Read and decode a file. Returns the decoded image and the sha1 of the file's bytes.

    Raises:
        BadImageError: see :func:`decode_grayscale`; also when the file cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImageError(f"cannot read file: {exc.strerror or exc}") from None
    return decode_grayscale(data, name=path.name, max_pixels=max_pixels), sha1_of_bytes(data)


def resize_square(array: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop to ``size`` x ``size``.

    This is torchvision's ``Resize(size)`` followed by ``CenterCrop(size)`` on a PIL
    image (bilinear with antialiasing); for the square Kaggle images it is a plain
    resize. The cache stores images at this working resolution.
    """
    h, w = array.shape
    if (h, w) == (size, size):
        return array
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(array).resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im, dtype=np.uint8)[top : top + size, left : left + size]
