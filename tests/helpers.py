"""Small image factories shared by the tests."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def smooth_image(seed: int, size: int = 64) -> np.ndarray:
    """A distinct, smooth uint8 image (low-frequency noise), so pHashes differ per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, format="PNG") if mode else Image.fromarray(array).save(path)
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def make_kaggle(
    root: Path,
    per_class: dict[str, int],
    *,
    size: int = 64,
    seed0: int = 0,
    masks: bool = True,
    radiographs: bool = False,
) -> Path:
    """A tiny dataset in the Kaggle layout, with distinct images and matching masks.

    ``radiographs=True`` draws synthetic chest radiographs (slower, realistic pHashes);
    otherwise smooth noise images.
    """
    from covid_ray.data.synth import render_radiograph

    seed = seed0
    for label, n in per_class.items():
        for i in range(1, n + 1):
            if radiographs:
                image, lung = render_radiograph(label, np.random.default_rng([seed0, seed]), size)
            else:
                image = smooth_image(seed, size)
                lung = np.zeros((size, size), np.uint8)
                lung[size // 4 : 3 * size // 4, size // 8 : 7 * size // 8] = 255
            write_png(root / label / "images" / f"{label}-{i}.png", image)
            if masks:
                write_png(root / label / "masks" / f"{label}-{i}.png", lung)
            seed += 1
    (root / "README.md.txt").write_text("test dataset\n")
    (root / "COVID.metadata.xlsx").write_bytes(b"not really xlsx")
    return root


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 30000x30000 pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
