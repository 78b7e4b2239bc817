"""Model registry and builders for chest X-ray classifiers (timm-style).

Builders are small functions registered by name with ``@register_model``;
``create_model(name, num_classes, ...)`` builds one, optionally loads pretrained
weights from local disk, and records its constructor arguments on the module
(``model.covid_ray_args``) so a checkpoint can store them and rebuild the model
with ``create_model(**args)``.

Grayscale input: radiographs have one channel, so the first convolution is built
for ``in_chans`` inputs (default 1) instead of replicating the image to three
channels, which would triple input bandwidth for no extra information. When
3-channel ImageNet weights are loaded into a 1-channel model, the first-conv
kernel is summed over its input channels (timm's ``adapt_input_conv``): a gray
image copied to R, G and B gives the same response through the original kernel
as through the summed one. Normalize 1-channel input with the grayscale
equivalents of the ImageNet statistics (``normalization_for(1)``).

Pretrained weights (:mod:`covid_ray.pretrained`): ``pretrained="imagenet"`` loads
torchvision's ImageNet weights from the torch hub cache, downloading them with a
timeout when they are missing and a network is there; offline it warns once and the
model starts from random weights. torchvision itself is imported only by the builders
of its models, so a ``seed_cnn`` worker never pays for it.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from covid_ray import pretrained as weights_io

# The input statistics live with the presets that apply them (one definition);
# re-exported here because a model's first conv and its normalization go together.
from covid_ray.data.transforms import (  # noqa: F401
    GRAY_MEAN,
    GRAY_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalization_for,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one architecture.

    Attributes:
        builder: ``builder(num_classes, in_chans, **kwargs) -> nn.Module``.
        first_conv: dotted path of the input convolution (adapted to ``in_chans``).
        head: dotted path of the module left trainable by ``freeze_backbone``.
        classifier: dotted path of the final Linear whose shape depends on
            ``num_classes``; its weights are dropped when loading a checkpoint
            made for a different number of classes.
        cam_layer: dotted path of the module whose output Grad-CAM explains (the last
            spatial feature map before pooling); "" for the root module.
        weights: name of the torchvision Weights enum (``"ResNet18_Weights"``) whose
            IMAGENET1K_V1 member ``pretrained="imagenet"`` loads, or None when the
            architecture has no published weights. A name, so that building the registry
            does not import torchvision.
        remap_keys: optional fix-up of state_dict keys from older files.
    """

    name: str
    builder: Callable[..., nn.Module]
    first_conv: str
    head: str
    classifier: str
    cam_layer: str
    weights: str | None = None
    remap_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


