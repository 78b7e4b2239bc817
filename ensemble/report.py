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
        "- Weights, greedy selection, the validation guard and the temperature were fitted on the validation split only; "
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
    return [
        *_table(header, rows),
        "",
        *_ci_tables(m),
    ]


def _ci_rows(m: dict) -> list[tuple[str, str, dict]]:
    """(model, trial, ci95) of the ensemble and every member, in table order."""
    return ([("**ensemble**", "", m["ensemble"]["ci95"])]
            + [(r["model"], str(r["trial_id"]), r["ci95"]) for r in m["members"]])


def _ci_tables(m: dict) -> list[str]:
    classes = m["classes"]
    boot = m.get("bootstrap", {})
    unit = (f"resampling the {boot.get('groups')} duplicate groups of the split manifest (near-duplicates move "
            "together)" if boot.get("unit") == "duplicate group"
            else f"resampling single images: {boot['note']}" if boot.get("note") else "resampling single images")
    rows = [[name, trial, _ci(c.get("accuracy")), _ci(c.get("macro_f1"))]
            + [_ci(c.get(f"sensitivity/{k}")) for k in classes] for name, trial, c in _ci_rows(m)]
    spec_rows = [[name, trial] + [_ci(c.get(f"specificity/{k}")) for k in classes] for name, trial, c in _ci_rows(m)]
    return [
        f"95% percentile-bootstrap confidence intervals on the test split ({m['n_boot']} resamples, {unit}; "
        "the same resamples for every model):",
        "",
        *_table(["model", "trial", "accuracy", "macro-F1"] + [f"{k} sensitivity" for k in classes], rows),
        "",
        *_table(["model", "trial"] + [f"{k} specificity" for k in classes], spec_rows),
        "",
    ]


def _combination_lines(m: dict) -> list[str]:
    c = m.get("combination")
    if not c:
        return []
    rule = ("Default rule (`guarded`): greedy selection with replacement on validation NLL, then a guard on the "
            f"experiment's metric: if the greedy ensemble's validation {c['metric']} is worse than the best single "
            "member's (from the same validation probabilities), that member is used alone."
            if c["method"] == "guarded" else f"Method `{c['method']}` (no guard).")
    best = c["best_member"]
    chose = "the ensemble" if c["choice"] == "ensemble" else f"the best member alone (trial {best['trial_id']})"
    return [
        f"- Combination: {rule} Validation {c['metric']}: ensemble {_f(c['ensemble_val'])}, best member "
        f"(trial {best['trial_id']}) {_f(best['val'])}; used **{chose}**.",
    ]


def _reference_section(m: dict) -> list[str]:
    """Ensemble vs its best member and vs the hand-recipe trial, on test."""
    lines = _combination_lines(m)
    if m.get("vs_best_member"):
        lines.append(f"- {m['vs_best_member']['summary']}")
    r = m.get("recipe") or {"present": False, "note": "not computed"}
    if not r.get("present"):
        return lines + ["", f"**Hand recipe: not compared.** {r.get('note', '')}", ""]
    classes = m["classes"]
    top = m["members"][0]
    models = [("**ensemble**", "", m["ensemble"]),
              (f"best single trial ({top['model']})", str(top["trial_id"]), top),
              (f"hand recipe ({r['model']})", str(r["trial_id"]), r)]

    def cell(x: dict, key: str, ci_key: str) -> str:
        return f"{_f(x.get(key))} {_ci(x.get('ci95', {}).get(ci_key))}"

    rows = [[name, trial, cell(x, "macro_f1", "macro_f1"), cell(x, "accuracy", "accuracy")]
            + [f"{_f(x['per_class'][k]['recall'])} {_ci(x.get('ci95', {}).get(f'sensitivity/{k}'))}" for k in classes]
            for name, trial, x in models]
    d = r["ensemble_minus_recipe"]
    where = "a member of the ensemble" if r.get("in_ensemble") else "not among the ensemble's members"
    return lines + [
        "",
        f"**{r['summary']}**",
        "",
        f"Test split, with 95% bootstrap intervals; the recipe trial is {where}:",
        "",
        *_table(["model", "trial", "macro-F1", "accuracy"] + [f"{k} sensitivity" for k in classes], rows),
        "",
        f"Ensemble minus hand recipe, test macro-F1: {_f(d['macro_f1'])} (paired 95% CI {_ci(d['ci95'])}, "
        "same resamples for both). Verdict rule: a difference of 0 or less did not beat the recipe; a positive "
        "one beat it only when the whole interval is above 0, otherwise there is no clear difference.",
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
    lines += ["## Did the search earn its compute? (test)", ""] + _reference_section(m)
    lines += ["## Calibration", ""] + _calibration_section(m)
    lines += ["## Test split: ensemble and members", ""] + _comparison_section(m)
    lines += ["## Per-class metrics of the ensemble (test)", ""] + _per_class_section(m)
    lines += ["## Where the ensemble looks: in-lung Grad-CAM share (test)", ""] + _lung_cam_section(m) + [""]
    from ensemble.trust_report import trust_sections  # here: it imports this module's formatters

    lines += trust_sections(m)
    lines += [
        "## Figures", "",
        "![confusion matrix](confusion_matrix.png)", "",
        "![ROC curves](roc.png)", "",
        "![reliability diagram](reliability.png)", "",
    ]
    lines += ["## Export", ""] + _export_section(m.get("export")) + [""]
    return "\n".join(lines)
