"""The eval preprocessing a model records, and the arithmetic of its crop: one type, :class:`Preprocess`.

A checkpoint's ``preprocess`` and ``preprocess.json`` (an exported ensemble's input)
record it; inference, Grad-CAM (the mask's crop, the overlay's box), the ensemble's
member predictions and the export read it through this type. The steps, as training
evaluated the model: decode as 8-bit grayscale, :func:`~covid_ray.data.io.resize_square`
to ``resize`` (the decode cache's working resolution), then
:class:`~covid_ray.data.transforms.EvalPreset` (centre crop ``image_size``, /255,
normalize for ``in_chans``). Recorded values this pipeline cannot reproduce (another
crop, other normalization statistics) are refused when read rather than approximated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from covid_ray.artifacts.bundle import VALUE_RANGE, ModelLoadError
from covid_ray.data.io import MAX_ASPECT, BadImageError, resize_square
from covid_ray.data.transforms import EvalPreset, crop_offset, normalization_for, resize_for


@dataclass(frozen=True)
class Preprocess:
    """The eval preprocessing of a model: resize to ``resize``, centre-crop ``image_size``, normalize."""

    image_size: int
    resize: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_model(cls, image_size: int, in_chans: int) -> Preprocess:
        """What training evaluates a model of ``image_size`` and ``in_chans`` with (the checkpoint writer's)."""
        mean, std = normalization_for(in_chans)
        return cls(int(image_size), resize_for(image_size), int(in_chans), tuple(mean), tuple(std))

    @classmethod
    def from_dict(cls, d: dict, *, source: str | Path) -> Preprocess:
        """Read and check the ``preprocess`` of a checkpoint or ``preprocess.json``.

        Raises:
            ModelLoadError: a missing key, or values EvalPreset would not reproduce.
        """
        try:
            image_size, in_chans = int(d["image_size"]), int(d["in_chans"])
            resize = int(d.get("resize") or resize_for(image_size))
            mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{source}: preprocessing is missing or malformed ({type(exc).__name__}: {exc})") from None
        if d.get("crop", "center") != "center":
            raise ModelLoadError(f"{source}: unsupported crop {d.get('crop')!r}; expected 'center'")
        if resize < image_size:
            raise ModelLoadError(f"{source}: resize {resize} is smaller than image_size {image_size}")
        try:
            expected = normalization_for(in_chans)
        except ValueError as exc:
            raise ModelLoadError(f"{source}: {exc}") from None
        if not all(len(a) == len(b) and np.allclose(a, b, atol=1e-6) for a, b in zip((mean, std), expected)):
            raise ModelLoadError(
                f"{source}: normalization mean={list(mean)} std={list(std)} differs from the one EvalPreset applies "
                f"for in_chans={in_chans} (mean={list(expected[0])}, std={list(expected[1])})"
            )
        return cls(image_size, resize, in_chans, mean, std)

    def to_dict(self, *, channel_handling: bool = False) -> dict:
        """The recorded form; a checkpoint's also says in words how channels are handled."""
        out: dict = {"image_size": self.image_size, "resize": self.resize, "crop": "center", "in_chans": self.in_chans}
        if channel_handling:
            out["channel_handling"] = ("grayscale input; first conv adapted to 1 channel" if self.in_chans == 1
                                       else "grayscale replicated to 3 channels")
        return {**out, "mean": list(self.mean), "std": list(self.std), "value_range": VALUE_RANGE}

    def preset(self) -> EvalPreset:
        """The batch transform from (B, 1, R, R) uint8 to the model's input."""
        return EvalPreset(image_size=self.image_size, in_chans=self.in_chans)

    def resized(self, gray: np.ndarray) -> np.ndarray:
        """(resize, resize) uint8: shorter side to ``resize``, centre crop (as the decode cache).

        Raises:
            BadImageError: an aspect ratio no radiograph has (see ``MAX_ASPECT``).
        """
        h, w = gray.shape
        if max(h, w) > MAX_ASPECT * min(h, w):
            raise BadImageError(f"aspect ratio {w}x{h} is beyond {MAX_ASPECT:g}:1; not a radiograph")
        return resize_square(gray, self.resize)

    def tensor(self, resized: np.ndarray) -> torch.Tensor:
        """(1, C, S, S) float32: the model input for one (resize, resize) uint8 image."""
        return self.preset()(torch.from_numpy(np.array(resized, dtype=np.uint8))[None])  # a copy: may be read-only

    def center_crop(self, resized: np.ndarray) -> np.ndarray:
        """The (S, S) window of a (resize, resize) array that the model sees (EvalPreset's crop)."""
        top = crop_offset(self.resize, self.image_size)
        return resized[top : top + self.image_size, top : top + self.image_size]

    def crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(top, left, box height, box width) of the model's input crop in original pixels.

        Follows ``resize_square`` (scale the shorter side, centre crop) and then
        EvalPreset's centre crop, mapped back through the resize scale factors.
        """
        r, s = self.resize, self.image_size
        scale = r / min(height, width)
        nh, nw = max(r, round(height * scale)), max(r, round(width * scale))
        inner = crop_offset(r, s)
        sy, sx = nh / height, nw / width
        return ((nh - r) // 2 + inner) / sy, ((nw - r) // 2 + inner) / sx, s / sy, s / sx
