"""The formats between stages (``covid_ray.artifacts``) and the one soft vote (``covid_ray.vote``)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from covid_ray.artifacts.experiment import (
    ExperimentError,
    best_checkpoint,
    read_experiment,
    read_trials,
    write_experiment,
)
from covid_ray.artifacts.plain import json_safe, torch_plain, write_json
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.data.transforms import EvalPreset
from covid_ray.vote import class_order, soft_vote, vote_weights


def test_soft_vote_is_one_computation_for_numpy_and_torch():
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(3), size=5) for _ in range(3)]
    orders = [None, class_order(["b", "c", "a"], ["a", "b", "c"]), None]
    weights = vote_weights([2.0, 1.0, 1.0])
    got = soft_vote(probs, weights, orders)
    by_hand = 0.5 * probs[0] + 0.25 * probs[1][:, [2, 0, 1]] + 0.25 * probs[2]
    assert np.allclose(got, by_hand, atol=1e-15) and np.allclose(got.sum(axis=1), 1)
    as_torch = soft_vote([torch.from_numpy(p) for p in probs], weights, [o if o is None else o.tolist() for o in orders])
    assert torch.equal(as_torch, torch.from_numpy(got))  # the same operations, in the same order
    with pytest.raises(ValueError, match="non-negative"):
        vote_weights([1.0, -1.0])
    with pytest.raises(ValueError, match="2 non-negative"):
        vote_weights([1.0], members=2)
    with pytest.raises(ValueError, match="differ"):
        class_order(["a", "b"], ["a", "c"])


def test_the_trials_checkpoint_is_the_best_epochs_else_the_last():
    history = pd.DataFrame({"epoch": [1, 2, 3], "checkpoint": ["c1", "", "c3"]})
    assert best_checkpoint(history, 1) == "c1"
    assert best_checkpoint(history, 2) == "c3"  # no checkpoint at its best epoch: the latest
    assert best_checkpoint(history, float("nan")) == "c3"
    assert best_checkpoint(history.astype(str), "1.0") == "c1"  # tables read as text
    assert best_checkpoint(history.assign(checkpoint=""), 1) == ""


def test_experiment_json_has_one_writer_and_one_checked_reader(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "split.csv").write_text("path,label\n")
    meta = {"name": "e", "data": str(tmp_path / "data"), "split": "split.csv", "synthetic": True,
            "metric": "val_macro_f1", "mode": "max", "classes": ["COVID", "Normal"], "created": "now"}
    write_experiment(tmp_path, meta)
    assert json.loads((tmp_path / "experiment.json").read_text()) == meta
    experiment = read_experiment(tmp_path)
    assert experiment.split == tmp_path / "split.csv" and experiment.classes == ["COVID", "Normal"]
    with pytest.raises(ExperimentError, match=r"missing keys \['classes'\]"):
        write_experiment(tmp_path, {k: v for k, v in meta.items() if k != "classes"})
    write_json(tmp_path / "experiment.json", {**meta, "mode": "sideways"})
    with pytest.raises(ExperimentError, match="'mode' must be 'max' or 'min'"):
        read_experiment(tmp_path)
    with pytest.raises(ExperimentError, match="not found"):
        read_experiment(tmp_path / "elsewhere")


def test_trials_csv_reads_numbers_as_numbers_and_text_as_text(tmp_path):
    (tmp_path / "trials.csv").write_text("trial_id,status,best_val_macro_f1,best_epoch,checkpoint\n"
                                         "0001,TERMINATED,0.5,2.0,/c\n0002,ERROR,,,\n")
    trials = read_trials(tmp_path)
    assert list(trials["trial_id"]) == ["0001", "0002"] and list(trials["checkpoint"]) == ["/c", ""]
    assert trials["best_val_macro_f1"].iloc[0] == 0.5 and math.isnan(trials["best_epoch"].iloc[1])
    assert list(read_trials(tmp_path, as_text=True)["best_epoch"]) == ["2.0", ""]
    (tmp_path / "trials.csv").write_text("trial_id\nx\n")
    with pytest.raises(ExperimentError, match=r"missing columns \['checkpoint'\]"):
        read_trials(tmp_path)


def test_plain_values_for_torch_keep_nan_and_for_json_do_not(tmp_path):
    value = {"a": np.float64("nan"), "b": (np.int64(3), np.str_("x")), 4: np.bool_(True)}
    assert math.isnan(torch_plain(value)["a"]) and type(torch_plain(value)["b"][0]) is int
    assert json_safe(value) == {"a": None, "b": [3, "x"], "4": True}
    assert write_json(tmp_path / "m.json", value).read_text() == json.dumps(json_safe(value), indent=2) + "\n"


def test_the_recorded_preprocessing_is_the_eval_presets():
    pre = Preprocess.for_model(32, 3)
    assert pre.resize == 37 and pre.to_dict()["mean"] == [0.485, 0.456, 0.406]
    assert list(pre.to_dict(channel_handling=True)) == ["image_size", "resize", "crop", "in_chans", "channel_handling",
                                                        "mean", "std", "value_range"]
    assert Preprocess.from_dict(pre.to_dict(), source="x") == pre
    resized = np.arange(37 * 37, dtype=np.int64).reshape(37, 37) % 251
    crop = pre.center_crop(resized.astype(np.uint8))
    x = EvalPreset(image_size=32, in_chans=1)(torch.from_numpy(resized.astype(np.uint8))[None])
    assert np.allclose(crop / 255.0, x[0, 0].numpy() * 0.226 + 0.449, atol=1e-6)  # the window the model sees
