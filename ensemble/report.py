"""``report.md``: the tables of ``metrics.json`` as Markdown, nothing computed here."""
from __future__ import annotations

from typing import Any


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0 turns -0.0 into 0.0
    return str(value)


def _ci(pair: list | None) -> str:
    if not pair or any(v is None for v in pair):
        return "n/a"
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _dataset_section(m: dict) -> list[str]:
    lines = []
    if m["synthetic"]:
        lines += [
            "> **SYNTHETIC DATA.** This ensemble was built and evaluated on the synthetic stand-in "
            "dataset. The numbers test the pipeline; they say nothing about real radiographs "
            "and are not clinical evidence.",
            "",
        ]
    counts = ", ".join(f"{c} {n}" for c, n in m["test_counts"].items())
    lines += [
        f"- Dataset: `{m['dataset']}`{' (**synthetic**)' if m['synthetic'] else ''}",
        f"- Split manifest: `{m['split']}`; validation {m['val_images']} images, test {m['test_images']} images ({counts})",
        f"- Members chosen by `best_{m['metric']}` from `trials.csv`: top {m['top']} asked, {len(m['members'])} used; "
        f"method `{m['method']}`",
        "- Weights, greedy selection and the temperature were fitted on the validation split only; "
        "the test split is used for the evaluation below and nothing else.",
    ]
    lines += [f"- Note: {n}" for n in m.get("notes", [])]
    lines += [f"- **Skipped** trial {s['trial_id']} (`{s['checkpoint']}`): {s['reason']}" for s in m.get("skipped", [])]
    return lines


def _calibration_section(m: dict) -> list[str]:
    cal = m["calibration"]
    if not cal.get("enabled"):
        return ["Calibration disabled (`--no-calibrate`): temperature 1.", ""]
    rows = [
        [split, _f(cal[split]["nll_before"]), _f(cal[split]["nll_after"]),
         _f(cal[split]["ece_before"]), _f(cal[split]["ece_after"])]
        for split in ("val", "test")
    ]
    return [
        f"One temperature fitted on the validation split: **T = {cal['temperature']:.4f}** "
        "(applied as p ∝ p_mean^(1/T); argmax unchanged).",
        "",
        *_table(["split", "NLL before", "NLL after", "ECE before", "ECE after"], rows),
        "",
    ]


def _comparison_section(m: dict) -> list[str]:
    covid = m.get("covid_class")
    header = ["model", "trial", "weight", f"best {m['metric']}", "accuracy", "macro-F1", "balanced acc.",
              "ROC-AUC (macro)", "ECE", "NLL"] + ([f"{covid} sensitivity"] if covid else [])
    e = m["ensemble"]
    rows = [["**ensemble**", "", "1", "", _f(e["accuracy"]), _f(e["macro_f1"]), _f(e["balanced_accuracy"]),
             _f(e["roc_auc_macro"]), _f(e["ece"]), _f(e["nll"])] + ([_f(e["covid_sensitivity"])] if covid else [])]
    for r in m["members"]:
        rows.append([r["model"], str(r["trial_id"]), _f(r["weight"], 3), _f(r[f"best_{m['metric']}"]),
                     _f(r["accuracy"]), _f(r["macro_f1"]), _f(r["balanced_accuracy"]), _f(r["roc_auc_macro"]),
                     _f(r["ece"]), _f(r["nll"])] + ([_f(r["covid_sensitivity"])] if covid else []))
    ci_header = ["model", "trial", "accuracy", "macro-F1"] + ([f"{covid} sensitivity"] if covid else [])
    sens_key = f"sensitivity/{covid}"
    ci_rows = [
        [name, trial, _ci(c.get("accuracy")), _ci(c.get("macro_f1"))] + ([_ci(c.get(sens_key))] if covid else [])
        for name, trial, c in [("**ensemble**", "", e["ci95"])]
        + [(r["model"], str(r["trial_id"]), r["ci95"]) for r in m["members"]]
    ]
    return [
        *_table(header, rows),
        "",
        f"95% percentile-bootstrap confidence intervals on the test split ({m['n_boot']} resamples):",
        "",
        *_table(ci_header, ci_rows),
        "",
    ]


def _per_class_section(m: dict) -> list[str]:
    rows = [
        [name, _f(c["precision"]), _f(c["recall"]), _f(c["specificity"]), _f(c["f1"]), _f(c["roc_auc"]), str(c["support"])]
        for name, c in m["ensemble"]["per_class"].items()
    ]
    return [
        *_table(["class", "precision", "recall (sensitivity)", "specificity", "F1", "ROC-AUC", "support"], rows),
        "",
        "scikit-learn `classification_report` of the ensemble:",
        "",
        "```text",
        m["ensemble"]["classification_report"].rstrip(),
        "```",
        "",
    ]


