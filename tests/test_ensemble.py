"""The ensemble's math on arrays, trial ranking, the exported graph and the int8 parity gate."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from covid_ray.data.transforms import EvalPreset, normalization_for, resize_for
from covid_ray.metrics import expected_calibration_error, nll
from covid_ray.models import create_model
from ensemble.calibrate import apply_temperature, fit_temperature
from ensemble.combine import combine_weights, fit_weights, greedy_selection, mixture_nll, soft_vote
from ensemble.export import EnsembleModule, ExportRefused, InputAdapter, export_onnx, input_spec
from ensemble.quantize import parity_gate, quantize_int8, run_onnx, session
from ensemble.select import Experiment, Member, SelectionError, rank_trials


def random_probs(seed: int, members: int = 4, n: int = 200, k: int = 3, *, skill: float = 1.5):
    """Member probabilities of varied quality and the labels they try to predict."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(members, n, k))
    logits[:, np.arange(n), labels] += skill * rng.uniform(0.2, 1.5, size=(members, 1))
    logits *= rng.uniform(0.5, 4.0, size=(members, 1, 1))  # some over-, some under-confident
    e = np.exp(logits - logits.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True), labels


# --------------------------------------------------------------------------- combine


def test_soft_vote_is_the_hand_computed_mean():
    probs = np.array([
        [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]],
        [[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]],
    ])
    expected = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    assert np.allclose(soft_vote(probs), expected)
    # weights 3:1 -> 0.75 * first + 0.25 * second
    expected_w = np.array([[0.85, 0.15], [0.3, 0.7], [0.4, 0.6]])
    assert np.allclose(soft_vote(probs, np.array([3.0, 1.0])), expected_w)
    assert np.allclose(combine_weights("soft", probs, np.array([0, 1, 1])), [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        soft_vote(probs, np.array([1.0, -1.0]))


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_never_worse_than_the_best_single_member_on_validation(seed):
    probs, labels = random_probs(seed)
    weights, history = greedy_selection(probs, labels, rounds=20)
    best_single = min(nll(labels, p) for p in probs)
    assert mixture_nll(probs, labels, weights) <= best_single + 1e-12
    assert history[0] == pytest.approx(best_single)  # round 1 picks the best member
    assert weights.sum() == pytest.approx(1) and (weights >= 0).all()
    # Weights are pick counts of the best prefix: multiples of 1/len(prefix).
    prefix = int(np.argmin(history)) + 1
    assert np.allclose(weights * prefix, np.round(weights * prefix))


@pytest.mark.parametrize("seed", range(3))
def test_fitted_weights_are_on_the_simplex_and_beat_equal_weights(seed):
    probs, labels = random_probs(seed)
    w = fit_weights(probs, labels)
    assert (w >= 0).all() and w.sum() == pytest.approx(1)
    assert mixture_nll(probs, labels, w) <= mixture_nll(probs, labels) + 1e-12


def test_fitted_weights_avoid_a_useless_member():
    probs, labels = random_probs(0, members=2, skill=3.0)
    noise = np.random.default_rng(1).dirichlet(np.ones(3), size=len(labels))  # knows nothing
    w = fit_weights(np.concatenate([probs, noise[None]]), labels)
    assert w[2] < 0.1


# --------------------------------------------------------------------------- calibrate


def test_temperature_lowers_nll_of_an_over_confident_ensemble():
    rng = np.random.default_rng(0)
    n, k = 400, 3
    labels = rng.integers(0, k, n)
    # Right 70% of the time but always ~99% sure: over-confident.
    pred = np.where(rng.random(n) < 0.7, labels, (labels + 1) % k)
    probs = np.full((n, k), 0.005)
    probs[np.arange(n), pred] = 0.99
    t = fit_temperature(probs, labels)
    after = apply_temperature(probs, t)
    assert t > 1
    assert nll(labels, after) < nll(labels, probs) - 0.5
    assert expected_calibration_error(labels, after) < expected_calibration_error(labels, probs) / 2
    assert (after.argmax(axis=1) == probs.argmax(axis=1)).all()  # accuracy untouched


def test_temperature_on_probabilities_is_a_power_and_identity_at_one():
    probs, labels = random_probs(3, members=1)
    p = probs[0]
    assert np.allclose(apply_temperature(p, 1.0), p)
    powered = p ** (1 / 2.5)
    assert np.allclose(apply_temperature(p, 2.5), powered / powered.sum(axis=1, keepdims=True))
    # Labels drawn from p make p calibrated; softened by T=4 it is under-confident, and the
    # fit sharpens it back (T near 1/4) without ever making validation NLL worse.
    rng = np.random.default_rng(0)
    calibrated = apply_temperature(rng.dirichlet(np.ones(3) * 0.3, size=2000), 1.0)
    drawn = np.array([rng.choice(3, p=row) for row in calibrated])
    soft = apply_temperature(calibrated, 4.0)
    t = fit_temperature(soft, drawn)
    assert 0.2 < t < 0.3 and nll(drawn, apply_temperature(soft, t)) < nll(drawn, soft)


# --------------------------------------------------------------------------- select


def _experiment(tmp_path, metric="val_macro_f1", mode="max"):
    return Experiment(tmp_path, "x", tmp_path, tmp_path / "split.csv", True, metric, mode, ["COVID", "Normal"])


def test_trials_are_ranked_by_their_best_metric_and_rows_without_checkpoint_are_left_out():
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e"],
        "checkpoint": ["/a", "/b", "", "/d", "/e"],
        "best_val_macro_f1": [0.7, 0.9, 0.99, float("nan"), 0.7],
        "best_val_loss": [0.3, 0.1, 0.0, 0.5, 0.2],
    }).astype({"checkpoint": str})
    ranked, notes = rank_trials(trials, "val_macro_f1", "max")
    assert ranked["trial_id"].tolist() == ["b", "a", "e"]  # ties broken by trial_id
    assert any("no checkpoint" in n for n in notes) and any("no finite" in n for n in notes)
    ranked, _ = rank_trials(trials, "val_loss", "min")
    assert ranked["trial_id"].tolist() == ["b", "e", "a", "d"]
    with pytest.raises(SelectionError, match="best_val_auc.*best_val_loss"):
        rank_trials(trials, "val_auc", "max")


