"""``MODEL_CARD.md`` and ``metadata.json``: the ensemble described for its users, from metrics.json alone.

Written by every ``ensemble.build`` beside ``metrics.json``, rendered from the same
dict, so the card has no number of its own (a test checks they match). The sections
follow the Hugging Face model card (model details, intended uses, out-of-scope uses,
training data, evaluation, limitations) and a MONAI bundle's README; ``metadata.json``
follows a MONAI bundle's ``metadata.json`` (inputs, outputs with one entry per
class, evaluation metrics), so the model can be used without the training code.
"""
from __future__ import annotations

from pathlib import Path

from covid_ray.artifacts.bundle import CARD_FILE, METADATA_FILE
from covid_ray.artifacts.plain import write_json

from ensemble.report import _ci, _f, _table
SECTIONS = ("Model details", "Intended use", "Out-of-scope use", "Training data", "Members and how they were chosen",
            "Evaluation (test split)", "Calibration", "Out-of-distribution abstention", "Shortcut audit",
            "Where the model looks", "Known limitations", "How to use")
REFERENCES = ("DeGrave, Janizek & Lee. AI for radiographic COVID-19 detection selects shortcuts over signal. "
              "Nat Mach Intell 3, 610-619 (2021).",
              "Roberts et al. Common pitfalls and recommendations for using machine learning to detect and "
              "prognosticate for COVID-19 using chest radiographs and CT scans. Nat Mach Intell 3, 199-217 (2021).")


def _input_spec(m: dict) -> dict:
    x = m.get("export") or {}
    if x.get("preprocess"):
        return x["preprocess"]
    first = m["members"][0]
    return {"image_size": first["image_size"], "in_chans": first["in_chans"], "resize": None}


def _synthetic(m: dict, text: str) -> str:
    return f"{text} (**synthetic**)" if m.get("synthetic") else text


def _details(m: dict) -> list[str]:
    spec, x = _input_spec(m), m.get("export") or {}
    files = ", ".join(f"`{f}`" for f in x.get("files", {})) or "none (not exported)"
    used = [r for r in m["members"] if r["weight"] > 0]
    models = sorted({r["model"] for r in used})
    tta = (m.get("tta") or {}).get("views") or []
    return [
        f"- Ensemble of {len(used)} image classifiers ({', '.join(models)}; {m['members_used']} candidates, combined "
        f"by `{m['method']}`), one temperature (T = {_f(m['calibration']['temperature'], 4)}).",
        f"- Task: {len(m['classes'])}-class chest X-ray classification: {', '.join(m['classes'])}.",
        f"- Input: {spec['in_chans']}-channel {spec['image_size']}x{spec['image_size']} grayscale crop "
        f"(see `preprocess.json`). Outputs: class probabilities and an OOD score.",
        f"- Test-time augmentation: {', '.join(tta) if tta else 'none'}.",
        f"- Files: {files}. Built by `python -m ensemble.build` from the search `{m['experiment']}`.",
        "- License: Apache-2.0 (the code); the data's own licence applies to anything trained on it.",
    ]


