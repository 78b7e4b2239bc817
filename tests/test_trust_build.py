"""``ensemble.build`` with OOD abstention, the shortcut audit, TTA and the model card, end to end on the
tiny search of test_ensemble_build (no Ray); and the card's sections and numbers against metrics.json."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from ensemble.model_card import SECTIONS
from ensemble.report import _ci, _f

from test_ensemble_build import FAST, make_search, trained, untrained  # noqa: F401 (fixtures)

CONTRACT = {"score", "threshold", "higher_is", "fitted_on", "val_accept_rate"}
OOD_SETS = {"photos", "digits", "text", "noise", "flipped"}


def check_card(folder, m: dict) -> None:
    """Every section is there and every number the card gives is metrics.json's, formatted."""
    card = (folder / "MODEL_CARD.md").read_text()
    headings = re.findall(r"^## (.+)$", card, re.M)
    assert [h for h in headings if h in SECTIONS] == list(SECTIONS), headings
    if m["synthetic"]:
        assert "SYNTHETIC DATA" in card and "(**synthetic**)" in card
    assert "Not for clinical decisions" in card
    e = m["ensemble"]
    expected = [f"| accuracy | {_f(e['accuracy'])} | {_ci(e['ci95']['accuracy'])} |",
                f"| macro-F1 | {_f(e['macro_f1'])} | {_ci(e['ci95']['macro_f1'])} |",
                f"T = {_f(m['calibration']['temperature'], 4)}",
                f"Test ECE {_f(m['calibration']['test']['ece_before'])} before, "
                f"{_f(m['calibration']['test']['ece_after'])} after"]
    for c, v in e["per_class"].items():
        expected.append(f"| {c} | {_f(v['recall'])} | {_ci(e['ci95'][f'sensitivity/{c}'])} | {_f(v['specificity'])} |")
    counts = m["data"]["counts"] if m["data"].get("available") else {}
    expected += [f"| {c} | {v['train']} | {v['val']} | {v['test']} |" for c, v in counts.items()]
    o = m["ood"]
    if o.get("status") == "ok":
        expected += [f"> {o['threshold']:.6g}", f"test acceptance {_f(o['test_accept_rate'])}"]
        expected += [f"| {n} | {r['images']} | {_f(r['auroc'])} | {_f(r['false_accept_rate'])} |"
                     for n, r in o["benchmark"].items()]
    s = m["shortcut"]
    if s.get("status") == "ok":
        expected.append(f"lungs removed {_f(s['lungs_removed']['macro_f1'])}")
    if (m.get("lung_cam") or {}).get("images"):
        expected.append(f"inside the lung masks: {_f(m['lung_cam']['mean'], 3)}")
    for text in expected:
        assert text in card, text
    meta = json.loads((folder / "metadata.json").read_text())
    probs = meta["network_data_format"]["outputs"]["probs"]
    assert probs["channel_def"] == {str(i): c for i, c in enumerate(m["classes"])}
    assert [c["name"] for c in probs["classes"]] == m["classes"]
    assert [c["test_sensitivity"] for c in probs["classes"]] == [e["per_class"][c]["recall"] for c in m["classes"]]
    assert meta["metrics"]["accuracy"] == e["accuracy"] and meta["metrics"]["macro_f1"] == e["macro_f1"]
    assert meta["synthetic_data"] is m["synthetic"] and "not for clinical decisions" in meta["intended_use"]


def test_bad_tta_views_are_named(capsys):
    from ensemble.build import BuildOptions, main

    with pytest.raises(ValueError, match="unknown TTA view 'spin'"):
        BuildOptions(tta="flip,spin")
    assert BuildOptions(tta="flip,rot5").tta == ("identity", "hflip", "rot+5", "rot-5")
    assert main(["--experiment", "x", "--tta", "rot90"]) == 2
    assert "unknown TTA view 'rot90'" in capsys.readouterr().err


def test_card_of_a_build_without_export_restates_metrics(easy_split, untrained, tmp_path, capsys):
    """The torch path: no graph, the OOD threshold and rates from the members' outputs."""
    from ensemble.build import main

    folder = make_search(tmp_path / "plain", easy_split, untrained, ["u0", "u1"])
    assert main(["--top", "2", "--results-dir", str(folder), "--export", "none", "--lung-cam-images", "0",
                 "--method", "soft", *FAST]) == 0
    out = capsys.readouterr().out
    assert "OOD abstention: " in out and "shortcut audit: " in out
    ens = folder / "ensemble"
    m = json.loads((ens / "metrics.json").read_text())
    o = m["ood"]
    assert o["status"] == "ok" and o["runtime"] == "torch (no exported graph)" and set(o["benchmark"]) == OOD_SETS
    assert o["val_accept_rate"] >= 0.95 and set(o["candidates"]) == {"msp", "energy", "mahalanobis"}
    assert not (ens / "preprocess.json").exists() and not (ens / "ood_head.npz").exists()
    assert m["shortcut"]["status"] == "ok" and isinstance(m["shortcut"]["flagged"], bool)
    assert m["tta"] == {"views": [], "enabled": False}
    check_card(ens, m)