# --------------------------------------------------------------------------- export


def fake_member(trial_id: str, name: str, *, image_size: int = 40, in_chans: int = 1, classes=("COVID", "Normal"),
                seed: int = 0) -> Member:
    """A randomly initialised member with a checkpoint-like payload (no file)."""
    torch.manual_seed(seed)
    model = create_model(name, len(classes), in_chans=in_chans).eval()
    mean, std = normalization_for(in_chans)
    payload = {
        "classes": list(classes),
        "model": {"name": name},
        "preprocess": {"image_size": image_size, "resize": resize_for(image_size), "crop": "center",
                       "in_chans": in_chans, "mean": list(mean), "std": list(std)},
    }
    return Member(trial_id, name, 0.5, None, "0" * 64, payload, model)


def test_input_adapter_is_exact_for_three_channel_members():
    images = torch.randint(0, 256, (5, 1, 46, 46), dtype=torch.uint8)
    gray = EvalPreset(image_size=40, in_chans=1)(images)
    rgb = EvalPreset(image_size=40, in_chans=3)(images)
    spec = {"mean": list(normalization_for(1)[0]), "std": list(normalization_for(1)[1])}
    adapted = InputAdapter(spec, *normalization_for(3))(gray)
    assert adapted.shape == rgb.shape and torch.allclose(adapted, rgb, atol=1e-5)


def test_members_of_different_sizes_are_refused_by_name():
    members = [fake_member("a", "mobilenet_v3_small"), fake_member("b", "mobilenet_v3_small", image_size=48)]
    with pytest.raises(ExportRefused, match=r"different image sizes.*trial b .*48px"):
        input_spec(members)


