"""Test-time augmentation: the views of ``--tta``, built as torch ops so they export into the graph.

``--tta flip,rot5`` gives four views of every input: the image itself, its horizontal
flip, and rotations by +5 and -5 degrees (``rotN`` is +/-N degrees, 1 <= N <= 30).
The ensemble averages each member's probabilities over the views, so with TTA the
weights and the temperature are fitted on view-averaged validation probabilities.

The views act on the *preprocessed* input (the centre crop, normalized), inside the
exported graph, so a client feeds the graph exactly as without TTA. A rotation is one
``grid_sample`` with a fixed sampling grid (an ONNX ``GridSample``). Corners the
rotation uncovers are black, as the train preset's ``RandomRotation(fill=0)`` makes
them; unlike training, which rotates the whole resized image before cropping, these
corners come from outside the crop (at 5 degrees a few pixels along the edges).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IDENTITY = "identity"
HFLIP = "hflip"
MAX_ROTATION = 30
_ROT = re.compile(r"rot(\d+)")
SPEC_HELP = "comma-separated views: flip (horizontal flip), rotN (+/-N degrees, 1-30), e.g. flip,rot5"


def parse_tta(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """The views of a ``--tta`` value, identity first; ``()`` when there is no TTA.

    ``"flip,rot5"`` -> ``("identity", "hflip", "rot+5", "rot-5")``. ``"none"`` or an
    empty value means no TTA.

    Raises:
        ValueError: an unknown or repeated view, naming it.
    """
    if spec is None:
        return ()
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    items = [s for s in items if s]
    if not items or items == ["none"]:
        return ()
    views = [IDENTITY]
    for item in items:
        rot = _ROT.fullmatch(item)
        if item == "flip":
            new = [HFLIP]
        elif rot and 1 <= int(rot.group(1)) <= MAX_ROTATION:
            n = int(rot.group(1))
            new = [f"rot+{n}", f"rot-{n}"]
        else:
            raise ValueError(f"unknown TTA view {item!r} in {spec!r}; expected {SPEC_HELP}")
        if any(v in views for v in new):
            raise ValueError(f"TTA view {item!r} is given twice in {spec!r}")
        views += new
    return tuple(views)


def view_angle(view: str) -> float | None:
    """Degrees of a ``rot+N`` / ``rot-N`` view; None for the others."""
    m = re.fullmatch(r"rot([+-]\d+)", view)
    return float(m.group(1)) if m else None


def rotation_grid(size: int, degrees: float) -> torch.Tensor:
    """(1, size, size, 2) ``grid_sample`` grid rotating a square image by ``degrees`` about its centre.

    The same convention as the train preset's affine map (output -> input coordinates).
    """
    a = math.radians(degrees)
    theta = torch.tensor([[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]], dtype=torch.float64)
    return F.affine_grid(theta, [1, 1, size, size], align_corners=False).float()


class Views(nn.Module):
    """(B, C, S, S) normalized input -> (V * B, C, S, S): every view of the batch, view-major.

    ``mean`` and ``std`` are the input's normalization: padding is black in pixel
    space, which is ``-mean / std`` after normalization.
    """

    def __init__(self, views: Sequence[str], *, image_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if not views:
            raise ValueError("no views")
        self.views = list(views)
        black = -torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)
        self.register_buffer("black", black.view(1, -1, 1, 1))
        grids = [rotation_grid(image_size, view_angle(v)) for v in self.views if view_angle(v) is not None]
        self.register_buffer("grids", torch.cat(grids) if grids else torch.zeros(0, image_size, image_size, 2))
        for v in self.views:
            if v not in (IDENTITY, HFLIP) and view_angle(v) is None:
                raise ValueError(f"unknown view {v!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, g = [], 0
        for v in self.views:
            if v == IDENTITY:
                out.append(x)
            elif v == HFLIP:
                out.append(torch.flip(x, dims=[3]))
            else:
                grid = self.grids[g : g + 1].expand(x.shape[0], -1, -1, -1)
                g += 1
                # Shift so that zero padding is black, rotate, shift back.
                out.append(F.grid_sample(x - self.black, grid, mode="bilinear", padding_mode="zeros",
                                         align_corners=False) + self.black)
        return torch.cat(out) if len(out) > 1 else out[0]
