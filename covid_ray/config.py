"""One training configuration, as dataclasses built from a flat dict.

Ray Tune's ``param_space`` and the search-space YAML are flat (``lr``, ``model``,
``rotation``, ``class_mult.COVID`` ...). :meth:`TrialConfig.from_flat` turns such a dict
into typed, validated dataclasses, fills defaults and fails on unknown keys, so the
worker loop never reads a raw dict and a typo never trains silently with a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


# A dot, not a slash: Ray Tune flattens nested configs with "/" and rejects it in names.
CLASS_MULT_PREFIX = "class_mult."
CLASS_WEIGHT_MODES = ("none", "balanced", "sqrt_balanced")
OPTIMIZERS = ("adam", "adamw", "sgd")
AMP_MODES = ("auto", "off", "bf16")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _accepts(tp: Any, value: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return _is_number(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _check_type(klass: type, key: str, value: Any) -> None:
    """Raise a ValueError naming ``key`` when ``value`` does not fit the field's type.

    YAML reads ``1e-3`` (no dot) as a string; without this check it would fail deep
    inside a worker with an error that names no key.
    """
    tp = typing.get_type_hints(klass)[key]
    if not _accepts(tp, value):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) and tp in (float, float | None) else ""
        raise ValueError(f"training config key {key!r} must be {tp}, got {value!r}{hint}")


@dataclass(frozen=True, kw_only=True)
class AugmentParams:
    """Strength of the train-time augmentation (the search tunes these).

    rotation: max degrees of the uniform random rotation.
    hflip: probability of a horizontal flip.
    crop_scale: (min, max) area of the crop relative to the centre crop; (1, 1) is the
        reference centre crop, smaller values zoom in and shift at random.
    brightness, contrast: multiplicative jitter in [1 - x, 1 + x]; 0 disables.
    """

    rotation: float = 10.0
    hflip: float = 0.5
    crop_scale: tuple[float, float] = (1.0, 1.0)
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip must be a probability, got {self.hflip}")
        if self.rotation < 0 or self.brightness < 0 or self.contrast < 0:
            raise ValueError("rotation, brightness and contrast must be >= 0")


@dataclass(kw_only=True)
class DataConfig:
    data: str  # dataset root
    split: str  # manifest CSV
    image_size: int = 224
    cache_dir: str | None = None
    loader_workers: int = 0  # batches are memory-mapped slices: no worker processes needed
    rotation: float = 10.0
    hflip: float = 0.5
    crop_scale_min: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0

    def augment(self) -> AugmentParams:
        return AugmentParams(
            rotation=self.rotation,
            hflip=self.hflip,
            crop_scale=(self.crop_scale_min, 1.0),
            brightness=self.brightness,
            contrast=self.contrast,
        )


@dataclass(kw_only=True)
class ModelConfig:
    model: str = "seed_cnn"
    pretrained: str | None = None  # "imagenet" (cache, else a bounded download), "none", or a weights file; see covid_ray.pretrained
    freeze_backbone: bool = False
    in_chans: int = 1
    bn_momentum: float | None = 0.1  # None keeps each architecture's own (see covid_ray.models)


@dataclass(kw_only=True)
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    batch_size: int = 32  # per worker
    epochs: int = 20
    class_weights: str | list[float] = "none"
    class_mult: dict[str, float] = field(default_factory=dict)
    lr_factor: float = 0.1  # ReduceLROnPlateau on the validation metric
    lr_patience: int = 3
    early_stop_patience: int = 5  # 0 disables early stopping
    metric: str = "val_macro_f1"  # maximized
    amp: str = "auto"  # auto: fp16 + GradScaler on CUDA, fp32 on CPU; bf16: bf16 autocast on CPU too
    seed: int = 0


def flat_defaults() -> dict[str, Any]:
    """The default of every flat training key that has one (``data`` and ``split`` have none)."""
    out: dict[str, Any] = {}
    for klass in (DataConfig, ModelConfig, OptimConfig):
        for f in dataclasses.fields(klass):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    out.pop("class_mult", None)  # flat form: class_mult.<class>, 1.0 when absent
    return out


@dataclass(kw_only=True)
class TrialConfig:
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "TrialConfig":
        """Build from a flat dict; unknown keys and bad values raise ``ValueError`` naming them."""
        flat = dict(flat)
        mult = {}
        for key in [k for k in flat if k.startswith(CLASS_MULT_PREFIX)]:
            value = flat.pop(key)
            if not _is_number(value):
                raise ValueError(f"training config key {key!r} must be a number, got {value!r}")
            mult[key[len(CLASS_MULT_PREFIX) :]] = float(value)
        groups: dict[type, dict[str, Any]] = {DataConfig: {}, ModelConfig: {}, OptimConfig: {}}
        owners = {f.name: klass for klass in groups for f in dataclasses.fields(klass)}
        unknown = sorted(k for k in flat if k not in owners)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(owners)} and class_mult.<class>")
        for key, value in flat.items():
            _check_type(owners[key], key, value)
            groups[owners[key]][key] = value
        groups[OptimConfig].setdefault("class_mult", {}).update(mult)
        missing = [k for k in ("data", "split") if k not in groups[DataConfig]]
        if missing:
            raise ValueError(f"training config is missing {missing}")
        try:
            config = cls(
                data=DataConfig(**groups[DataConfig]),
                model=ModelConfig(**groups[ModelConfig]),
                optim=OptimConfig(**groups[OptimConfig]),
            )
        except TypeError as exc:  # pragma: no cover - guarded by the unknown-key check
            raise ValueError(str(exc)) from None
        config.validate()
        return config

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in (self.data, self.model, self.optim):
            out.update(dataclasses.asdict(part))
        for name, value in out.pop("class_mult").items():
            out[f"{CLASS_MULT_PREFIX}{name}"] = value
        return out

    def validate(self) -> None:
        d, m, o = self.data, self.model, self.optim
        checks = [
            (d.image_size >= 32, f"image_size must be >= 32, got {d.image_size}"),
            (o.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {o.optimizer!r}"),
            (o.lr > 0, f"lr must be > 0, got {o.lr}"),
            (o.weight_decay >= 0, f"weight_decay must be >= 0, got {o.weight_decay}"),
            (o.batch_size >= 1, f"batch_size must be >= 1, got {o.batch_size}"),
            (o.epochs >= 1, f"epochs must be >= 1, got {o.epochs}"),
            (o.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {o.amp!r}"),
            (m.in_chans in (1, 3), f"in_chans must be 1 or 3, got {m.in_chans}"),
            (all(v > 0 for v in o.class_mult.values()), f"class multipliers must be > 0, got {o.class_mult}"),
            (0 < o.lr_factor < 1, f"lr_factor must be in (0, 1), got {o.lr_factor}"),
        ]
        if isinstance(o.class_weights, str):
            checks.append(
                (o.class_weights in CLASS_WEIGHT_MODES,
                 f"class_weights must be one of {CLASS_WEIGHT_MODES} or a list of numbers, got {o.class_weights!r}")
            )
        else:
            checks.append((all(float(w) > 0 for w in o.class_weights), f"class weights must be > 0, got {o.class_weights}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        d.augment()  # validates the augmentation ranges
