"""TrialConfig.from_flat: defaults, unknown keys, class multipliers, round trip, validation."""
from __future__ import annotations

import pytest

from covid_ray.config import CLASS_MULT_PREFIX, DataConfig, ModelConfig, OptimConfig, TrialConfig

MULT = CLASS_MULT_PREFIX  # flat keys MULT + "<class>" carry per-class loss multipliers

REQUIRED = {"data": "/d", "split": "/d/split.csv"}


def flat(**kw):
    return {**REQUIRED, **kw}


def test_defaults_fill_in_and_values_land_in_their_dataclass():
    cfg = TrialConfig.from_flat(flat(model="resnet18", lr=3e-4, image_size=64, rotation=5.0))
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.model, ModelConfig) and isinstance(cfg.optim, OptimConfig)
    assert (cfg.data.data, cfg.data.split, cfg.data.image_size, cfg.data.rotation) == ("/d", "/d/split.csv", 64, 5.0)
    assert cfg.model.model == "resnet18" and cfg.model.in_chans == 1
    assert cfg.optim.lr == 3e-4
    assert (cfg.optim.optimizer, cfg.optim.epochs, cfg.optim.class_weights, cfg.optim.class_mult) == ("adam", 20, "none", {})
    assert (cfg.optim.lr_factor, cfg.optim.lr_patience, cfg.optim.early_stop_patience) == (0.1, 3, 5)


def test_unknown_key_error_names_the_key():
    with pytest.raises(ValueError, match=r"unknown training config keys \['lerning_rate'\]"):
        TrialConfig.from_flat(flat(lerning_rate=0.1))
    with pytest.raises(ValueError) as info:
        TrialConfig.from_flat(flat(zzz=1, aaa=2))
    assert "['aaa', 'zzz']" in str(info.value) and f"{MULT}<class>" in str(info.value)


def test_missing_data_or_split_is_named():
    with pytest.raises(ValueError, match=r"missing \['split'\]"):
        TrialConfig.from_flat({"data": "/d"})
    with pytest.raises(ValueError, match=r"missing \['data', 'split'\]"):
        TrialConfig.from_flat({})


def test_class_mult_keys_become_a_dict_of_floats():
    cfg = TrialConfig.from_flat(flat(**{MULT + "COVID": 2, MULT + "Viral Pneumonia": 1.5}))
    assert cfg.optim.class_mult == {"COVID": 2.0, "Viral Pneumonia": 1.5}
    assert all(isinstance(v, float) for v in cfg.optim.class_mult.values())


def test_class_mult_keys_merge_with_a_class_mult_dict():
    cfg = TrialConfig.from_flat(flat(class_mult={"Normal": 0.5}, **{MULT + "COVID": 3.0}))
    assert cfg.optim.class_mult == {"Normal": 0.5, "COVID": 3.0}


def test_from_flat_does_not_mutate_its_input():
    d = flat(**{MULT + "COVID": 2.0})
    before = dict(d)
    TrialConfig.from_flat(d)
    assert d == before


def test_to_flat_round_trip():
    original = flat(
        model="mobilenet_v3_small", in_chans=3, optimizer="sgd", lr=0.05, momentum=0.8, batch_size=16,
        class_weights=[1.0, 2.0, 0.5, 3.0], crop_scale_min=0.7, brightness=0.1, amp="bf16",
        **{MULT + "COVID": 1.7},
    )
    cfg = TrialConfig.from_flat(original)
    out = cfg.to_flat()
    assert "class_mult" not in out and out[MULT + "COVID"] == 1.7
    for key, value in original.items():
        assert out[key] == value, key
    again = TrialConfig.from_flat(out)
    assert again == cfg
    assert again.to_flat() == out


def test_to_flat_holds_every_field_so_a_worker_needs_nothing_else():
    out = TrialConfig.from_flat(flat()).to_flat()
    import dataclasses

    names = {f.name for k in (DataConfig, ModelConfig, OptimConfig) for f in dataclasses.fields(k)} - {"class_mult"}
    assert set(out) == names


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"optimizer": "rmsprop"}, r"optimizer must be one of \('adam', 'adamw', 'sgd'\), got 'rmsprop'"),
        ({"lr": 0.0}, r"lr must be > 0, got 0.0"),
        ({"lr": -1e-3}, r"lr must be > 0, got -0.001"),
        ({"class_weights": "balancd"}, r"class_weights must be one of \('none', 'balanced', 'sqrt_balanced'\).*'balancd'"),
        ({"class_weights": [1.0, 0.0]}, r"class weights must be > 0"),
        ({"crop_scale_min": 0.0}, r"crop_scale must satisfy 0 < min <= max <= 1, got \(0.0, 1.0\)"),
        ({"crop_scale_min": 1.5}, r"crop_scale must satisfy 0 < min <= max <= 1, got \(1.5, 1.0\)"),
        ({"hflip": 1.5}, r"hflip must be a probability"),
        ({"image_size": 16}, r"image_size must be >= 32, got 16"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0"),
        ({"batch_size": 0}, r"batch_size must be >= 1"),
        ({"epochs": 0}, r"epochs must be >= 1"),
        ({"amp": "fp8"}, r"amp must be one of"),
        ({"in_chans": 2}, r"in_chans must be 1 or 3, got 2"),
        ({"lr_factor": 1.0}, r"lr_factor must be in \(0, 1\)"),
        ({MULT + "COVID": 0.0}, r"class multipliers must be > 0"),
    ],
)
def test_each_validation_message(bad, message):
    with pytest.raises(ValueError, match=message):
        TrialConfig.from_flat(flat(**bad))


@pytest.mark.parametrize("bad, key", [({"lr": "1e-3"}, "lr"), ({"image_size": "64"}, "image_size"),
                                      ({MULT + "COVID": "abc"}, MULT + "COVID")])
def test_a_value_of_the_wrong_type_is_a_value_error_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        TrialConfig.from_flat(flat(**bad))
