"""``report.md``'s sections on OOD abstention, the shortcut audit and TTA: Markdown of metrics.json, nothing computed."""
from __future__ import annotations

from ensemble.report import _f, _table  # one number format for the whole report


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def ood_section(m: dict) -> list[str]:
    o = m.get("ood") or {}
    if o.get("status") != "ok":
        return [f"Not available ({o.get('status', 'not computed')}): {o.get('note', '')}".rstrip(": ")]
    tag = " (**synthetic** data)" if m.get("synthetic") else ""
    t = o["targets"]
    lines = [
        f"The ensemble abstains (`class: null`) when its OOD score `{o['score']}` ({o['description']}) is above "
        f"**{o['threshold']:.6g}**, higher meaning less like the training radiographs. The threshold accepts "
        f"{_pct(o['val_accept_rate'])} of the {o['val_images']} validation images (target {_pct(o['accept_target'])}), "
        f"fitted on the scores of `{o['runtime']}` itself"
        + (f" (per exported graph: {', '.join(f'`{g}` {v:.6g}' for g, v in o['thresholds_by_graph'].items())})"
           if len(o.get("thresholds_by_graph", {})) > 1 else "") + ".",
        "",
        f"- Test split{tag}: {_pct(o['test_accept_rate'])} of {o['test_images']} radiographs accepted "
        f"(binomial 95% CI {_pct(o['test_accept_ci95'][0])} to {_pct(o['test_accept_ci95'][1])}; target "
        f"{_pct(t['test_accept'][0])} to {_pct(t['test_accept'][1])}: "
        f"{'met' if o['targets_met']['test_accept'] else '**missed**'}). The threshold is a quantile of "
        f"{o['val_images']} validation scores: its own sampling error is a few points at this size.",
        f"- What was chosen on what: {o['chosen_on']}. The Gaussians of `mahalanobis` were fitted on "
        f"{(o.get('gaussian') or {}).get('images', 0)} training images. The benchmark sets below and the test split "
        "played no part in the choice or the threshold.",
    ]
    if "fp32_vs_torch_max_abs_diff" in o:
        lines.append("- Exported fp32 graph vs torch, OOD score on validation: max |Δ| = "
                     f"{o['fp32_vs_torch_max_abs_diff']:.2e}")
    rows = [[name, str(r["images"]), _f(r["auroc"]), _pct(r["false_accept_rate"]),
             "yes" if o["targets_met"]["auroc"][name] else "**no**"] for name, r in o["benchmark"].items()]
    lines += ["", f"Benchmark OOD sets{tag}, scored by `{o['runtime']}` (AUROC against the test radiographs; "
              f"false-accept rate = share of the set accepted at the threshold):", "",
              *_table(["OOD set", "images", "AUROC", "false-accept rate", f"AUROC >= {t['auroc_min']}"], rows), ""]
    missed = [n for n, ok in o["targets_met"]["auroc"].items() if not ok]
    if missed:
        lines += [f"**Target missed** for {', '.join(missed)}: AUROC below {t['auroc_min']} "
                  "(see the candidates' numbers below for whether another score would have done better).", ""]
    sets = list(next(iter(o["candidates"].values()))["per_set"])
    bench = o.get("candidates_benchmark") or {}
    rows = [[name + (" (chosen)" if name == o["score"] else ""), _f(c["mean"]), _f(c["min"])]
            + [_f(c["per_set"][s]) for s in sets]
            + ([_f(bench[name]["benchmark"][b]["auroc"]) for b in o["benchmark"]] if bench else [])
            for name, c in o["candidates"].items()]
    header = ["score", "proxy mean", "proxy min", *[f"proxy {s}" for s in sets]]
    header += [f"bench {b}" for b in o["benchmark"]] if bench else []
    lines += ["Candidates: AUROC of validation images vs each proxy set (the choice)"
              + (" and, for information only, on the benchmark sets (members' torch outputs)" if bench else
                 "; every candidate on the benchmark sets: `python -m benchmarks.ood`") + ":", "",
              *_table(header, rows), ""]
    return lines


def _variant_rows(s: dict) -> list[list[str]]:
    q = f"q{round(100 * s['rule']['null_quantile'])}"
    rows = []
    for name in ("intact", "lungs_removed", "lungs_only"):
        v = s[name]
        c = v["chance"]
        rows.append([name.replace("_", " "), _f(v["macro_f1"]), _f(v["accuracy"]),
                     f"{_f(c['macro_f1']['mean'])} / {_f(c['macro_f1'][q])}",
                     f"{_f(c['accuracy']['mean'])} / {_f(c['accuracy'][q])}"])
    return rows