def _data(m: dict) -> list[str]:
    d = m.get("data") or {}
    lines = [f"- Source: `{d.get('dataset') or m['dataset']}`"
             + (" (**synthetic**): images drawn by `covid_ray.data.synth`, not radiographs of patients"
                if m.get("synthetic") else "") + "."]
    if d.get("available"):
        counts = d["counts"]
        rows = [[c] + [str(v.get(s, 0)) for s in ("train", "val", "test")] + [str(sum(v.values()))]
                for c, v in counts.items()]
        g = d.get("grouping") or {}
        lines += ["", *_table(["class", "train", "val", "test", "total"], rows), "",
                  f"- Split {', '.join(f'{s} {r:.0%}' for s, r in (d.get('ratios') or {}).items())}, stratified per "
                  f"class, seed {d.get('seed')}. Exact duplicates (same SHA-1) and near-duplicates (perceptual hash) "
                  f"were grouped and kept in one split: {g.get('duplicate_groups', 'n/a')} groups holding "
                  f"{g.get('files_in_duplicate_groups', 'n/a')} files.",
                  f"- Excluded: {d['excluded']} files"
                  + (f" ({'; '.join(f'{r}: {n}' for r, n in d['excluded_reasons'].items())})" if d["excluded"] else "")
                  + "; unusable files (empty, truncated, not images, decompression bombs) and label conflicts "
                    "(one file under two classes). Kept with a note: "
                  + f"{d['odd']} odd files" + (f" ({'; '.join(f'{r}: {n}' for r, n in d['odd_reasons'].items())})"
                                               if d["odd"] else "") + ". Details in `data_report.json`."]
    else:
        lines.append(f"- {d.get('note', 'no data report')}; test counts: "
                     + ", ".join(f"{c} {n}" for c, n in m["test_counts"].items()) + ".")
    return lines


def _members(m: dict) -> list[str]:
    rows = [[r["model"], str(r["trial_id"]), _f(r["weight"], 3), _f(r[f"best_{m['metric']}"]), _f(r["macro_f1"])]
            for r in m["members"]]
    return [f"The top {m['top']} trials of the search by validation `{m['metric']}` "
            f"({m['members_used']} usable), combined by `{m['method']}`; weights and temperature fitted on the "
            "validation split only.", "",
            *_table(["model", "trial", "weight", f"validation {m['metric']}", "test macro-F1"], rows)]


def _evaluation(m: dict) -> list[str]:
    e, ci = m["ensemble"], m["ensemble"].get("ci95", {})
    rows = [["accuracy", _f(e["accuracy"]), _ci(ci.get("accuracy"))], ["macro-F1", _f(e["macro_f1"]),
                                                                       _ci(ci.get("macro_f1"))],
            ["balanced accuracy", _f(e["balanced_accuracy"]), ""], ["ROC-AUC (macro)", _f(e["roc_auc_macro"]), ""]]
    per = [[c, _f(v["recall"]), _ci(ci.get(f"sensitivity/{c}")), _f(v["specificity"]),
            _ci(ci.get(f"specificity/{c}")), _f(v["roc_auc"]), str(v["support"])] for c, v in e["per_class"].items()]
    return [_synthetic(m, f"{m['test_images']} test images, never used to fit or choose anything") + "; 95% "
            f"bootstrap intervals ({m['n_boot']} resamples).", "",
            *_table(["metric", "value", "95% CI"], rows), "",
            *_table(["class", "sensitivity", "95% CI", "specificity", "95% CI", "ROC-AUC", "test images"], per)]


def _calibration(m: dict) -> list[str]:
    c = m["calibration"]
    return [f"Temperature T = {_f(c['temperature'], 4)} fitted on validation. Test ECE "
            f"{_f(c['test']['ece_before'])} before, {_f(c['test']['ece_after'])} after; test NLL "
            f"{_f(c['test']['nll_before'])} before, {_f(c['test']['nll_after'])} after."]


def _ood(m: dict) -> list[str]:
    o = m.get("ood") or {}
    if o.get("status") != "ok":
        return [f"Not available: {o.get('note', o.get('status', 'not computed'))}."]
    rows = [[n, str(r["images"]), _f(r["auroc"]), _f(r["false_accept_rate"])] for n, r in o["benchmark"].items()]
    return [f"The model answers `class: null` when `ood_score` ({o['score']}) > {o['threshold']:.6g}; the "
            f"threshold accepts {_f(o['val_accept_rate'])} of validation images (fitted on `{o['fitted_on']}`, target "
            f"{o['accept_target']}); test acceptance {_f(o['test_accept_rate'])}.", "",
            *_table(["OOD set", "images", "AUROC", "false-accept rate"], rows), "",
            "OOD sets: natural photographs, handwritten digits, rendered text, uniform noise, test radiographs "
            "upside down. A near-miss (a radiograph of another body part, another machine or population) is not "
            "measured and may well be accepted."]