@pytest.mark.slow
def test_build_with_tta_exports_the_ood_score_and_its_card(easy_split, trained, tmp_path, capsys):
    import onnxruntime as ort

    from covid_ray.data.datasets import load_splits
    from covid_ray.data.scan import find_dataset_root
    from covid_ray.data.split import read_manifest
    from covid_ray.data.transforms import EvalPreset
    from covid_ray.predict import main as predict
    from ensemble.abstain import torch_ensemble
    from ensemble.build import main

    # Without t0 (seed_cnn): its 104 MB of weights, four times over with TTA, cost a minute of
    # export and quantization. t1 (3 channels) ranks first, t2 has 1: the graph takes grayscale
    # and adapts inside, and every torch path (the TTA latency's too) is fed the graph's input.
    folder = make_search(tmp_path / "tta", easy_split, trained, ["t1", "t2"])
    assert main(["--top", "2", "--results-dir", str(folder), "--tta", "flip,rot5", "--method", "soft", *FAST]) == 0
    out = capsys.readouterr().out
    assert "OOD abstention: " in out and "shortcut audit: " in out and "TTA (4 views)" in out
    ens = folder / "ensemble"
    m = json.loads((ens / "metrics.json").read_text())
    meta = json.loads((ens / "preprocess.json").read_text())

    # The contract of preprocess.json's "ood", fitted on validation with each graph's own scores.
    o = m["ood"]
    assert o["status"] == "ok" and CONTRACT <= set(meta["ood"]) and meta["ood"]["fitted_on"] == "val"
    assert meta["ood"]["higher_is"] == "out-of-distribution" and meta["ood"]["threshold"] == o["threshold"]
    assert set(o["thresholds_by_graph"]) == {f for f in m["export"]["files"] if f.endswith(".onnx")}
    assert o["runtime"] == ("ensemble_int8.onnx" if "ensemble_int8.onnx" in m["export"]["files"] else "ensemble_fp32.onnx")
    assert 0.95 <= o["val_accept_rate"] <= 1.0 and o["fp32_vs_torch_max_abs_diff"] < 1e-3 * max(1, abs(o["threshold"]))
    assert set(o["benchmark"]) == OOD_SETS and all(0 <= r["auroc"] <= 1 for r in o["benchmark"].values())
    assert meta["tta"]["views"] == ["identity", "hflip", "rot+5", "rot-5"]
    assert [x["name"] for x in meta["outputs"]] == ["probs", "ood_score"]

    # TTA: both variants measured, the graph agrees with torch (the export's own parity check).
    t = m["tta"]
    assert t["enabled"] and set(t["test"]) == {"with", "without", "delta"}
    assert set(t["latency_ms"]) == {"torch, no TTA", "torch, TTA (4 views)"}
    assert m["export"]["fp32_vs_torch_max_abs_diff"] < 1e-4

    # The torch path (members' checkpoints + ood_head.npz) reproduces the fp32 graph, views and OOD score.
    module, _ = torch_ensemble(ens)
    data = load_splits(find_dataset_root(easy_split[0]), read_manifest(folder / "split.csv"), meta["classes"],
                       meta["resize"])
    images = data.datasets["test"].__getitems__(np.arange(8))[0]
    x = EvalPreset(image_size=meta["image_size"], in_chans=meta["in_chans"])(images)
    with torch.no_grad():
        probs, ood = module(x)
    sess = ort.InferenceSession(str(ens / "ensemble_fp32.onnx"), providers=["CPUExecutionProvider"])
    o_probs, o_ood = sess.run(["probs", "ood_score"], {"images": x.numpy()})
    assert np.abs(o_probs - probs.numpy()).max() < 1e-4 and np.abs(o_ood - ood.numpy()).max() < 1e-3

    report = (ens / "report.md").read_text()
    for heading in ("## Out-of-distribution abstention", "## Shortcut audit", "## Test-time augmentation"):
        assert heading in report
    assert "What was chosen on what" in report and "Chance: the same predictions against permuted test labels" in report
    check_card(ens, m)

    # Every CLI line carries the verdict, consistent with the deployed graph's threshold.
    image = next(find_dataset_root(easy_split[0]).glob("COVID/images/*.png"))
    assert predict([str(image), "--model", str(ens)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["ood_threshold"] == pytest.approx(o["threshold"])
    assert row["in_distribution"] == (row["ood_score"] <= row["ood_threshold"])
    assert (row["class"] is None) == (not row["in_distribution"])
