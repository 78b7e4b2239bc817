"""Checkpoints: identical rebuild, pickle-free loading, metadata.json, clear errors, train state."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from covid_ray.artifacts.checkpoint import (
    FORMAT,
    METADATA_FILE,
    MODEL_FILE,
    STATE_FILE,
    encode_checkpoint,
    load_checkpoint,
    load_train_state,
    model_from_checkpoint,
    save_checkpoint,
    write_checkpoint_files,
)
from covid_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, resize_for
from covid_ray.engine import EarlyStopping
from covid_ray.models import create_model

CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
SIZE = 64
# The small model for tests that are not about one architecture: seed_cnn's 25M-parameter
# classifier makes every save and load cost seconds.
SMALL = "mobilenet_v3_small"


def _trained_a_little(name: str, in_chans: int) -> nn.Module:
    """A model whose weights and BatchNorm statistics differ from a fresh build."""
    torch.manual_seed(0)
    model = create_model(name, len(CLASSES), in_chans=in_chans)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, in_chans, SIZE, SIZE)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    return model.eval()


def test_an_encoded_checkpoint_is_a_snapshot_that_later_training_does_not_change(tmp_path):
    """Training goes on while Ray Train's upload thread writes the encoded bytes."""
    model = _trained_a_little(SMALL, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    model(torch.randn(4, 1, SIZE, SIZE)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moment = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    files = encode_checkpoint(model, classes=CLASSES, image_size=SIZE, metrics={"val_macro_f1": 0.5}, epoch=2,
                              train_state={"optimizer": opt.state_dict()})
    assert set(files) == {MODEL_FILE, STATE_FILE, METADATA_FILE}
    model(torch.randn(4, 1, SIZE, SIZE)).sum().backward()  # the next epoch, in place
    opt.step()
    assert not torch.equal(model.state_dict()["classifier.3.weight"], before["classifier.3.weight"])
    write_checkpoint_files(tmp_path / "ckpt", files)
    saved = load_checkpoint(tmp_path / "ckpt")["state_dict"]
    for key, value in before.items():
        assert torch.equal(saved[key], value), key
    state = load_train_state(tmp_path / "ckpt")["optimizer"]["state"][0]
    for key, value in moment.items():
        assert torch.equal(state[key], value), key
    assert json.loads((tmp_path / "ckpt" / METADATA_FILE).read_text())["epoch"] == 2


@pytest.mark.parametrize("name", ["seed_cnn", "resnet18"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_round_trip_rebuilds_an_identical_model(tmp_path, name, in_chans):
    model = _trained_a_little(name, in_chans)
    save_checkpoint(tmp_path, model, classes=CLASSES, image_size=SIZE, metrics={"val_macro_f1": 0.5}, epoch=3)
    torch.manual_seed(123)  # the rebuild must not depend on the RNG
    rebuilt, payload = model_from_checkpoint(tmp_path)
    assert type(rebuilt) is type(model) and not rebuilt.training
    ours, theirs = model.state_dict(), rebuilt.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    x = torch.randn(2, in_chans, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert payload["model"] == {"name": name, "num_classes": 4, "in_chans": in_chans, "freeze_backbone": False}
    assert payload["epoch"] == 3 and payload["classes"] == CLASSES


def test_the_file_loads_with_weights_only_and_carries_everything(tmp_path):
    model = _trained_a_little(SMALL, 1)
    metrics = {"val_macro_f1": np.float32(0.75), "val_loss": torch.tensor(0.5), "recall": [0.5, np.int64(1)]}
    save_checkpoint(tmp_path, model, classes=CLASSES, image_size=SIZE, metrics=metrics, epoch=2,
                    config={"lr": 1e-3, "model": SMALL, "class_weights": [1.0, 2.0, 1.0, 1.0]})
    payload = torch.load(tmp_path / MODEL_FILE, map_location="cpu", weights_only=True)
    assert payload["format"] == FORMAT
    assert set(payload) >= {"model", "state_dict", "classes", "preprocess", "metrics", "epoch", "config"}
    assert payload["metrics"] == {"val_macro_f1": pytest.approx(0.75), "val_loss": 0.5, "recall": [0.5, 1]}
    assert payload["config"]["class_weights"] == [1.0, 2.0, 1.0, 1.0]
    # Enough to rebuild and run without covid-ray's loader:
    spec = dict(payload["model"])
    rebuilt = create_model(spec.pop("name"), spec.pop("num_classes"), **spec)
    rebuilt.load_state_dict(payload["state_dict"])


def test_numpy_float64_and_str_metrics_still_load_with_weights_only(tmp_path):
    metrics = {"val_macro_f1": np.float64(0.75), "note": np.str_("x")}
    save_checkpoint(tmp_path, _trained_a_little(SMALL, 1), classes=CLASSES, image_size=SIZE,
                    metrics=metrics, epoch=1)
    payload = load_checkpoint(tmp_path)
    assert payload["metrics"] == {"val_macro_f1": 0.75, "note": "x"}
    assert type(payload["metrics"]["val_macro_f1"]) is float


def test_a_data_parallel_wrapper_is_unwrapped(tmp_path):
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel's .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = _trained_a_little(SMALL, 1)
    save_checkpoint(tmp_path, Wrapper(model), classes=CLASSES, image_size=SIZE, metrics={}, epoch=1)
    payload = load_checkpoint(tmp_path)
    assert not any(k.startswith("module.") for k in payload["state_dict"])
    rebuilt, _ = model_from_checkpoint(payload)
    assert torch.equal(rebuilt.state_dict()["classifier.3.weight"], model.state_dict()["classifier.3.weight"])


@pytest.mark.parametrize("in_chans", [1, 3])
def test_metadata_json_describes_classes_and_preprocessing(tmp_path, in_chans):
    model = _trained_a_little(SMALL, in_chans)
    save_checkpoint(tmp_path, model, classes=CLASSES, image_size=SIZE, metrics={"val_accuracy": 0.9}, epoch=4)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["format"] == FORMAT and meta["classes"] == CLASSES and meta["epoch"] == 4
    assert meta["model"]["name"] == SMALL and meta["model"]["in_chans"] == in_chans
    assert meta["metrics"] == {"val_accuracy": 0.9}
    pre = meta["preprocess"]
    assert pre["image_size"] == SIZE and pre["resize"] == resize_for(SIZE) == 73
    assert pre["in_chans"] == in_chans and pre["crop"] == "center"
    if in_chans == 1:
        assert (pre["mean"], pre["std"]) == ([0.449], [0.226])
    else:
        assert (pre["mean"], pre["std"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert "channel" in pre["channel_handling"]
    assert "state_dict" not in meta  # metadata is small and human-readable


def test_checkpoint_at_224_records_the_reference_resize(tmp_path):
    save_checkpoint(tmp_path, _trained_a_little(SMALL, 1), classes=CLASSES, image_size=224, metrics={}, epoch=1)
    assert load_checkpoint(tmp_path)["preprocess"]["resize"] == 256


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=MODEL_FILE):
        load_checkpoint(tmp_path)  # an existing folder without model.pt


def test_corrupt_file_is_a_value_error_naming_it(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / MODEL_FILE).write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"broken/model\.pt.*not a readable checkpoint"):
        load_checkpoint(bad)


def test_truncated_checkpoint_is_a_value_error(tmp_path):
    save_checkpoint(tmp_path, _trained_a_little(SMALL, 1), classes=CLASSES, image_size=SIZE, metrics={}, epoch=1)
    data = (tmp_path / MODEL_FILE).read_bytes()
    (tmp_path / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.pt"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content",
    [{"state_dict": {"w": torch.zeros(2)}}, {"format": "someone-else/1"}, torch.zeros(3), [1, 2]],
    ids=["plain-dict", "other-format", "tensor", "list"],
)
def test_a_foreign_torch_file_is_a_value_error_naming_it(tmp_path, content):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=r"foreign\.pt: not a covid-ray checkpoint"):
        load_checkpoint(path)


class _Pickled:
    pass


def test_a_file_needing_unpickling_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": _Pickled()}, path)
    with pytest.raises(ValueError, match=r"evil\.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_train_state_round_trip(tmp_path):
    model = _trained_a_little(SMALL, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.randn(4, 1, SIZE, SIZE)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=0)
    sched.step(0.5)
    sched.step(0.4)  # one reduction
    early = EarlyStopping(patience=5)
    early.step(0.5, 1)
    early.step(0.4, 2)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": {},
             "early_stopping": early.state_dict()}
    save_checkpoint(tmp_path, model, classes=CLASSES, image_size=SIZE, metrics={}, epoch=2, train_state=state)

    loaded = load_train_state(tmp_path)
    assert set(loaded) == set(state)
    assert set(torch.load(tmp_path / STATE_FILE, weights_only=True)) == set(state)
    rebuilt, _ = model_from_checkpoint(tmp_path)
    opt2 = torch.optim.Adam(rebuilt.parameters(), lr=1.0)
    opt2.load_state_dict(loaded["optimizer"])
    sched2 = torch.optim.lr_scheduler.ReduceLROnPlateau(opt2, mode="max")
    sched2.load_state_dict(loaded["scheduler"])
    early2 = EarlyStopping()
    early2.load_state_dict(loaded["early_stopping"])

    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-4) and opt2.param_groups[0]["weight_decay"] == 1e-4
    for p, q in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for key in p:
            assert torch.equal(torch.as_tensor(p[key]), torch.as_tensor(q[key])), key
    assert sched2.state_dict() == sched.state_dict()
    assert early2 == early and loaded["scaler"] == {}
    # Both resume identically: one more step gives the same weights.
    model.train(), rebuilt.train()
    for m, o in ((model, opt), (rebuilt, opt2)):
        torch.manual_seed(7)  # same dropout mask
        o.zero_grad()
        nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 3])).backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), rebuilt.state_dict().values()):
        assert torch.equal(a, b), k


def test_no_train_state_is_none(tmp_path):
    save_checkpoint(tmp_path, _trained_a_little(SMALL, 1), classes=CLASSES, image_size=SIZE, metrics={}, epoch=1)
    assert not (tmp_path / STATE_FILE).exists()
    assert load_train_state(tmp_path) is None


def test_metadata_json_is_strict_json_when_a_metric_is_nan(tmp_path):
    metrics = {"val_accuracy": 0.9, "val_recall/COVID": float("nan")}
    save_checkpoint(tmp_path, _trained_a_little(SMALL, 1), classes=CLASSES, image_size=SIZE, metrics=metrics, epoch=1)

    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")

    meta = json.loads((tmp_path / "metadata.json").read_text(), parse_constant=refuse)
    assert meta["metrics"]["val_recall/COVID"] is None
