"""OOD scores and test-time augmentation: the math on known arrays, numpy == torch == ONNX with TTA,
the int8 exclusion of the OOD head, and the exported ensemble rebuilt in torch."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble.ood import (
    GaussianFit,
    accept_rate,
    candidate_scores,
    choose_score,
    energy,
    fit_gaussian,
    fit_threshold,
    load_params,
    mahalanobis,
    msp,
    ood_auroc,
    save_params,
    score_report,
)
from ensemble.tta import Views, parse_tta

from test_predict import CLASSES, make_checkpoint


# --------------------------------------------------------------------------- the math


def test_auroc_threshold_and_false_accept_on_known_scores():
    assert ood_auroc([0, 1, 2], [3, 4]) == 1.0
    assert ood_auroc([3, 4], [0, 1, 2]) == 0.0
    assert ood_auroc([0, 2], [1, 3]) == pytest.approx(0.75)  # 3 of the 4 (OOD, ID) pairs ordered right
    assert ood_auroc([1, 1], [1, 1]) == pytest.approx(0.5)  # ties count half
    with pytest.raises(ValueError, match="needs in-distribution and OOD"):
        ood_auroc([], [1.0])
    val = np.arange(100.0)
    t = fit_threshold(val)  # the smallest score accepting at least 95%
    assert t == 94.0 and accept_rate(val, t) == pytest.approx(0.95)
    assert accept_rate(val, fit_threshold(val, 0.5)) == pytest.approx(0.5)
    report = score_report(val, {"far": np.full(10, 1000.0), "half": np.r_[np.full(5, 10.0), np.full(5, 500.0)]}, t)
    assert report["far"] == {"images": 10, "auroc": 1.0, "false_accept_rate": 0.0}
    assert report["half"]["false_accept_rate"] == pytest.approx(0.5)
    assert report["half"]["auroc"] == pytest.approx((5 * 10.5 / 100 + 5 * 1.0) / 10)  # 10 beats 0..9, ties 10


def test_candidate_scores_follow_their_definitions():
    rng = np.random.default_rng(0)
    cov = np.diag([1.0, 4.0, 0.25])
    feats = np.concatenate([rng.multivariate_normal(mu, cov, 4000) for mu in ([0, 0, 0], [5, 0, 0])])
    labels = np.repeat([0, 1], 4000)
    fit = fit_gaussian(feats, labels)
    assert fit.means == pytest.approx(np.array([[0, 0, 0], [5, 0, 0]]), abs=0.1)
    # whiten^T cov whiten = I: distances are in standard deviations.
    assert fit.whiten.T @ cov @ fit.whiten == pytest.approx(np.eye(3), abs=0.05)
    d = mahalanobis(np.array([[0, 0, 0], [5, 0, 0], [0, 6, 0], [0, 0, 3]]), fit)
    assert d == pytest.approx([0, 0, 9 / 3, 36 / 3], abs=0.3)  # squared, min over classes, divided by D = 3
    z = np.array([[2.0, 0.0], [10.0, -3.0]])
    assert energy(z) == pytest.approx(-np.log(np.exp(z).sum(axis=1)))
    assert msp(np.array([[0.7, 0.3], [0.5, 0.5]])) == pytest.approx([0.3, 0.5])
    two = candidate_scores([z, z], [feats[:2], feats[:2]], [0.25, 0.75], 1.0, [fit, fit])
    assert two["energy"] == pytest.approx(energy(z)) and two["mahalanobis"] == pytest.approx(mahalanobis(feats[:2], fit))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert two["msp"] == pytest.approx(1 - p.max(axis=1))
    hot = candidate_scores([z], [feats[:2]], [1.0], 2.0, None)  # T > 1 softens: a larger MSP score
    assert "mahalanobis" not in hot and (hot["msp"] > two["msp"] - 1e-12).all()


def test_the_candidate_with_the_best_mean_proxy_auroc_is_chosen():
    val = {"msp": np.zeros(10), "energy": np.zeros(10), "mahalanobis": np.zeros(10)}
    proxies = {"a": {"msp": np.ones(5), "energy": -np.ones(5), "mahalanobis": np.ones(5)},
               "b": {"msp": -np.ones(5), "energy": np.ones(5), "mahalanobis": np.ones(5)}}
    best, table = choose_score(val, proxies)
    assert best == "mahalanobis" and table["mahalanobis"] == {"mean": 1.0, "min": 1.0, "per_set": {"a": 1.0, "b": 1.0}}
    assert table["msp"]["mean"] == 0.5 and table["msp"]["min"] == 0.0
    proxies["b"]["mahalanobis"] = -np.ones(5)
    assert choose_score(val, proxies)[0] == "msp"  # a tie at 0.5: the earlier candidate


def test_params_round_trip(tmp_path):
    fit = GaussianFit(np.arange(6.0).reshape(2, 3), np.eye(3) * 2)
    save_params(tmp_path / "p.npz", "mahalanobis", [0.4, 0.6], 1.5, [fit, fit])
    score, w, t, fits = load_params(tmp_path / "p.npz")
    assert score == "mahalanobis" and list(w) == [0.4, 0.6] and t == 1.5 and len(fits) == 2
    assert (fits[1].means == fit.means).all() and fits[1].dim == 3


# --------------------------------------------------------------------------- views


def test_tta_views_are_parsed_and_bad_ones_named():
    assert parse_tta("flip,rot5") == ("identity", "hflip", "rot+5", "rot-5")
    assert parse_tta(" rot3 ") == ("identity", "rot+3", "rot-3")
    assert parse_tta("") == () and parse_tta("none") == () and parse_tta(None) == ()
    for bad, words in (("flip,spin", "unknown TTA view 'spin'"), ("rot45", "unknown TTA view 'rot45'"),
                       ("flip,flip", "given twice")):
        with pytest.raises(ValueError, match=words):
            parse_tta(bad)


def test_views_flip_rotate_and_pad_black():
    mean, std = [0.449], [0.226]
    views = Views(parse_tta("flip,rot5"), image_size=32, mean=mean, std=std)
    x = torch.randn(2, 1, 32, 32)
    out = views(x)
    assert out.shape == (8, 1, 32, 32)
    assert torch.equal(out[:2], x) and torch.equal(out[2:4], x.flip(-1))
    const = torch.full((1, 1, 32, 32), 0.7)
    rot = Views(["rot+5"], image_size=32, mean=mean, std=std)(const)[0, 0]
    black = -mean[0] / std[0]
    assert rot[16, 16] == pytest.approx(0.7, abs=1e-5)  # the middle is the image
    assert rot[0, 0] < 0.7 - 0.1 and rot[0, 0] >= black - 1e-5  # a corner comes from outside: blended with black
    # A linear ramp f = x rotated by +5 degrees is cos(5) x - sin(5) y inside (bilinear is exact on it),
    # the convention of the train preset's affine map (output -> input coordinates).
    t = (torch.arange(32) * 2 + 1) / 32 - 1
    ramp = t.view(1, 1, 1, 32).expand(1, 1, 32, 32)
    a = np.radians(5)
    expected = np.cos(a) * t.view(1, 32) - np.sin(a) * t.view(32, 1)
    got = Views(["rot+5"], image_size=32, mean=mean, std=std)(ramp)[0, 0]
    assert (got - expected)[4:28, 4:28].abs().max() < 1e-5


# --------------------------------------------------------------------------- numpy == torch == ONNX


def _members(tmp_path: Path):
    from ensemble.select import load_trial

    a = make_checkpoint(tmp_path / "a", "resnet18", seed=0)
    b = make_checkpoint(tmp_path / "b", "resnet18", in_chans=3, seed=1)
    return [load_trial({"trial_id": t, "checkpoint": str(p)}, 0.5, CLASSES) for t, p in (("a", a), ("b", b))]


def torchscript_onnx(module, path: Path, image_size: int = 32) -> Path:
    """The graph by the TorchScript exporter (seconds; ensemble.export's dynamo exporter takes tens of seconds
    here and is exercised by the slow test below and the build tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 1, image_size, image_size),), str(path), dynamo=False,
                          input_names=["images"], output_names=module.output_names, opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in ["images", *module.output_names]})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two members, a few images, their outputs under TTA views, Gaussians on their features."""
    from covid_ray.data.io import resize_square
    from covid_ray.data.transforms import EvalPreset
    from ensemble.outputs import array_images, member_outputs

    base = tmp_path_factory.mktemp("ood")
    members = _members(base)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (45, 50), dtype=np.uint8) for _ in range(6)]
    views = parse_tta("flip,rot5")
    outs = [member_outputs(m, array_images("x", images), CLASSES, views=views, cache_dir=base / "cache")
            for m in members]
    fits = [fit_gaussian(o.features, np.array([0, 1] * 3)) for o in outs]
    x = EvalPreset(image_size=32)(torch.from_numpy(np.stack([resize_square(i, 37) for i in images])).unsqueeze(1))
    return {"base": base, "members": members, "views": views, "outs": outs, "fits": fits, "x": x, "images": images}


@pytest.mark.parametrize("score", ["msp", "energy", "mahalanobis"])
def test_numpy_torch_and_onnx_agree_with_tta(tiny, score, tmp_path):
    import onnxruntime as ort

    from ensemble.export import EnsembleModule
    from ensemble.graph import TrustedEnsemble

    w, t = [0.7, 0.3], 1.3
    outs = tiny["outs"]
    expected_ood = candidate_scores([o.logits[0] for o in outs], [o.features for o in outs], w, t, tiny["fits"])[score]
    mix = sum(wi * o.probs().mean(axis=0) for wi, o in zip(w, outs))  # members averaged over the 4 views
    expected_probs = np.exp(np.log(mix) / t) / np.exp(np.log(mix) / t).sum(axis=1, keepdims=True)
    module = TrustedEnsemble(EnsembleModule(tiny["members"], w, t, CLASSES), views=tiny["views"], ood_score=score,
                             fits=tiny["fits"]).eval()
    with torch.no_grad():
        probs, ood = module(tiny["x"])
    assert np.abs(probs.numpy() - expected_probs).max() < 1e-5
    assert np.abs(ood.numpy() - expected_ood).max() < 1e-4 * max(1.0, np.abs(expected_ood).max())
    sess = ort.InferenceSession(str(torchscript_onnx(module, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probs", "ood_score"]
    o_probs, o_ood = sess.run(None, {"images": tiny["x"].numpy()})
    assert np.abs(o_probs - probs.numpy()).max() < 1e-5 and np.abs(o_ood - ood.numpy()).max() < 1e-4


def test_int8_quantization_leaves_the_ood_head_in_fp32(tiny, tmp_path):
    import onnx

    from ensemble.export import EnsembleModule
    from ensemble.graph import TrustedEnsemble
    from ensemble.quantize import head_nodes

    module = TrustedEnsemble(EnsembleModule(tiny["members"], [0.5, 0.5], 1.0, CLASSES), ood_score="mahalanobis",
                             fits=tiny["fits"]).eval()
    path = torchscript_onnx(module, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    head = set(head_nodes(path))
    kinds = {n.op_type for n in graph.node if n.name in head}
    assert {"Softmax", "Min", "MatMul"} <= kinds  # the class head and the distance to the nearest class mean
    assert not any(n.op_type == "Conv" and n.name in head for n in graph.node)  # the members are quantized


@pytest.mark.slow
def test_the_dynamo_export_with_tta_matches_torch(tiny, tmp_path):
    """ensemble.export.export_onnx (the build's exporter) on a graph with views and an OOD output."""
    import onnxruntime as ort

    from ensemble.export import EnsembleModule, export_onnx
    from ensemble.graph import TrustedEnsemble

    module = TrustedEnsemble(EnsembleModule(tiny["members"][:1], [1.0], 0.8, CLASSES), views=tiny["views"],
                             ood_score="energy").eval()
    sess = ort.InferenceSession(str(export_onnx(module, tmp_path / "d.onnx")), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        probs, ood = module(tiny["x"])
    o_probs, o_ood = sess.run(["probs", "ood_score"], {"images": tiny["x"].numpy()})
    assert np.abs(o_probs - probs.numpy()).max() < 1e-5 and np.abs(o_ood - ood.numpy()).max() < 1e-4


# --------------------------------------------------------------------------- an exported folder


def export_with_ood(folder: Path, members, fits, *, views=(), score: str = "mahalanobis", threshold: float = 0.0) -> Path:
    """An exported ensemble folder with an OOD score: graph, preprocess.json with ``ood``, ood_head.npz."""
    from ensemble.abstain import preprocess_ood
    from covid_ray.artifacts.bundle import write_preprocess_json
    from ensemble.export import EnsembleModule, preprocess_json
    from ensemble.graph import trusted

    w, t = [0.6, 0.4][: len(members)], 1.2
    module = trusted(EnsembleModule(members, w, t, CLASSES), views=views, ood_score=score, fits=fits).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torchscript_onnx(module, folder / "ensemble_fp32.onnx")
    meta = {**preprocess_json(module, CLASSES, synthetic=True), **module.preprocess_extra()}
    meta["ood"] = preprocess_ood({"score": score, "description": "test", "threshold": threshold,
                                  "higher_is": "out-of-distribution", "fitted_on": "val", "accept_target": 0.95,
                                  "val_accept_rate": 0.95, "val_images": 20, "runtime": "ensemble_fp32.onnx",
                                  "thresholds_by_graph": {"ensemble_fp32.onnx": threshold}})
    write_preprocess_json(meta, folder / "preprocess.json")
    save_params(folder / "ood_head.npz", score, module.weights, t, fits)
    return folder


def test_the_torch_path_rebuilds_the_exported_graph(tiny, tmp_path):
    """ensemble.abstain.torch_ensemble: members' checkpoints + preprocess.json + ood_head.npz == the ONNX graph."""
    from covid_ray.inference import load_model
    from ensemble.abstain import torch_ensemble

    folder = export_with_ood(tmp_path / "ens", tiny["members"], tiny["fits"], views=tiny["views"])
    module, meta = torch_ensemble(folder)
    assert meta["tta"]["views"] == list(tiny["views"]) and meta["ood"]["score"] == "mahalanobis"
    with torch.no_grad():
        probs, ood = module(tiny["x"])
    model = load_model(folder)
    o_probs, o_ood = model.predict_with_ood(tiny["x"])
    assert np.abs(o_probs - probs.numpy()).max() < 1e-5 and np.abs(o_ood - ood.numpy()).max() < 1e-4


def test_an_ood_section_without_the_graph_output_is_refused(tiny, tmp_path):
    from covid_ray.inference import ModelLoadError, load_model

    folder = export_with_ood(tmp_path / "ens", tiny["members"], tiny["fits"])
    meta = json.loads((folder / "preprocess.json").read_text())
    meta["ood"]["threshold"] = "high"
    meta["ood"]["thresholds_by_graph"] = {}
    (folder / "preprocess.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="'ood.threshold' must be a finite number"):
        load_model(folder)
    plain = tmp_path / "plain"
    plain.mkdir()
    from test_predict import make_onnx_ensemble

    make_onnx_ensemble(plain, [("a", tiny["members"][0].checkpoint.parent)], [1.0])
    meta = json.loads((plain / "preprocess.json").read_text())
    meta["ood"] = {"score": "energy", "threshold": 1.0}
    (plain / "preprocess.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="no 'ood_score' output"):
        load_model(plain)