def test_onnx_fp32_matches_torch(tmp_path):
    # seed_cnn at 40 px is the case the legacy exporter cannot do (AdaptiveAvgPool2d(14));
    # the 3-channel member with the class order reversed exercises both adapters.
    members = [
        fake_member("a", "seed_cnn", seed=0),
        fake_member("b", "resnet18", in_chans=3, classes=("Normal", "COVID"), seed=1),
    ]
    module = EnsembleModule(members, [0.7, 0.3], 1.7, ["COVID", "Normal"])
    assert module.spec["in_chans"] == 1  # mixed channels: grayscale input
    path = export_onnx(module, tmp_path / "e.onnx")
    x = torch.randn(7, 1, 40, 40)
    with torch.no_grad():
        expected = module(x).numpy()
        by_hand = 0.7 * torch.softmax(members[0].model(x), 1).numpy() \
            + 0.3 * torch.softmax(members[1].model(module.adapters[1](x)), 1).numpy()[:, ::-1]
    assert np.allclose(expected, apply_temperature(by_hand, 1.7), atol=1e-5)
    got = run_onnx(session(path), x.numpy())
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(run_onnx(session(path), x[:1].numpy()) - expected[:1]).max() < 1e-4  # dynamic batch


class _Separable(torch.nn.Module):
    """Conv -> pool -> Linear whose decision depends strongly on the image brightness."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 9)
            self.conv.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
            self.fc.bias.copy_(torch.tensor([-2.0, 2.0]))  # class 0 iff mean brightness > 0.5

    def forward(self, x):
        return torch.softmax(self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3))), dim=1)


def test_parity_gate_passes_int8_and_trips_on_a_damaged_model(tmp_path):
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    # Brightness away from the 0.5 threshold, so int8 rounding cannot flip a decision.
    brightness = (rng.uniform(0, 0.4, size=(64, 1, 1, 1)) + rng.integers(0, 2, size=(64, 1, 1, 1)) * 0.6)
    x = (brightness + 0.05 * rng.normal(size=(64, 1, 16, 16))).astype(np.float32)
    labels = (brightness.ravel() < 0.5).astype(np.int64)
    model = _Separable().eval()
    fp32_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.from_numpy(x[:2]),), str(fp32_path), dynamo=True, input_names=["images"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, external_data=False)
    fp32 = run_onnx(session(fp32_path), x)
    int8_path = quantize_int8(fp32_path, tmp_path / "m_int8.onnx", x[:32])
    int8 = run_onnx(session(int8_path), x)
    gate = parity_gate(fp32, int8, labels)
    assert gate.passed and gate.reason == "" and gate.agreement >= 0.98
    assert np.allclose(int8.sum(axis=1), 1, atol=1e-6)  # the softmax head stayed fp32
    ops = {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    # Damage: negate every int8 weight, which flips the classifier's decision.
    damaged = onnx.load(str(int8_path))
    for init in damaged.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.int8:
            init.CopyFrom(numpy_helper.from_array((-w.astype(np.int16)).clip(-127, 127).astype(np.int8), init.name))
    onnx.save(damaged, str(tmp_path / "bad.onnx"))
    gate = parity_gate(fp32, run_onnx(session(tmp_path / "bad.onnx"), x), labels)
    assert not gate.passed
    assert "agrees with fp32" in gate.reason and "macro-F1 drops" in gate.reason


def test_parity_gate_thresholds_on_arrays():
    labels = np.array([0, 1] * 100)
    good = np.eye(2)[labels] * 0.8 + 0.1
    one_flip = good.copy()
    one_flip[0] = one_flip[0][::-1]  # 99.5% agreement, macro-F1 drops 0.5 points: passes
    gate = parity_gate(good, one_flip, labels)
    assert gate.passed and gate.agreement == 0.995 and 0 < gate.f1_drop <= 0.01
    five_flips = good.copy()
    five_flips[:5] = five_flips[:5, ::-1]  # 97.5% agreement
    gate = parity_gate(good, five_flips, labels)
    assert not gate.passed and "97.5%" in gate.reason and "macro-F1 drops" in gate.reason
