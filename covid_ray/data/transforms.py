"""Train and eval presets, applied to whole uint8 batches on the device.

They follow the reference recipe, scaled to the working ``image_size`` S:

* train: Resize R -> RandomRotation(10) -> RandomHorizontalFlip -> CenterCrop S ->
  ToTensor -> Normalize, where R = round(S * 256 / 224) (256 for 224 px);
* eval:  Resize R -> CenterCrop S -> ToTensor -> Normalize.

The Resize happens once, in the decode cache (:mod:`covid_ray.data.cache`), so a
preset receives (B, 1, R, R) uint8 tensors. The random geometric part of the train
preset (rotation, flip, and an optional zoom/shift crop) is one affine map per image,
applied to the whole batch with one ``grid_sample`` call on the batch's device
(the GPU when there is one) instead of per-image PIL operations in loader workers.
Brightness/contrast jitter is optional; with the defaults the train preset is the
reference recipe.

Input is grayscale. With ``in_chans=1`` images are normalized with the grayscale
equivalent of ImageNet's statistics (mean 0.449, std 0.226, as timm does for 1-channel
models); with ``in_chans=3`` the channel is replicated and ImageNet's per-channel
statistics are used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from covid_ray.config import AugmentParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)


def normalization_for(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for grayscale input shown to a model with ``in_chans`` channels."""
    if in_chans == 1:
        return GRAY_MEAN, GRAY_STD
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")


def resize_for(image_size: int) -> int:
    """Working resolution R before the crop: 256 for 224, in the same ratio otherwise."""
    return int(round(image_size * 256 / 224))


def crop_offset(resize: int, image_size: int) -> int:
    """First row (and column) of the centre crop S from R, as torchvision's CenterCrop."""
    return int(round((resize - image_size) / 2.0))


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dtype != torch.uint8:
        raise TypeError(f"presets take uint8 batches, got {images.dtype}")
    return images.float().div_(255.0)


def _normalize(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    mean, std = normalization_for(in_chans)
    if in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, 1, size, size], align_corners=False)``, by broadcasting.

    The same numbers (to float rounding) at a fraction of the cost on CPU, where
    ``affine_grid``'s batched matmul over every output pixel dominated the warp. The
    per-row term (B, size, 1) is formed first, so each coordinate costs one full-size
    pass, written straight into the output (no stack copy).
    """
    lin = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1
    xs, ys = lin.view(1, 1, size), lin.view(1, size, 1)
    a = theta.reshape(-1, 6, 1, 1)
    grid = torch.empty(theta.shape[0], size, size, 2, device=theta.device, dtype=theta.dtype)
    torch.addcmul(torch.addcmul(a[:, 2], ys, a[:, 1]), xs, a[:, 0], out=grid[..., 0])
    torch.addcmul(torch.addcmul(a[:, 5], ys, a[:, 4]), xs, a[:, 3], out=grid[..., 1])
    return grid


class EvalPreset:
    """Centre crop S from (B, 1, R, R) uint8 and normalize; exact, no resampling."""

    def __init__(self, *, image_size: int, in_chans: int = 1):
        self.image_size = image_size
        self.in_chans = in_chans

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = _to_float(images)
        r, s = x.shape[-1], self.image_size
        if r < s:
            raise ValueError(f"images are {r}px, smaller than the crop {s}px")
        top = crop_offset(r, s)
        x = x[..., top : top + s, top : top + s]
        return _normalize(x, self.in_chans).contiguous()


class TrainPreset:
    """Random rotation, flip and crop as one batched affine warp, then jitter and normalize."""

    def __init__(self, *, image_size: int, in_chans: int = 1, augment: AugmentParams | None = None):
        self.image_size = image_size
        self.in_chans = in_chans
        self.augment = augment or AugmentParams()

    def affine(self, batch: int, resize: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 2, 3) maps from output to input coordinates, in ``affine_grid``'s convention."""
        a = self.augment
        u = torch.rand(batch, 5, generator=generator)
        angle = torch.deg2rad((u[:, 0] * 2 - 1) * a.rotation)
        flip = torch.where(u[:, 1] < a.hflip, -1.0, 1.0)
        lo, hi = a.crop_scale
        zoom = torch.sqrt(lo + (hi - lo) * u[:, 2])  # side factor from an area factor
        k = self.image_size / resize * zoom
        # A shift only when zooming in, so that the default is the exact centre crop.
        slack = (1 - k).clamp(min=0) if lo < 1 else torch.zeros_like(k)
        tx, ty = (u[:, 3] * 2 - 1) * slack, (u[:, 4] * 2 - 1) * slack
        cos, sin = torch.cos(angle), torch.sin(angle)
        # input = Rot(angle) @ diag(flip*k, k) @ output + t
        theta = torch.stack(
            [
                torch.stack([cos * flip * k, -sin * k, tx], dim=1),
                torch.stack([sin * flip * k, cos * k, ty], dim=1),
            ],
            dim=1,
        )
        return theta

    def __call__(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_float(images)
        b, r, s = x.shape[0], x.shape[-1], self.image_size
        theta = self.affine(b, r, generator=generator).to(device=x.device, dtype=x.dtype)
        grid = _affine_grid(theta, s)
        # zeros padding: the corners a rotation uncovers are black, as RandomRotation's fill=0.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        a = self.augment
        if a.brightness > 0 or a.contrast > 0:
            j = torch.rand(b, 2, generator=generator).to(x.device)
            bright = (1 + (j[:, 0] * 2 - 1) * a.brightness).view(b, 1, 1, 1)
            contrast = (1 + (j[:, 1] * 2 - 1) * a.contrast).view(b, 1, 1, 1)
            x = x * bright
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean).clamp_(0, 1)
        return _normalize(x, self.in_chans).contiguous()
