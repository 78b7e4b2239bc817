"""Batched presets against the torchvision reference pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from covid_ray.data.io import resize_square
from covid_ray.config import AugmentParams
from covid_ray.data.transforms import EvalPreset, TrainPreset, resize_for
from helpers import smooth_image


def reference_eval(img: Image.Image, size: int, mean, std) -> torch.Tensor:
    return T.Compose([T.Resize(resize_for(size)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])(img)


@pytest.mark.parametrize("size", [224, 64])
def test_eval_matches_torchvision_reference(size):
    img = Image.fromarray(smooth_image(3, 299))
    cached = torch.from_numpy(resize_square(np.asarray(img), resize_for(size)))[None, None]
    ours = EvalPreset(image_size=size, in_chans=1)(cached)[0]
    ref = reference_eval(img, size, (0.449,), (0.226,))
    assert ours.shape == ref.shape == (1, size, size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    ours3 = EvalPreset(image_size=size, in_chans=3)(cached)[0]
    ref3 = reference_eval(img.convert("RGB"), size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(ours3, ref3, atol=1e-5, rtol=0)


def test_train_without_randomness_is_the_centre_crop():
    batch = torch.from_numpy(np.stack([smooth_image(s, 256) for s in range(4)]))[:, None]
    plain = TrainPreset(image_size=224, augment=AugmentParams(rotation=0, hflip=0))(batch)
    torch.testing.assert_close(plain, EvalPreset(image_size=224)(batch), atol=1e-5, rtol=0)


def test_flip_and_rotation_do_what_they_say():
    batch = torch.from_numpy(smooth_image(5, 72))[None, None]  # even margin: pixel-aligned crop
    flipped = TrainPreset(image_size=64, augment=AugmentParams(rotation=0, hflip=1.0))(batch)
    plain = EvalPreset(image_size=64)(batch)
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-5, rtol=0)
    preset = TrainPreset(image_size=64, augment=AugmentParams(rotation=10, hflip=0))
    theta = preset.affine(2000, 73, generator=torch.Generator().manual_seed(0))
    degrees = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 1, 1]))
    assert degrees.abs().max() <= 10.0 + 1e-4 and degrees.abs().max() > 9.5
    assert abs(float(degrees.mean())) < 0.5


def test_train_output_shape_dtype_and_determinism():
    batch = torch.randint(0, 256, (6, 1, 73, 73), dtype=torch.uint8)
    preset = TrainPreset(
        image_size=64, in_chans=3, augment=AugmentParams(crop_scale=(0.6, 1.0), brightness=0.2, contrast=0.2)
    )
    a = preset(batch, generator=torch.Generator().manual_seed(1))
    b = preset(batch, generator=torch.Generator().manual_seed(1))
    c = preset(batch, generator=torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_bad_augment_params_are_named():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentParams(crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="hflip"):
        AugmentParams(hflip=1.5)
    with pytest.raises(TypeError, match="uint8"):
        EvalPreset(image_size=8)(torch.zeros(1, 1, 9, 9))


def test_batched_grid_equals_affine_grid():
    import torch.nn.functional as F

    from covid_ray.data.transforms import _affine_grid

    theta = TrainPreset(image_size=48, augment=AugmentParams(crop_scale=(0.5, 1.0))).affine(5, 55)
    torch.testing.assert_close(_affine_grid(theta, 48), F.affine_grid(theta, [5, 1, 48, 48], align_corners=False))
