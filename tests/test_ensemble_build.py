"""``ensemble.build`` end to end on a tiny finished "search" (no Ray): selection, skipping,
evaluation outputs, export, the parity gate on a damaged int8 model, and bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covid_ray.artifacts.checkpoint import save_checkpoint
from covid_ray.artifacts.experiment import write_experiment
from covid_ray.data.datasets import load_splits, make_loader
from covid_ray.data.scan import find_dataset_root
from covid_ray.data.split import manifest_classes, read_manifest
from covid_ray.data.transforms import EvalPreset, TrainPreset, resize_for
from covid_ray.engine import predict_logits, recalibrate_batchnorm, train_one_epoch
from covid_ray.metrics import validation_summary
from covid_ray.models import create_model

# (trial_id, model, image_size, in_chans, epochs, seed, lr). The 3-channel member exercises
# the in-graph channel adapter; the 48 px one is only used by the mixed-size test.
TRIALS = [
    ("t0", "seed_cnn", 40, 1, 2, 0, 2e-3),
    ("t1", "mobilenet_v3_small", 40, 3, 5, 1, 3e-3),
    ("t2", "resnet18", 40, 1, 2, 2, 2e-3),
    ("t3", "mobilenet_v3_small", 48, 1, 3, 3, 3e-3),
]


def _train(root: Path, split: Path, out: Path, model_name: str, image_size: int, in_chans: int, epochs: int,
           seed: int, lr: float = 2e-3):
    """A few epochs of plain PyTorch on the easy dataset; returns the validation summary."""
    torch.manual_seed(seed)
    manifest = read_manifest(split)
    classes = manifest_classes(manifest)
    data = load_splits(find_dataset_root(root), manifest, classes, resize_for(image_size))
    model = create_model(model_name, len(classes), in_chans=in_chans)
    loader = make_loader(data.datasets["train"], batch_size=16, shuffle=True, seed=seed, drop_last=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    preset = TrainPreset(image_size=image_size, in_chans=in_chans)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        train_one_epoch(model, loader, preset, torch.nn.CrossEntropyLoss(), optimizer, torch.device("cpu"),
                        amp="off", generator=generator)
    recalibrate_batchnorm(model, make_loader(data.datasets["train"], batch_size=64, shuffle=False),
                           EvalPreset(image_size=image_size, in_chans=in_chans))
    val_loader = make_loader(data.datasets["val"], batch_size=64, shuffle=False)
    _, logits, labels = predict_logits(model, val_loader, EvalPreset(image_size=image_size, in_chans=in_chans),
                                       torch.device("cpu"), amp="off")
    metrics = validation_summary(labels, logits, classes)
    save_checkpoint(out, model, classes=classes, image_size=image_size, metrics=metrics, epoch=epochs,
                    config={"model": model_name, "image_size": image_size, "seed": seed})
    return metrics


@pytest.fixture(scope="session")
def trained(easy_split, tmp_path_factory):
    """``{trial_id: trials.csv fields}`` of checkpoints trained once per session (test_trust_build
    uses them too); read-only: a test that damages a member copies it first."""
    root, split = easy_split
    base = tmp_path_factory.mktemp("trials")
    out = {}
    for trial_id, name, size, *rest in TRIALS:
        metrics = _train(root, split, base / trial_id / "checkpoint", name, size, *rest)
        out[trial_id] = {"config/model": name, "config/image_size": size, "best_val_macro_f1": metrics["val_macro_f1"],
                         "checkpoint": str(base / trial_id / "checkpoint")}
    return out


@pytest.fixture(scope="session")
def untrained(easy_split, tmp_path_factory):
    """Randomly initialised checkpoints: loadable members at no training cost."""
    classes = manifest_classes(read_manifest(easy_split[1]))
    base = tmp_path_factory.mktemp("untrained")
    out = {}
    for i, trial_id in enumerate(["u0", "u1"]):
        torch.manual_seed(i)
        save_checkpoint(base / trial_id, create_model("mobilenet_v3_small", len(classes)), classes=classes,
                        image_size=40, metrics={"val_macro_f1": 0.5}, epoch=1)
        out[trial_id] = {"config/model": "mobilenet_v3_small", "config/image_size": 40,
                         "best_val_macro_f1": 0.5 - i / 10, "checkpoint": str(base / trial_id)}
    return out


def make_search(folder: Path, easy_split, trials: dict, trial_ids, *, extra_rows=(), synthetic=True) -> Path:
    """A finished search folder as covid_ray.tune writes it, over the given checkpoints."""
    root, split = easy_split
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(split, folder / "split.csv")
    classes = manifest_classes(read_manifest(split))
    write_experiment(folder, {
        "name": folder.name, "data": str(Path(root).resolve()), "split": "split.csv", "synthetic": synthetic,
        "metric": "val_macro_f1", "mode": "max", "classes": classes,
    })
    rows = [{"trial_id": t, "status": "TERMINATED", **trials[t], "best_epoch": 1, "error": ""} for t in trial_ids]
    rows += list(extra_rows)
    pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)
    return folder


FAST = ["--n-boot", "100", "--latency-repeats", "2", "--calibration-images", "32", "--threads", "1"]


@pytest.mark.slow
def test_end_to_end_on_a_tiny_search(easy_split, trained, tmp_path, capsys, caplog):
    from ensemble.build import main

    missing = {"trial_id": "t9", "status": "TERMINATED", "config/model": "resnet18", "best_val_macro_f1": 2.0,
               "best_epoch": 1, "checkpoint": str(tmp_path / "gone" / "checkpoint"), "error": ""}
    errored = {"trial_id": "t8", "status": "ERROR", "config/model": "resnet18", "best_val_macro_f1": float("nan"),
               "best_epoch": "", "checkpoint": "", "error": "worker died"}
    folder = make_search(tmp_path / "tiny", easy_split, trained, ["t0", "t1", "t2"], extra_rows=[missing, errored])
    with caplog.at_level("WARNING", logger="ensemble"):
        code = main(["--top", "5", "--results-dir", str(folder), "--method", "weighted", *FAST])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "SYNTHETIC" in out.out
    assert any("t9" in r.getMessage() and "not found" in r.getMessage() for r in caplog.records)
    ens = folder / "ensemble"
    m = json.loads((ens / "metrics.json").read_text())
    assert m["synthetic"] is True and m["top"] == 5 and m["method"] == "weighted" and m["members_used"] == 3
    assert m["dataset"] == str(Path(easy_split[0]).resolve())
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "ece", "roc_auc_macro", "per_class", "ci95"):
        assert key in m["ensemble"]
    assert set(m["ensemble"]["per_class"]) == {"COVID", "Normal"}
    assert set(m["ensemble"]["per_class"]["COVID"]) >= {"precision", "recall", "specificity", "f1", "support", "roc_auc"}
    assert set(m["ensemble"]["ci95"]) == {"accuracy", "macro_f1"} | {
        f"{name}/{c}" for name in ("sensitivity", "specificity") for c in ("COVID", "Normal")}
    assert m["bootstrap"]["unit"] == "duplicate group" and m["bootstrap"]["images"] == m["test_images"]
    assert m["combination"]["method"] == "weighted" and m["combination"]["choice"] == "ensemble"
    assert m["vs_best_member"]["trial_id"] == m["members"][0]["trial_id"]
    assert m["recipe"]["present"] is False and "no `arm` column" in m["recipe"]["note"]  # an older search
    ranked = sorted(["t0", "t1", "t2"], key=lambda t: -trained[t]["best_val_macro_f1"])  # stable: ties by id
    assert [r["trial_id"] for r in m["members"]] == ranked
    assert all({"trial_id", "model", "accuracy", "macro_f1"} <= set(r) for r in m["members"])
    assert m["ensemble"]["accuracy"] >= 0.8  # the easy dataset: chance is 0.5
    assert [s["trial_id"] for s in m["skipped"]] == ["t9"]
    assert any("only 3 are usable" in n for n in m["notes"])
    cal = m["calibration"]
    assert cal["fitted_on"] == "val" and cal["val"]["nll_after"] <= cal["val"]["nll_before"] + 1e-9

    report = (ens / "report.md").read_text()
    assert "synthetic" in report.lower() and "SYNTHETIC DATA" in report
    assert "classification_report" in report and "t9" in report and "specificity" in report
    assert "ran without the hand-recipe reference arm" in report and "hand recipe: not compared" in out.out
    for png in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (ens / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    x = m["export"]
    assert x["fp32_vs_torch_max_abs_diff"] < 1e-4
    assert (ens / "ensemble_fp32.onnx").is_file()
    meta = json.loads((ens / "preprocess.json").read_text())
    assert meta["classes"] == ["COVID", "Normal"] and meta["image_size"] == 40 and meta["resize"] == resize_for(40)
    assert meta["in_chans"] == 1 and meta["mean"] == [0.449] and meta["std"] == [0.226]  # mixed channels: gray input
    assert meta["temperature"] == pytest.approx(cal["temperature"])
    gate = x["gate"]
    assert (ens / "ensemble_int8.onnx").is_file() == gate["passed"]
    if not gate["passed"]:
        assert "was not written" in report
    assert set(x["latency_ms"]) >= {"torch fp32", "ONNX fp32"}
    assert "batch 32" in report

    # The exported graph reproduces the reported test probabilities from preprocess.json alone.
    import onnxruntime as ort

    manifest = read_manifest(folder / "split.csv")
    data = load_splits(find_dataset_root(easy_split[0]), manifest, meta["classes"], meta["resize"])
    images, labels, _ = data.datasets["test"].__getitems__(np.arange(len(data.datasets["test"])))
    x_test = EvalPreset(image_size=meta["image_size"], in_chans=meta["in_chans"])(images).numpy()
    sess = ort.InferenceSession(str(ens / "ensemble_fp32.onnx"), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"images": x_test})[0]
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    accuracy = float((probs.argmax(axis=1) == labels.numpy()).mean())
    assert accuracy == pytest.approx(m["ensemble"]["accuracy"], abs=1e-9)

    # Rebuilding with another K and method reads member probabilities from the cache.
    def member_caches() -> list[str]:  # the cache also holds other sets' probabilities (e.g. OOD)
        return sorted(p.name for p in (ens / "cache").glob("*.npz") if p.name.split("-")[1] in ("val", "test"))

    cached = member_caches()
    assert len(cached) == 6  # 3 members x (val, test)
    code = main(["--top", "2", "--results-dir", str(folder), "--method", "greedy", "--export", "none", *FAST])
    assert code == 0
    m2 = json.loads((ens / "metrics.json").read_text())
    assert m2["members_used"] == 2 and m2["method"] == "greedy"
    assert member_caches() == cached
    assert not (ens / "ensemble_fp32.onnx").exists()  # no stale export beside a new report


@pytest.mark.slow
def test_mixed_image_sizes_are_evaluated_but_export_is_refused(easy_split, trained, tmp_path, capsys):
    from ensemble.build import main

    folder = make_search(tmp_path / "mixed", easy_split, trained, ["t1", "t3"], synthetic=False)
    # soft: both members keep a weight (the default may drop one), so the graph would mix sizes.
    args = ["--top", "2", "--results-dir", str(folder), "--export", "onnx", "--method", "soft", *FAST]
    assert main(args) == 0
    m = json.loads((folder / "ensemble" / "metrics.json").read_text())
    assert {r["image_size"] for r in m["members"]} == {40, 48}  # each member fed at its own size
    assert m["export"]["status"] == "refused" and "different image sizes" in m["export"]["message"]
    assert "t3" in m["export"]["message"] and not (folder / "ensemble" / "ensemble_fp32.onnx").exists()
    report = (folder / "ensemble" / "report.md").read_text()
    assert "Export refused" in report and "SYNTHETIC" not in report
    capsys.readouterr()
    assert main(args + ["--strict"]) == 1


@pytest.mark.slow
def test_parity_gate_trips_on_a_damaged_int8_model(easy_split, trained, tmp_path, monkeypatch, capsys):
    import onnx
    from onnx import numpy_helper

    import ensemble.deploy
    from ensemble.build import main

    real = ensemble.deploy.quantize_int8

    def damaged(fp32_path, out_path, images, **kw):
        """Quantize, then scramble every int8 weight tensor (a broken quantizer)."""
        real(fp32_path, out_path, images, **kw)
        model = onnx.load(str(out_path))
        rng = np.random.default_rng(0)
        for init in model.graph.initializer:
            w = numpy_helper.to_array(init)
            if w.dtype == np.int8 and w.size > 16:
                init.CopyFrom(numpy_helper.from_array(rng.integers(-127, 128, w.shape).astype(np.int8), init.name))
        onnx.save(model, str(out_path))
        return out_path

    monkeypatch.setattr(ensemble.deploy, "quantize_int8", damaged)
    folder = make_search(tmp_path / "damaged", easy_split, trained, ["t1"])
    code = main(["--top", "1", "--results-dir", str(folder), "--strict", *FAST])
    assert code == 1
    ens = folder / "ensemble"
    m = json.loads((ens / "metrics.json").read_text())
    gate = m["export"]["gate"]
    assert gate["passed"] is False and gate["reason"]
    assert m["export"]["status"] == "int8_rejected"
    assert (ens / "ensemble_fp32.onnx").is_file() and not (ens / "ensemble_int8.onnx").exists()
    assert not list(ens.glob("*candidate*"))
    assert "ensemble_int8.onnx` was not written" in (ens / "report.md").read_text()
    assert "int8 not written" in capsys.readouterr().out


def test_corrupt_checkpoint_is_skipped_with_a_warning(easy_split, untrained, tmp_path, caplog):
    from covid_ray.artifacts.experiment import read_experiment, read_trials
    from ensemble.select import select_top

    bad = tmp_path / "bad" / "checkpoint"
    bad.mkdir(parents=True)
    (bad / "model.pt").write_bytes(b"this is not a torch file")
    row = {"trial_id": "bad", "status": "TERMINATED", "config/model": "seed_cnn", "best_val_macro_f1": 5.0,
           "best_epoch": 1, "checkpoint": str(bad), "error": ""}
    folder = make_search(tmp_path / "corrupt", easy_split, untrained, ["u0", "u1"], extra_rows=[row])
    experiment = read_experiment(folder)
    with caplog.at_level("WARNING"):
        selection = select_top(experiment, read_trials(folder), 2, "val_macro_f1", "max")
    assert [m.trial_id for m in selection.members] == ["u0", "u1"]  # the next-ranked filled the place
    assert [s["trial_id"] for s in selection.skipped] == ["bad"]
    assert "not a readable checkpoint" in selection.skipped[0]["reason"]
    assert any("bad" in r.getMessage() and str(bad) in r.getMessage() for r in caplog.records)


def test_no_usable_trial_is_a_clear_error(easy_split, tmp_path, capsys):
    from ensemble.build import main

    rows = [{"trial_id": f"x{i}", "status": "ERROR", "config/model": "seed_cnn", "best_val_macro_f1": 0.9,
             "best_epoch": 1, "checkpoint": str(tmp_path / f"none{i}"), "error": ""} for i in range(2)]
    folder = make_search(tmp_path / "empty", easy_split, {}, [], extra_rows=rows)
    assert main(["--top", "3", "--results-dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "no usable trial" in err and "x0" in err and "x1" in err
    assert not (folder / "ensemble" / "metrics.json").exists()

    assert main(["--top", "3", "--experiment", "nope", "--results-root", str(tmp_path)]) == 2
    assert "experiment folder not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- the hand-recipe arm

QUICK = [*FAST, "--export", "none", "--lung-cam-images", "0"]


def _cached_test_probs(cache: Path, checkpoint: str) -> np.ndarray:
    """A trial's test probabilities as the build cached them (the file is keyed by model.pt's sha256)."""
    from covid_ray.artifacts.checkpoint import file_digest

    digest = file_digest(Path(checkpoint) / "model.pt")[:20]
    (file,) = cache.glob(f"{digest}-test-*.npz")
    with np.load(file) as z:
        return z["probs"], z["labels"]


@pytest.mark.slow
def test_recipe_arm_is_reported_beside_the_ensemble_from_the_saved_probabilities(easy_split, trained, untrained,
                                                                                 tmp_path, capsys):
    from sklearn.metrics import accuracy_score, f1_score

    from covid_ray.metrics import draw_resamples, paired_bootstrap_ci
    from ensemble.build import main

    # The search's two sampled trials are untrained; the recipe trial (trained) is recorded with a low
    # validation score, so it is not among the top 2 and must be evaluated on its own.
    trials = {"u0": {**untrained["u0"], "arm": "warm_start"}, "u1": {**untrained["u1"], "arm": "search"},
              "t1": {**trained["t1"], "best_val_macro_f1": 0.1, "arm": "recipe"}}
    folder = make_search(tmp_path / "recipe", easy_split, trials, ["u0", "u1", "t1"])
    assert main(["--top", "2", "--results-dir", str(folder), *QUICK]) == 0
    out = capsys.readouterr().out
    ens = folder / "ensemble"
    m = json.loads((ens / "metrics.json").read_text())
    r = m["recipe"]
    assert r["present"] is True and r["arm"] == "recipe" and r["trial_id"] == "t1"
    assert r["model"] == "mobilenet_v3_small" and r["in_ensemble"] is False and r["weight"] == 0.0
    assert [x["trial_id"] for x in m["members"]] == ["u0", "u1"]
    assert {"macro_f1", "accuracy", "sensitivity/COVID", "sensitivity/Normal"} <= set(r["ci95"])

    # Recomputed from the probability cache with scikit-learn: the recipe and the ensemble on test.
    recipe, labels = _cached_test_probs(ens / "cache", trials["t1"]["checkpoint"])
    assert r["macro_f1"] == pytest.approx(f1_score(labels, recipe.argmax(1), average="macro"), abs=1e-12)
    assert r["accuracy"] == pytest.approx(accuracy_score(labels, recipe.argmax(1)), abs=1e-12)
    assert r["per_class"]["COVID"]["recall"] == pytest.approx(((recipe.argmax(1) == 0) & (labels == 0)).sum()
                                                              / (labels == 0).sum())
    members = np.stack([_cached_test_probs(ens / "cache", untrained[t]["checkpoint"])[0] for t in ("u0", "u1")])
    weights = np.array([m["weights"]["u0"], m["weights"]["u1"]])
    ensemble = np.tensordot(weights, members, axes=1)  # the temperature does not move the argmax
    assert m["ensemble"]["macro_f1"] == pytest.approx(f1_score(labels, ensemble.argmax(1), average="macro"), abs=1e-12)
    d = r["ensemble_minus_recipe"]
    assert d["macro_f1"] == pytest.approx(m["ensemble"]["macro_f1"] - r["macro_f1"], abs=1e-12)
    test_rows = read_manifest(folder / "split.csv").query("split == 'test'")
    resamples = draw_resamples(len(labels), test_rows["group"].astype(str).to_numpy(), n_boot=100, seed=0)
    _, low, high = paired_bootstrap_ci(labels, ensemble / ensemble.sum(1, keepdims=True), recipe, resamples)
    assert d["ci95"] == pytest.approx([low, high], abs=1e-12)

    # Untrained members against a trained recipe: the search did not beat it, and every output says so.
    assert d["macro_f1"] < 0 and r["verdict"] == "did not beat"
    report = (ens / "report.md").read_text()
    assert "The search did not beat the hand recipe (synthetic data)" in report
    assert report.index("did not beat the hand recipe") < report.index("## Calibration")  # near the top
    assert f"{d['macro_f1']:.4f}" in report and "hand recipe (mobilenet_v3_small)" in report
    assert "best single trial" in report and "did not beat the hand recipe" in out


@pytest.mark.slow
def test_recipe_ranked_first_is_a_member_and_was_not_beaten(easy_split, untrained, tmp_path, capsys):
    from ensemble.build import main

    trials = {"u0": {**untrained["u0"], "arm": "recipe"}, "u1": {**untrained["u1"], "arm": "search"}}
    folder = make_search(tmp_path / "first", easy_split, trials, ["u0", "u1"])
    assert main(["--top", "1", "--results-dir", str(folder), *QUICK]) == 0
    m = json.loads((folder / "ensemble" / "metrics.json").read_text())
    r = m["recipe"]
    assert r["present"] and r["in_ensemble"] and r["weight"] == 1.0
    assert r["ensemble_minus_recipe"] == {"macro_f1": 0.0, "ci95": [0.0, 0.0]}  # the same model: paired, exactly 0
    assert r["verdict"] == "did not beat" and r["macro_f1"] == m["members"][0]["macro_f1"]
    assert m["method"] == "guarded" and m["combination"]["choice"] == "ensemble"  # one member: nothing to guard
    assert "is its best member alone" in m["vs_best_member"]["summary"]
    assert "did not beat the hand recipe" in (folder / "ensemble" / "report.md").read_text()
    assert "did not beat the hand recipe" in capsys.readouterr().out


@pytest.mark.slow
def test_missing_or_unusable_recipe_is_reported_and_the_build_goes_on(easy_split, untrained, tmp_path):
    from ensemble.build import main

    gone = {"trial_id": "r0", "status": "TERMINATED", "config/model": "seed_cnn", "best_val_macro_f1": 0.2,
            "best_epoch": 1, "checkpoint": str(tmp_path / "gone"), "error": "", "arm": "recipe"}
    trials = {t: {**untrained[t], "arm": "search"} for t in ("u0", "u1")}
    folder = make_search(tmp_path / "gone", easy_split, trials, ["u0", "u1"], extra_rows=[gone])
    assert main(["--top", "1", "--results-dir", str(folder), *QUICK]) == 0
    r = json.loads((folder / "ensemble" / "metrics.json").read_text())["recipe"]
    assert r["present"] is False and r["trial_id"] == "r0" and "could not be evaluated" in r["note"]
    assert str(tmp_path / "gone") in r["note"]
    assert "Hand recipe: not compared" in (folder / "ensemble" / "report.md").read_text()

    folder = make_search(tmp_path / "none", easy_split, trials, ["u0", "u1"])  # an arm column, but no recipe row
    assert main(["--top", "1", "--results-dir", str(folder), *QUICK]) == 0
    r = json.loads((folder / "ensemble" / "metrics.json").read_text())["recipe"]
    assert r == {"present": False, "note": "no trial of this search has arm = recipe: it ran without the "
                                           "hand-recipe reference arm"}