def _sources_lines(src: dict | None) -> list[str]:
    if not src:
        return []
    if not src.get("available"):
        return [f"Image sources: {src.get('note', 'not available')}."]
    lines = ["Image sources (the metadata files' `URL`):", ""]
    if src.get("note"):
        lines += [src["note"] + ".", ""]
    rows = [[r["source"], str(r["test_images"]), _f(r["accuracy"]),
             ", ".join(f"{c} {n}" for c, n in r["class_counts"].items() if n)] for r in src.get("per_source", [])]
    lines += [*_table(["source", "test images", "ensemble accuracy", "classes"], rows), ""]
    ind = src.get("independence")
    if ind:
        clf = src["source_only_classifier"]
        lines += [f"Does the source alone predict the class? {ind['test']}: chi2 = {ind['chi2']:.1f}, "
                  f"dof {ind['dof']}, p = {ind['p_value']:.2g}, Cramer's V = {_f(ind['cramers_v'], 3)}. A classifier "
                  f"that sees only the source (majority class per source on the training split) scores test "
                  f"accuracy {_f(clf['accuracy'])}, macro-F1 {_f(clf['macro_f1'])}.", ""]
    return lines


def shortcut_section(m: dict) -> list[str]:
    s = m.get("shortcut") or {}
    if s.get("status") != "ok":
        return [f"Not available ({s.get('status', 'not computed')}): {s.get('note', '')}".rstrip(": "), "",
                *_sources_lines(s.get("sources"))]
    r = s["rule"]
    q = round(100 * r["null_quantile"])
    verdict = ("**FLAGGED: the ensemble is likely using shortcuts** (evidence outside the lungs)." if s["flagged"]
               else "Not flagged.")
    return [
        f"The {s['images']} test images with lung masks (of {s['test_images']}), evaluated intact, with the lungs "
        "removed (the mask filled with the image's blurred surroundings) and with the lungs only (outside the mask "
        "set to the mean of the lungs)" + (" (**synthetic** data)" if m.get("synthetic") else "") + ":",
        "",
        *_table(["images", "macro-F1", "accuracy", f"chance macro-F1 (mean / {q}th pct)",
                 f"chance accuracy (mean / {q}th pct)"], _variant_rows(s)),
        "",
        f"Chance: {r['chance']} ({r['permutations']} permutations; it keeps the prediction frequencies, so a "
        "variant answering one class everywhere sits at chance).",
        f"Rule: flagged when, with the lungs removed, macro-F1 is above the permutation null's {q}th percentile and "
        f"keeps at least {r['retained_skill']:.0%} of the intact images' above-chance macro-F1.",
        "",
        f"{verdict} {s['reason'][0].upper() + s['reason'][1:]}.",
        "",
        *_sources_lines(s.get("sources")),
    ]


def tta_section(m: dict) -> list[str]:
    t = m.get("tta") or {}
    if not t.get("enabled"):
        return ["Not used (`--tta` not given)."]
    if "test" not in t:
        return [f"Failed: {t.get('note', '')}"]
    w, wo = t["test"]["with"], t["test"]["without"]
    rows = [[name, _f(x["macro_f1"]), _f(x["accuracy"]), _f(x["ece"]), _f(x["nll"]), _f(x["temperature"], 3)]
            for name, x in (("without TTA", wo), (f"with TTA ({len(t['views'])} views)", w))]
    lines = [f"Views: {', '.join(t['views'])}, averaged inside the exported graph. {t['comparison'][0].upper()}"
             f"{t['comparison'][1:]}.", "",
             *_table(["test split", "macro-F1", "accuracy", "ECE", "NLL", "T"], rows), ""]
    lat = t.get("latency_ms")
    if lat:
        lines += [f"Torch latency (median of {t['latency_repeats']} runs):", "",
                  *_table(["runtime", "batch 1 (ms)", "batch 32 (ms)"],
                          [[n, _f(v["batch_1"], 1), _f(v["batch_32"], 1)] for n, v in lat.items()]), ""]
    return lines


def trust_sections(m: dict) -> list[str]:
    """The three sections, with their headings."""
    out = []
    for title, body in (("Out-of-distribution abstention", ood_section(m)),
                        ("Shortcut audit: lungs removed, lungs only (test)", shortcut_section(m)),
                        ("Test-time augmentation", tta_section(m))):
        while body and body[-1] == "":
            body = body[:-1]
        out += [f"## {title}", "", *body, ""]
    return out