def _shortcut(m: dict) -> list[str]:
    s, lc = m.get("shortcut") or {}, m.get("lung_cam") or {}
    out = []
    if s.get("status") == "ok":
        out += [f"Test macro-F1 intact {_f(s['intact']['macro_f1'])}, lungs removed "
                f"{_f(s['lungs_removed']['macro_f1'])} (chance {_f(s['lungs_removed']['chance']['macro_f1']['mean'])}), "
                f"lungs only {_f(s['lungs_only']['macro_f1'])}. "
                + ("**Flagged as likely using shortcuts**: " if s["flagged"] else "Not flagged: ") + s["reason"] + "."]
        src = s.get("sources") or {}
        if src.get("note"):
            out.append(f"Sources: {src['note']}.")
        elif src.get("independence"):
            out.append(f"Sources: the source alone predicts the class with test accuracy "
                       f"{_f(src['source_only_classifier']['accuracy'])} (chi-square p = "
                       f"{src['independence']['p_value']:.2g}).")
    else:
        out.append(f"Shortcut audit not available: {s.get('note', s.get('status', 'not computed'))}.")
    return out + [""] + _where(lc)


def _where(lc: dict) -> list[str]:
    if not lc.get("images"):
        return ["## Where the model looks", "", f"In-lung Grad-CAM share not computed: {lc.get('note', 'disabled')}."]
    return ["## Where the model looks", "",
            f"Mean share of the Grad-CAM map inside the lung masks: {_f(lc['mean'], 3)} over {lc['images']} test "
            f"images (a uniform map would score {_f(lc['lung_area_mean'], 3)})."]


def _limitations(m: dict) -> list[str]:
    lines = ["- Not validated for clinical use. No prospective or external (other hospital) evaluation.",
             "- The COVID-19 Radiography Database assembles classes from different sources (Normal and Viral "
             "Pneumonia largely from a pediatric collection); models trained on it can learn the source rather "
             "than the disease (references below). The shortcut audit probes this but cannot rule it out.",
             "- Accuracy, sensitivity and calibration are measured on a test split of the same sources as training.",
             "- The OOD score catches images unlike the training data; it does not catch a radiograph that looks "
             "typical but is mislabelled, post-operative, pediatric (in an adult model) or from another device."]
    o = m.get("ood") or {}
    for name, r in (o.get("benchmark") or {}).items():
        if r["false_accept_rate"] > 0.1:
            lines.append(f"- The OOD threshold lets through {r['false_accept_rate']:.0%} of the `{name}` set "
                         f"(AUROC {_f(r['auroc'])}): such images get a class.")
    if m.get("synthetic"):
        lines.insert(0, "- **Every number on this card comes from synthetic images.** They test the pipeline and "
                        "say nothing about real radiographs.")
    return lines + ["", "References:", ""] + [f"- {r}" for r in REFERENCES]