def _export_section(x: dict | None) -> list[str]:
    if not x or x.get("requested") == "none":
        return ["Export skipped (`--export none`)."]
    if x["status"] == "refused":
        return [f"**Export refused:** {x['message']}"]
    lines = [f"- Graph input `{x['input']}`, output `{x['output']}` (class probabilities); see `preprocess.json`."]
    lines += [f"- `{name}`: {_size(n)}" for name, n in x["files"].items()]
    lines.append(f"- ONNX fp32 vs torch on the test images: max |Δp| = {x['fp32_vs_torch_max_abs_diff']:.2e}")
    gate = x.get("gate")
    if gate:
        verdict = "passed" if gate["passed"] else "**FAILED**"
        lines.append(
            f"- int8 parity gate {verdict}: argmax agreement {gate['agreement']:.2%} "
            f"(needs ≥ {gate['min_agreement']:.0%}), macro-F1 {gate['macro_f1_fp32']:.4f} → {gate['macro_f1_int8']:.4f} "
            f"(drop {100 * gate['f1_drop']:.2f} points, allowed {100 * gate['max_f1_drop']:.0f}), "
            f"max |Δp| {gate['max_abs_diff']:.3f}"
        )
        if not gate["passed"]:
            lines.append(f"- **`ensemble_int8.onnx` was not written:** {gate['reason']}")
    if x.get("int8_error"):
        lines.append(f"- **int8 quantization failed:** {x['int8_error']}")
    lat = x.get("latency_ms", {})
    if lat:
        lines += ["", f"CPU latency (median of {x['latency_repeats']} runs; torch and ONNX Runtime both at {x['threads']} "
                  f"thread(s) of {x['cpu_threads_available']} available):", ""]
        rows = [[name, _f(v.get("batch_1"), 1), _f(v.get("batch_32"), 1)] for name, v in lat.items()]
        lines += _table(["runtime", "batch 1 (ms)", "batch 32 (ms)"], rows)
    return lines


def _lung_cam_section(m: dict) -> list[str]:
    lc = m.get("lung_cam")
    if not lc:
        return ["Not computed (`--lung-cam-images 0`)."]
    if not lc.get("images"):
        return [f"Not computed: {lc.get('note') or 'no sampled test image could be scored'}."]
    rows = [
        ["mean", _f(lc["mean"], 3)], ["median", _f(lc["median"], 3)],
        ["min / max", f"{_f(lc['min'], 3)} / {_f(lc['max'], 3)}"],
        ["images with less than half inside", f"{lc['below_half']} of {lc['images']}"],
        ["lung area share of the crop (what a uniform map scores)", _f(lc["lung_area_mean"], 3)],
    ]
    models = lc.get("member_models", {})
    member_rows = [[f"{models.get(t, '')} ({t})".strip(), _f(v, 3)] for t, v in lc.get("members", {}).items()]
    lines = [
        f"Share of the ensemble's Grad-CAM mass inside the lung masks (the map of the predicted class, members "
        f"weighted as in the ensemble) over {lc['images']} of {lc['available']} test images with masks "
        f"(seeded random sample; `--lung-cam-images`).",
        "",
        *_table(["statistic", "in-lung share"], rows),
        "",
        *_table(["member", "mean in-lung share"], member_rows),
        "",
        "A share well above the lung area means the evidence lies in the lung fields; near or below it, the model "
        "may be using shortcuts outside them (text markers, borders, devices). The map has the resolution of the "
        "last feature map (7x7 for ResNet at 224 px, 2x2 at 64 px), so at small image sizes the share is coarse.",
    ]
    if lc.get("skipped_count"):
        lines += ["", f"{lc['skipped_count']} sampled images were skipped (unreadable, or an empty map or mask)."]
    return lines


def render_report(m: dict) -> str:
    """The whole ``report.md`` from the ``metrics.json`` dict."""
    title = f"# Ensemble report: {m['experiment']}" + (" (synthetic data)" if m["synthetic"] else "")
    lines = [title, ""]
    lines += _dataset_section(m) + [""]
    lines += ["## Calibration", ""] + _calibration_section(m)
    lines += ["## Test split: ensemble and members", ""] + _comparison_section(m)
    lines += ["## Per-class metrics of the ensemble (test)", ""] + _per_class_section(m)
    lines += ["## Where the ensemble looks: in-lung Grad-CAM share (test)", ""] + _lung_cam_section(m) + [""]
    lines += [
        "## Figures", "",
        "![confusion matrix](confusion_matrix.png)", "",
        "![ROC curves](roc.png)", "",
        "![reliability diagram](reliability.png)", "",
    ]
    lines += ["## Export", ""] + _export_section(m.get("export")) + [""]
    return "\n".join(lines)
