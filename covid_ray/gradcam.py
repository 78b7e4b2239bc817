"""Grad-CAM of the torch models behind a prediction, and how much of it falls in the lungs.

Grad-CAM (Selvaraju et al., 2017): at a target layer with activations A (K maps), the
class score's gradient averaged over each map gives a weight per map, and
``ReLU(sum_k alpha_k A_k)`` upsampled to the input is where the evidence for that
class lies. The target layer of each architecture is the registry's ``cam_layer``
(:mod:`covid_ray.models`): ``seed_cnn``'s last conv block, ResNet's ``layer4``,
EfficientNet's and MobileNet's last feature block, DenseNet's ``features``.

An ensemble's map is the weighted mean of its members' maps, each normalized first to
sum 1 (an "attention distribution"): raw Grad-CAM magnitudes scale with each model's
gradients, so without it one member would dominate. With that normalization the
ensemble's in-lung share is exactly the weighted mean of the members' shares.

**In-lung share**: the fraction of the (non-negative) map's mass inside a lung mask,
as in Score-CAM's energy-based pointing game. A model whose evidence lies outside the
lung fields (text markers, borders, devices) is probably using a shortcut. Compare it
with the mask's share of the crop's area, which a uniform map would score.

Why a short implementation of our own rather than a library:

* ``grad-cam`` (pytorch-grad-cam) min-max normalizes every map (subtracting its
  minimum), which changes the share of mass inside a mask, and resizes with OpenCV:
  an ``opencv-python`` dependency (GUI libraries included) for one resize.
* ``captum``'s ``LayerGradCam`` computes the same numbers, but we would still write
  the ensemble weighting, the class mapping across members,
  the upsampling and the locking ourselves; what remains is the ~30 lines of
  :func:`grad_cam` (a forward hook and one ``torch.autograd.grad``). A test checks
  them against a model whose Grad-CAM is known in closed form.

Hooks are registered per call and removed after, and :class:`GradCam` serializes
calls with a lock on models of its own: hooks on a module shared with concurrent
predictions would capture the other requests' activations.
"""
from __future__ import annotations

import copy
import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageFilter

from covid_ray.artifacts.bundle import ModelLoadError, member_checkpoints
from covid_ray.artifacts.checkpoint import file_digest, load_checkpoint, model_file, model_from_checkpoint
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.data.io import read_grayscale, resize_square
from covid_ray.inference import LoadedModel
from covid_ray.models import cam_layer, list_models
from covid_ray.vote import class_order, soft_vote, vote_weights

logger = logging.getLogger(__name__)


class GradCamUnavailable(RuntimeError):
    """No torch model to explain the prediction with (e.g. the members' checkpoints are gone)."""


def target_layer(model: nn.Module, arch: str | None = None) -> nn.Module:
    """The Grad-CAM layer the registry names for ``arch`` (:func:`covid_ray.models.cam_layer`).

    A model the registry did not build gets its last Conv2d, with a warning.
    """
    if arch is None:
        arch = getattr(model, "covid_ray_args", {}).get("name")
    if arch in list_models():
        return cam_layer(model, arch)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"no Grad-CAM layer known for {arch!r} and it has no Conv2d; known: {list_models()}")
    logger.warning("no Grad-CAM layer registered for %r; using its last Conv2d", arch)
    return convs[-1]


def grad_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps at the input's resolution, and the logits.

    Args:
        model: in eval mode.
        layer: a module of ``model`` whose output is (B, K, h, w).
        x: (B, C, S, S) model input.
        targets: (B,) class index per image.

    Returns:
        (maps (B, S, S) >= 0, logits (B, classes)), both detached.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output)
        return output.clone()  # later in-place ops (DenseNet's ReLU) must not touch it

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            # Input requiring grad keeps a graph through layers frozen with freeze_backbone.
            logits = model(x.detach().requires_grad_(True))
            acts = captured[-1]
            score = logits.gather(1, targets.view(-1, 1).to(logits.device)).sum()
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * acts).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).clamp_min_(0)
    return cam[:, 0], logits.detach()


@dataclass
class CamMember:
    """One torch model the CAM is computed from."""

    name: str
    model: nn.Module
    weight: float
    classes: list[str]
    preprocess: Preprocess
    arch: str

    @property
    def layer(self) -> nn.Module:
        return target_layer(self.model, self.arch)


@dataclass
class CamResult:
    """Grad-CAM of one image for one class."""

    target: str
    cam: np.ndarray | None  # (S, S) weighted mean of the members' maps (each sums to 1); None with mixed sizes
    member_maps: list[np.ndarray]  # each (S_i, S_i), summing to 1 (all zeros: no positive evidence)
    lung_share: float | None = None
    member_shares: list[float | None] | None = None
    lung_area: float | None = None  # the mask's share of the crop


