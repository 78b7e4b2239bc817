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

Weights are never downloaded: ``pretrained=True`` only looks for torchvision's
cache file under ``$TORCH_HOME/hub/checkpoints/``; a missing file gives one
warning and a randomly initialised model.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

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
        weights: torchvision Weights enum member whose cache file ``pretrained=True``
            looks for, or None when the architecture has no published weights.
        remap_keys: optional fix-up of state_dict keys from older files.
    """

    name: str
    builder: Callable[..., nn.Module]
    first_conv: str
    head: str
    classifier: str
    weights: Any = None
    remap_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


_MODEL_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    first_conv: str = "features.0.0",
    head: str = "classifier",
    classifier: str | None = None,
    weights: Any = None,
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


def pretrained_cache_path(name: str) -> Path | None:
    """Where torchvision would cache the IMAGENET1K_V1 weights of ``name``.

    Only the file name is taken from the Weights enum's ``url``; nothing is
    downloaded. None for architectures without torchvision weights.
    """
    entry = get_model_entry(name)
    if entry.weights is None:
        return None
    filename = os.path.basename(entry.weights.url)
    # torch.hub.get_dir() is $TORCH_HOME/hub (default ~/.cache/torch/hub).
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


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


@register_model(first_conv="features.0.0", head="classifier", classifier="classifier.3")
def seed_cnn(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """Reference CNN (no published pretrained weights)."""
    return SeedCNN(num_classes, in_chans, **kwargs)


# Every torchvision builder gets weights=None so torchvision never downloads;
# pretrained weights are loaded by create_model from local disk only.


@register_model(first_conv="conv1", head="fc", weights=tvm.ResNet18_Weights.IMAGENET1K_V1)
def resnet18(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-18."""
    return _with_in_chans(tvm.resnet18(weights=None, num_classes=num_classes, **kwargs), "conv1", in_chans)


@register_model(first_conv="conv1", head="fc", weights=tvm.ResNet50_Weights.IMAGENET1K_V1)
def resnet50(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-50."""
    return _with_in_chans(tvm.resnet50(weights=None, num_classes=num_classes, **kwargs), "conv1", in_chans)


@register_model(
    first_conv="features.0.0",
    head="classifier",
    classifier="classifier.1",
    weights=tvm.EfficientNet_B0_Weights.IMAGENET1K_V1,
)
def efficientnet_b0(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision EfficientNet-B0; head is Dropout -> Linear."""
    model = tvm.efficientnet_b0(weights=None, num_classes=num_classes, **kwargs)
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


@register_model(
    first_conv="features.conv0",
    head="classifier",
    weights=tvm.DenseNet121_Weights.IMAGENET1K_V1,
    remap_keys=_remap_densenet_keys,
)
def densenet121(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision DenseNet-121."""
    model = tvm.densenet121(weights=None, num_classes=num_classes, **kwargs)
    return _with_in_chans(model, "features.conv0", in_chans)


@register_model(
    first_conv="features.0.0",
    head="classifier",
    classifier="classifier.3",
    weights=tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
)
def mobilenet_v3_small(num_classes: int, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """torchvision MobileNetV3-Small.

    Its ``classifier`` is Linear(576->1024) -> Hardswish -> Dropout -> Linear; the
    whole of it is the trainable head under ``freeze_backbone`` (torchvision's own
    features/classifier split), while only the last Linear is re-initialised
    when loading ImageNet weights for another number of classes.
    """
    model = tvm.mobilenet_v3_small(weights=None, num_classes=num_classes, **kwargs)
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


# --------------------------------------------------------------------------- pretrained


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor) -> torch.Tensor:
    """Adapt a first-conv kernel ``(out, c, kh, kw)`` to ``in_chans`` input channels.

    As timm's ``adapt_input_conv``: to 1 channel, sum over the input channels (a
    gray image replicated to RGB gives the same pre-activation); to another count
    from 1 or 3 channels, repeat the channels cyclically and rescale by
    ``c / in_chans`` so the expected activation is unchanged.
    """
    src = conv_weight.shape[1]
    if src == in_chans:
        return conv_weight
    dtype = conv_weight.dtype
    weight = conv_weight.float()
    if in_chans == 1:
        weight = weight.sum(dim=1, keepdim=True)
    elif src in (1, 3):
        repeat = math.ceil(in_chans / src)
        weight = weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (src / in_chans)
    else:
        raise ValueError(f"cannot adapt a first conv with {src} input channels to {in_chans}")
    return weight.to(dtype)


def _resolve_pretrained(name: str, pretrained: bool | str | os.PathLike) -> Path | None:
    """The file to load for ``pretrained``, or None for random init."""
    if pretrained is True or pretrained == "torchvision":
        path = pretrained_cache_path(name)
        if path is None:
            warnings.warn(
                f"model {name!r} has no torchvision pretrained weights; using random init "
                "(pass a path to a state_dict file of this model to load one)",
                stacklevel=3,  # point at create_model's caller
            )
        return path
    if pretrained is False:
        return None
    return Path(pretrained)


def load_pretrained(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``model``, a ``name`` model built by the registry.

    The first-conv kernel is adapted to the model's input channels, and the
    final classifier is dropped (left at its fresh init) when its shape differs.
    Any other missing, unexpected or mis-shaped key raises RuntimeError.
    """
    entry = get_model_entry(name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in several types
        raise RuntimeError(f"cannot read pretrained weights {path}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path} is not a state_dict (a mapping of parameter names to tensors)")
    state = dict(state)
    if entry.remap_keys is not None:
        state = entry.remap_keys(state)

    own = model.state_dict()
    conv_key = f"{entry.first_conv}.weight"
    if conv_key in state and conv_key in own:
        before = state[conv_key].shape[1]
        state[conv_key] = adapt_input_conv(own[conv_key].shape[1], state[conv_key])
        if before != own[conv_key].shape[1]:
            logger.info("adapted %s from %d to %d input channels", conv_key, before, own[conv_key].shape[1])

    head_keys = {f"{entry.classifier}.weight", f"{entry.classifier}.bias"}
    dropped = sorted(k for k in head_keys if k in state and k in own and state[k].shape != own[k].shape)
    for key in dropped:
        del state[key]

    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise RuntimeError(f"shape mismatch loading {path} into {name}: {'; '.join(mismatched)}")
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - set(dropped))
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{path} does not match {name}: missing keys {missing}, "
            f"unexpected keys {sorted(result.unexpected_keys)}"
        )
    logger.info("loaded pretrained %s from %s (re-initialised: %s)", name, path, dropped or "none")


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
        pretrained: None/False for random init; True or ``"torchvision"`` to load
            torchvision's IMAGENET1K_V1 cache file from ``$TORCH_HOME/hub/checkpoints``;
            or a path to a state_dict file. A missing file warns once and leaves
            the model randomly initialised; nothing is ever downloaded.
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
    if pretrained is not None:
        path = _resolve_pretrained(name, pretrained)
        if path is not None and not path.is_file():
            warnings.warn(
                f"pretrained weights for {name!r} not found at {path}; using random init "
                "(weights are never downloaded: copy the file there to use them)",
                stacklevel=2,
            )
        elif path is not None:
            load_pretrained(model, name, path)
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