def render_card(m: dict) -> str:
    """The whole MODEL_CARD.md from the metrics.json dict."""
    tag = " (synthetic data)" if m.get("synthetic") else ""
    banner = ["> **SYNTHETIC DATA.** Built and evaluated on synthetic images; not clinical evidence.", ""] \
        if m.get("synthetic") else []
    parts = [
        "---", "license: apache-2.0", "library_name: onnx", "pipeline_tag: image-classification",
        f"tags: [chest-x-ray, covid-19, research-only{', synthetic-data' if m.get('synthetic') else ''}]", "---", "",
        f"# Model card: covid-ray ensemble `{m['experiment']}`{tag}", "", *banner,
        "## Model details", "", *_details(m), "",
        "## Intended use", "",
        "Research and teaching: studying how chest X-ray classifiers are built, evaluated, calibrated and audited.",
        "", "## Out-of-scope use", "",
        "**Not for clinical decisions**: not for diagnosis, triage, screening or treatment of any patient, and "
        "not as evidence about COVID-19. Not for images other than frontal chest radiographs.", "",
        "## Training data", "", *_data(m), "",
        "## Members and how they were chosen", "", *_members(m), "",
        "## Evaluation (test split)", "", *_evaluation(m), "",
        "## Calibration", "", *_calibration(m), "",
        "## Out-of-distribution abstention", "", *_ood(m), "",
        "## Shortcut audit", "", *_shortcut(m), "",
        "## Known limitations", "", *_limitations(m), "",
        "## How to use", "",
        "```bash", "python -m covid_ray.predict xray.png --model <this folder>",
        "python -m covid_ray.serve --model <this folder>", "```", "",
        "Each answer carries `in_distribution`, `ood_score` and `ood_threshold`; `class` is null when the image "
        "is out of distribution. `metadata.json` describes inputs and outputs for other runtimes.", "",
    ]
    return "\n".join(parts)


def metadata(m: dict) -> dict:
    """MONAI-bundle-style ``metadata.json``: inputs, outputs (one entry per class), metrics."""
    spec, e, o = _input_spec(m), m["ensemble"], m.get("ood") or {}
    outputs = {"probs": {
        "type": "probabilities", "format": "classes", "num_channels": len(m["classes"]), "dtype": "float32",
        "value_range": [0, 1], "is_onehot": False, "channel_def": {str(i): c for i, c in enumerate(m["classes"])},
        "classes": [{"index": i, "name": c, "test_sensitivity": e["per_class"][c]["recall"],
                     "test_specificity": e["per_class"][c]["specificity"], "test_roc_auc": e["per_class"][c]["roc_auc"],
                     "test_images": e["per_class"][c]["support"]} for i, c in enumerate(m["classes"])]}}
    if o.get("status") == "ok":
        outputs["ood_score"] = {"type": "score", "dtype": "float32", "score": o["score"], "higher_is": o["higher_is"],
                                "threshold": o["threshold"], "abstain_when": "ood_score > threshold"}
    return {
        "schema": "covid-ray model metadata (after the MONAI bundle metadata.json)",
        "name": f"covid-ray ensemble {m['experiment']}",
        "task": f"{len(m['classes'])}-class chest X-ray classification",
        "intended_use": "research and teaching; not for clinical decisions",
        "synthetic_data": bool(m.get("synthetic")), "data_source": m["dataset"], "license": "Apache-2.0",
        "network_data_format": {
            "inputs": {"images": {"type": "image", "format": "grayscale", "num_channels": spec["in_chans"],
                                  "spatial_shape": [spec["image_size"], spec["image_size"]], "dtype": "float32",
                                  "value_range": "uint8 / 255, then (x - mean) / std", "resize": spec.get("resize"),
                                  "mean": spec.get("mean"), "std": spec.get("std"), "is_patch_data": False}},
            "outputs": outputs},
        "metrics": {"split": "test", "test_images": m["test_images"],
                    **{k: e[k] for k in ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc_macro", "ece", "nll")},
                    "ci95": e.get("ci95", {}), "temperature": m["calibration"]["temperature"],
                    "ood_test_accept_rate": o.get("test_accept_rate"),
                    "ood_auroc": {n: r["auroc"] for n, r in (o.get("benchmark") or {}).items()},
                    "shortcut_flagged": (m.get("shortcut") or {}).get("flagged"),
                    "lung_cam_share_mean": (m.get("lung_cam") or {}).get("mean")},
    }


def write_model_card(out_dir: str | Path, metrics: dict) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    (out_dir / CARD_FILE).write_text(render_card(metrics))
    write_json(out_dir / METADATA_FILE, metadata(metrics))
    return out_dir / CARD_FILE, out_dir / METADATA_FILE