def share_fields(result: CamResult) -> dict:
    """The in-lung fields of a prediction's JSON (CLI line and HTTP answer) for a CAM computed with a mask."""
    share, area = result.lung_share, result.lung_area
    out = {"lung_cam_share": None if share is None else round(share, 4),
           "lung_area_share": None if area is None else round(area, 4)}
    if share is None:
        out["lung_cam_note"] = "empty Grad-CAM map: no positive evidence for the predicted class"
    elif not area:
        out["lung_cam_note"] = "the mask is empty inside the model's input crop"
    return out


def _normalized(cam: np.ndarray) -> np.ndarray:
    total = float(cam.sum())
    return cam / total if total > 0 else np.zeros_like(cam)


def share_inside(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the map's mass inside ``mask`` (bool, same shape); None for an all-zero map."""
    total = float(cam.sum())
    if total <= 0:
        return None
    return float(cam[mask].sum() / total)


class GradCam:
    """Weighted Grad-CAM over ensemble members (or one model); one call at a time.

    Each member is fed its own preprocessing of the decoded image, so members of
    different sizes or channel counts are explained exactly as they predict.
    """

    def __init__(self, members: Sequence[CamMember], classes: Sequence[str]):
        if not members:
            raise ValueError("Grad-CAM needs at least one member")
        self.members = list(members)
        self.weights = vote_weights([m.weight for m in members])
        self.classes = list(classes)
        self._orders = []
        for m in self.members:
            try:
                self._orders.append(class_order(m.classes, self.classes))
            except ValueError:
                raise ValueError(f"member {m.name}: classes {m.classes} differ from {self.classes}") from None
            m.model.eval()
            m.layer  # noqa: B018 - fail now, not at the first request, when no layer is found
        self._lock = threading.Lock()

    def __call__(self, gray: np.ndarray, *, target: str | None = None, mask: np.ndarray | None = None) -> CamResult:
        """Grad-CAM of ``gray`` (decoded (H, W) uint8) for class ``target`` (default: the ensemble's argmax).

        ``mask``: an optional lung mask (H', W') uint8, any size; it is resized to the
        image and then follows the image's preprocessing.
        """
        if target is not None and target not in self.classes:
            raise ValueError(f"unknown class {target!r}; classes are {self.classes}")
        inputs: dict[tuple, torch.Tensor] = {}  # one input per distinct preprocessing
        for m in self.members:
            key = (m.preprocess.resize, m.preprocess.image_size, m.preprocess.in_chans)
            if key not in inputs:
                inputs[key] = m.preprocess.tensor(m.preprocess.resized(gray))
        xs = [inputs[(m.preprocess.resize, m.preprocess.image_size, m.preprocess.in_chans)] for m in self.members]
        maps = []
        with self._lock:
            if target is None:
                target = self._ensemble_argmax(xs)
            for m, x in zip(self.members, xs):
                cam, _ = grad_cam(m.model, m.layer, x, torch.tensor([m.classes.index(target)]))
                maps.append(_normalized(cam[0].numpy().astype(np.float64)))
        shapes = {mp.shape for mp in maps}
        combined = sum(w * mp for w, mp in zip(self.weights, maps)) if len(shapes) == 1 else None
        result = CamResult(target=target, cam=combined, member_maps=maps)
        if mask is not None:
            masks = [mask_in_crop(mask, gray.shape, m.preprocess) for m in self.members]
            result.member_shares = [share_inside(mp, mk) for mp, mk in zip(maps, masks)]
            known = [(w, s) for w, s in zip(self.weights, result.member_shares) if s is not None]
            if known:
                result.lung_share = sum(w * s for w, s in known) / sum(w for w, _ in known)
            result.lung_area = float(np.mean([mk.mean() for mk in masks]))
        return result

    @torch.no_grad()
    def _ensemble_argmax(self, inputs: list[torch.Tensor]) -> str:
        probs = [torch.softmax(m.model(x).double(), dim=1).numpy() for m, x in zip(self.members, inputs)]
        return self.classes[int(np.argmax(soft_vote(probs, self.weights, self._orders)[0]))]


# --------------------------------------------------------------------------- masks


def find_kaggle_mask(image: str | Path) -> Path | None:
    """``<class>/masks/<name>`` beside ``<class>/images/<name>`` (the Kaggle layout), if present."""
    image = Path(image)
    if image.parent.name != "images":
        return None
    mask = image.parent.parent / "masks" / image.name
    return mask if mask.is_file() else None


def mask_in_crop(mask: np.ndarray, image_shape: tuple[int, int], preprocess: Preprocess) -> np.ndarray:
    """The lung mask as (S, S) bool, aligned with the model's input crop.

    The Kaggle masks are 256 px for 299 px images: resized (bilinear) to the image,
    then resized and cropped as the image is, then thresholded at half.
    """
    h, w = image_shape
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.BILINEAR))
    return preprocess.center_crop(resize_square(mask, preprocess.resize)) >= 128


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file as (H, W) uint8 (BadImageError when it is not an image)."""
    return read_grayscale(path)[0].array


# --------------------------------------------------------------------------- overlay


# Magenta: the one hue the jet colormap of the map never takes, so the outline stays visible on it.
OUTLINE_RGB = (1.0, 0.0, 1.0)


def lung_outline(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the border of a lung mask (any size, resized to ``shape``), about 1/300 of the side thick."""
    h, w = shape
    inside = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.BILINEAR)) >= 128
    width = max(1, round(max(h, w) / 300))
    eroded = np.asarray(Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1)))
    return inside & (eroded < 128)