_MODEL_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    first_conv: str = "features.0.0",
    head: str = "classifier",
    classifier: str | None = None,
    cam_layer: str = "features",
    weights: str | None = None,
    remap_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Any:
    """Register a builder under its function name; usable bare or with keywords."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _MODEL_REGISTRY[name] = ModelEntry(
            name=name,
            builder=builder,
            first_conv=first_conv,
            head=head,
            classifier=classifier or head,
            cam_layer=cam_layer,
            weights=weights,
            remap_keys=remap_keys,
        )
        return builder

    return decorate(fn) if fn is not None else decorate


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered model names matching an fnmatch ``pattern``."""
    return sorted(n for n in _MODEL_REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_entry(name: str) -> ModelEntry:
    """Registry entry for ``name``; ValueError listing the known names otherwise."""
    try:
        return _MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


# --------------------------------------------------------------------------- builders


def _conv_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SeedCNN(nn.Module):
    """The reference network: four conv blocks and a two-layer classifier.

    Blocks are Conv 3x3 (padding 1) -> BatchNorm -> ReLU -> MaxPool 2x2 with 32,
    64, 128 and 256 channels, then Linear(256*14*14 -> 512) -> ReLU -> Dropout ->
    Linear(-> num_classes). The classifier was sized for 224 px input, where the
    feature map is exactly 14x14. ``pool`` is an ``AdaptiveAvgPool2d(14)`` so any
    other size still yields 14x14 (averaged down, or repeated up below 224 px);
    at 224 px it is an identity and the network is the reference one.
    """

    def __init__(self, num_classes: int, in_chans: int = 1, dropout: float = 0.5) -> None:
        super().__init__()
        widths = (32, 64, 128, 256)
        blocks, prev = [], in_chans
        for width in widths:
            blocks.append(_conv_block(prev, width))
            prev = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(14)
        self.classifier = nn.Sequential(
            nn.Linear(prev * 14 * 14, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model(first_conv="features.0.0", head="classifier", classifier="classifier.3", cam_layer="features.3")
def seed_cnn(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """Reference CNN (no published pretrained weights)."""
    return SeedCNN(num_classes, in_chans, **kwargs)


# Every torchvision builder gets weights=None: create_model loads pretrained weights
# itself (covid_ray.pretrained), with the input conv adapted and a bounded download.


def _tv():
    import torchvision.models as tvm  # here, not at import time: ~1.5 s that seed_cnn never needs

    return tvm


@register_model(first_conv="conv1", head="fc", cam_layer="layer4", weights="ResNet18_Weights")
def resnet18(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-18."""
    return _with_in_chans(_tv().resnet18(weights=None, num_classes=num_classes, **kwargs), "conv1", in_chans)


@register_model(first_conv="conv1", head="fc", cam_layer="layer4", weights="ResNet50_Weights")
def resnet50(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-50."""
    return _with_in_chans(_tv().resnet50(weights=None, num_classes=num_classes, **kwargs), "conv1", in_chans)


@register_model(
    first_conv="features.0.0",
    head="classifier",
    classifier="classifier.1",
    cam_layer="features.8",
    weights="EfficientNet_B0_Weights",
)
def efficientnet_b0(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision EfficientNet-B0; head is Dropout -> Linear."""
    model = _tv().efficientnet_b0(weights=None, num_classes=num_classes, **kwargs)
    return _with_in_chans(model, "features.0.0", in_chans)


# torchvision's published DenseNet files predate a rename ("norm.1" -> "norm1");
# torchvision fixes the keys with this pattern when it loads them, and so do we.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _remap_densenet_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        match = _DENSENET_OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


# DenseNet's forward applies an in-place ReLU to its features' output; Grad-CAM's hook
# hands the network a copy, so the captured activations stay those of the layer.
@register_model(
    first_conv="features.conv0",
    head="classifier",
    cam_layer="features",
    weights="DenseNet121_Weights",
    remap_keys=_remap_densenet_keys,
)
def densenet121(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision DenseNet-121."""
    model = _tv().densenet121(weights=None, num_classes=num_classes, **kwargs)
    return _with_in_chans(model, "features.conv0", in_chans)


@register_model(
    first_conv="features.0.0",
    head="classifier",
    classifier="classifier.3",
    cam_layer="features.12",
    weights="MobileNet_V3_Small_Weights",
)
def mobilenet_v3_small(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision MobileNetV3-Small.

    Its ``classifier`` is Linear(576->1024) -> Hardswish -> Dropout -> Linear; the
    whole of it is the trainable head under ``freeze_backbone`` (torchvision's own
    features/classifier split), while only the last Linear is re-initialised
    when loading ImageNet weights for another number of classes.
    """
    model = _tv().mobilenet_v3_small(weights=None, num_classes=num_classes, **kwargs)
    return _with_in_chans(model, "features.0.0", in_chans)


def _with_in_chans(model: nn.Module, conv_path: str, in_chans: int) -> nn.Module:
    """Replace the 3-channel first conv of a torchvision model by an ``in_chans`` one."""
    old = model.get_submodule(conv_path)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"{conv_path!r} of {type(model).__name__} is {type(old).__name__}, expected Conv2d")
    if old.in_channels == in_chans:
        return model
    new = nn.Conv2d(
        in_chans,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    # Same init torchvision uses for these stems; fan_out does not depend on in_chans.
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_path, _, child = conv_path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
    return model


# --------------------------------------------------------------------------- create


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool | str | os.PathLike | None = None,
    in_chans: int = 1,
    freeze_backbone: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered model name (see ``list_models()``).
        num_classes: number of output logits.
        pretrained: None, False or ``"none"`` for random init; ``"imagenet"`` for
            torchvision's ImageNet weights (cache, else a bounded download); True or
            ``"torchvision"`` for the cache file only; or a path to a state_dict file
            (see :mod:`covid_ray.pretrained`). Weights that cannot be had give one
            warning and a randomly initialised model.
        in_chans: input channels; 1 for grayscale radiographs.
        freeze_backbone: leave only the head (``head_parameters``) trainable.
            BatchNorm running statistics still update in ``train()`` mode; call
            ``.eval()`` on the backbone in the training loop if they must stay fixed.
        **kwargs: passed to the builder (e.g. ``dropout``); None values are
            dropped so configs can leave a value at the builder's default.

    Returns:
        The model, with ``covid_ray_args`` (JSON-able kwargs that rebuild it via
        ``create_model(**args)``) and ``covid_ray_pretrained`` (the file loaded,
        or None) attributes.
    """
    entry = get_model_entry(name)
    if num_classes < 1 or in_chans < 1:
        raise ValueError(f"num_classes and in_chans must be >= 1, got {num_classes} and {in_chans}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model kwargs must be plain JSON values to be stored in checkpoints: {kwargs}") from exc

    bn_momentum = kwargs.pop("bn_momentum", None)
    model = entry.builder(num_classes, in_chans, **kwargs)
    if bn_momentum is not None:
        # torchvision builds MobileNetV3 and EfficientNet with BatchNorm momentum 0.01,
        # tuned for ImageNet-length schedules; after the few hundred steps of a short
        # run their running statistics are still near their initial values and eval-mode
        # outputs collapse to one class. PyTorch's default 0.1 settles in ~30 steps.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = float(bn_momentum)
        kwargs["bn_momentum"] = float(bn_momentum)
    loaded = None
    path = weights_io.resolve(entry, pretrained, stacklevel=3)  # warnings point at our caller
    if path is not None:
        weights_io.load_into(model, entry, path)
        loaded = str(path)

    if freeze_backbone:
        if loaded is None:
            logger.warning("freeze_backbone=True on a randomly initialised %s: only the head will learn", name)
        head_ids = {id(p) for p in head_parameters(model, name)}
        for param in model.parameters():
            param.requires_grad_(id(param) in head_ids)

    # Weights travel in the state_dict, so the rebuild args omit `pretrained`.
    model.covid_ray_args = {
        "name": name,
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        "freeze_backbone": bool(freeze_backbone),
        **kwargs,
    }
    model.covid_ray_pretrained = loaded
    return model


def cam_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The module whose output Grad-CAM explains, for a model built by :func:`create_model`."""
    entry = get_model_entry(name or model_spec(model)["name"])
    return model.get_submodule(entry.cam_layer)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """A copy of the JSON-able args that rebuild ``model`` with ``create_model(**spec)``."""
    args = getattr(model, "covid_ray_args", None)
    if args is None:
        raise ValueError(f"{type(model).__name__} was not built by covid_ray.models.create_model")
    return dict(args)


def head_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Parameters of the classification head (those ``freeze_backbone`` leaves trainable).

    ``name`` defaults to the registry name recorded by ``create_model``.
    """
    name = name or model_spec(model)["name"]
    return list(model.get_submodule(get_model_entry(name).head).parameters())


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters with ``requires_grad``, e.g. for the optimizer."""
    return (p for p in model.parameters() if p.requires_grad)