def overlay_png(gray: np.ndarray, cam: np.ndarray, preprocess: Preprocess, *, mask: np.ndarray | None = None,
                max_side: int = 1024, alpha: float = 0.6) -> bytes:
    """PNG of the map over the radiograph at its own resolution (at most ``max_side`` px).

    The map covers the model's input crop; outside it there is none. Opacity follows
    the map (``alpha`` at its maximum), so regions without evidence show the image.
    With a lung ``mask`` ((H', W') uint8, any size: resized to the image) its outline is
    drawn in :data:`OUTLINE_RGB`, so the in-lung share can be checked by eye.
    """
    from matplotlib import colormaps  # not pyplot: no global figure state, safe in threads

    h, w = gray.shape
    scale = min(1.0, max_side / max(h, w))
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    base = gray if scale == 1.0 else np.asarray(Image.fromarray(gray).resize((ow, oh), Image.Resampling.BILINEAR))
    top, left, bh, bw = (v * scale for v in preprocess.crop_box(h, w))
    peak = float(cam.max())
    norm = (cam / peak if peak > 0 else cam).astype(np.float32)
    box = (max(1, round(bw)), max(1, round(bh)))
    patch = np.asarray(Image.fromarray(norm).resize(box, Image.Resampling.BILINEAR)).clip(0, 1)
    heat = np.zeros((oh, ow), np.float32)
    y0, x0 = round(top), round(left)
    ys, xs = slice(max(y0, 0), min(y0 + box[1], oh)), slice(max(x0, 0), min(x0 + box[0], ow))
    heat[ys, xs] = patch[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    rgb = colormaps["jet"](heat)[..., :3]
    a = (alpha * heat)[..., None]
    out = (1 - a) * (base[..., None] / 255.0) + a * rgb
    if mask is not None:
        out[lung_outline(mask, (oh, ow))] = OUTLINE_RGB
    buf = io.BytesIO()
    Image.fromarray(np.round(out * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- building


def gradcam_for(model: LoadedModel) -> GradCam:
    """The Grad-CAM of a loaded model: its torch members (ensemble) or a copy of itself.

    Raises:
        GradCamUnavailable: an ensemble member's checkpoint is missing, changed or unusable.
    """
    if model.kind == "checkpoint":
        # A copy: hooks on the module that serves predictions would see other requests.
        arch = model.meta["model"]["name"]
        member = CamMember(model.path.parent.name, copy.deepcopy(model.module), 1.0, model.classes,
                           model.preprocess, arch)
        return GradCam([member], model.classes)
    try:
        members = [_exported_member(e, model) for e in member_checkpoints(model.path, model.meta)]
    except (ModelLoadError, FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        raise GradCamUnavailable(f"Grad-CAM needs the ensemble's torch members: {exc}") from None
    return GradCam(members, model.classes)


def _exported_member(entry: dict, model: LoadedModel) -> CamMember:
    """One member of an exported ensemble, rebuilt from the checkpoint it was exported from.

    Raises:
        ModelLoadError: the checkpoint changed since the export (sha256), or its classes or
            image size are not the ensemble's.
    """
    file = model_file(entry["checkpoint"])
    if entry["sha256"] and file_digest(file) != entry["sha256"]:
        raise ModelLoadError(f"{file}: changed since the ensemble was exported (sha256 differs)")
    payload = load_checkpoint(file)
    if sorted(payload["classes"]) != sorted(model.classes):
        raise ModelLoadError(f"{file}: classes {payload['classes']} differ from the ensemble's {model.classes}")
    own, pre = Preprocess.from_dict(payload["preprocess"], source=file), model.preprocess
    if (own.image_size, own.resize) != (pre.image_size, pre.resize):
        raise ModelLoadError(f"{file}: {own.image_size}px from {own.resize}px, the ensemble uses "
                             f"{pre.image_size}px from {pre.resize}px")
    module, payload = model_from_checkpoint(payload)
    return CamMember(entry["trial_id"], module, entry["weight"], list(payload["classes"]), own, payload["model"]["name"])
