"""The trust stages of ``ensemble.build``: TTA, OOD abstention, shortcut audit, data summary, model card.

``build_ensemble`` calls these hooks in order:

1. :func:`tta_inputs` (``--tta``): member probabilities averaged over the views,
   which the rest of the build then combines, calibrates and evaluates;
2. :func:`before_export`: the TTA comparison, the shortcut audit, the data summary
   and the OOD fit (score chosen on validation vs proxies); returns what the export
   puts into the graph;
3. :func:`after_export`: the OOD threshold, ``preprocess.json``'s ``ood`` and the
   OOD benchmark;
4. :func:`write_card`: ``MODEL_CARD.md`` and ``metadata.json`` from the finished
   metrics dict.

Each stage is a diagnostic of a finished ensemble: a failure is logged and reported
in its section (``status: failed``) and the build goes on. Every stage records its
wall time (``seconds``): they reuse cached member outputs and cost seconds.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from covid_ray.artifacts.experiment import DATA_REPORT_FILE, Experiment

from ensemble.calibrate import apply_temperature
from ensemble.combine import soft_vote
from ensemble.members import SplitProbs, load_split_dataset, preprocessed_batches
from ensemble.select import Selection

logger = logging.getLogger(__name__)


def _guarded(name: str, fn, *args, **kwargs) -> dict:
    """``fn(...)`` with its wall time, or a ``failed`` section naming the error."""
    start = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:  # a diagnostic: never lose the build over it
        logger.exception("%s failed", name)
        out = {"status": "failed", "note": f"{type(exc).__name__}: {exc}"}
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def tta_inputs(views: Sequence[str], selection: Selection, experiment: Experiment, manifest: pd.DataFrame,
               plain: dict[str, SplitProbs], *, cache_dir: Path, data_cache_dir: str | None) -> dict[str, SplitProbs]:
    """The member probabilities the build continues with: ``plain`` without views, else view-averaged."""
    if len(views) <= 1:
        return plain
    from ensemble.tta_eval import tta_probabilities

    return tta_probabilities(selection.members, experiment, manifest, views, plain, cache_dir=cache_dir,
                             data_cache_dir=data_cache_dir)


def _tta_section(views, selection, experiment, manifest, plain, probs, weights, temperature, *, calibrate, repeats,
                 data_cache_dir) -> dict:
    from ensemble.tta_eval import tta_effect, tta_latency

    out = {"views": list(views), "fitted_on": "val",
           "comparison": "same members and weights; each variant has its own temperature fitted on validation",
           "test": tta_effect(plain, probs, weights, calibrate=calibrate)}
    if repeats > 0:
        from ensemble.export import EnsembleModule, input_preset

        try:
            # The ensemble's own input (grayscale when its members' channels differ), from the
            # members it keeps (weight > 0): the module's spec, not a second reading of the members.
            module = EnsembleModule(selection.members, weights, temperature, experiment.classes)
            test = load_split_dataset(experiment, manifest, "test", resize=module.spec["resize"],
                                      data_cache_dir=data_cache_dir)
            sample = next(preprocessed_batches(test, input_preset(module.spec), batch_size=32))[0]
            out["latency_ms"] = tta_latency(module, views, sample, repeats=repeats)
            out["latency_repeats"] = repeats
        except ValueError as exc:  # members of different sizes: no single torch module
            out["latency_note"] = str(exc)
    return out


def data_summary(experiment: Experiment) -> dict:
    """What ``data_report.json`` beside the split says: source, counts, grouping, exclusions."""
    path = Path(experiment.split).parent / DATA_REPORT_FILE
    if not path.is_file():
        return {"available": False, "note": f"no {DATA_REPORT_FILE} beside {Path(experiment.split).name}"}
    report = json.loads(path.read_text())
    reasons = Counter(str(e.get("reason", "")).split(":")[0].split("(")[0].strip() for e in report.get("excluded", []))
    odd = Counter(str(e.get("reason", "")).split(":")[0].strip() for e in report.get("odd", []))
    return {
        "available": True, "dataset": report.get("dataset"), "layout": report.get("layout"),
        "synthetic": report.get("synthetic"), "seed": report.get("seed"), "ratios": report.get("ratios"),
        "images_used": report.get("images_used"), "counts": report.get("counts"), "grouping": report.get("grouping"),
        "excluded": len(report.get("excluded", [])), "excluded_reasons": dict(reasons.most_common()),
        "odd": len(report.get("odd", [])), "odd_reasons": dict(odd.most_common()),
    }


def before_export(metrics: dict, selection: Selection, experiment: Experiment, manifest: pd.DataFrame,
                  plain: dict[str, SplitProbs], probs: dict[str, SplitProbs], weights: np.ndarray, temperature: float,
                  *, views: Sequence[str], calibrate: bool, ood: bool, shortcut: bool, latency_repeats: int,
                  cache_dir: Path, data_cache_dir: str | None):
    """Fill ``tta``, ``shortcut``, ``data`` of ``metrics``; return the OOD fit for the export (or None)."""
    from ensemble.abstain import fit_ood
    from ensemble.shortcut import shortcut_audit

    members = selection.members
    test_cal = apply_temperature(soft_vote(probs["test"].probs, weights), temperature)
    metrics["tta"] = _guarded("TTA comparison", _tta_section, views, selection, experiment, manifest, plain, probs,
                              weights, temperature, calibrate=calibrate, repeats=latency_repeats,
                              data_cache_dir=data_cache_dir) if len(views) > 1 else {"views": [], "enabled": False}
    metrics["tta"].setdefault("enabled", len(views) > 1)
    metrics["shortcut"] = _guarded("shortcut audit", shortcut_audit, members, weights, temperature, experiment,
                                   manifest, test_cal, views=views or ("identity",), cache_dir=cache_dir,
                                   data_cache_dir=data_cache_dir) if shortcut else {"status": "skipped"}
    metrics["data"] = data_summary(experiment)
    if not ood:
        metrics["ood"] = {"status": "skipped", "note": "disabled with --no-ood"}
        return None
    start = time.perf_counter()
    try:
        fit = fit_ood(members, weights, temperature, experiment, manifest, cache_dir=cache_dir,
                      data_cache_dir=data_cache_dir)
    except Exception as exc:  # a diagnostic: never lose the build over it
        logger.exception("OOD fit failed")
        metrics["ood"] = {"status": "failed", "note": f"{type(exc).__name__}: {exc}"}
        return None
    metrics["ood"] = {"status": "fitted", "fit_seconds": round(time.perf_counter() - start, 1)}
    return fit


def after_export(metrics: dict, fit, experiment: Experiment, manifest: pd.DataFrame, out_dir: Path, *,
                 cache_dir: Path, data_cache_dir: str | None) -> None:
    """Threshold and measure the OOD score (``metrics["ood"]``); writes ``preprocess.json``'s ``ood``."""
    if fit is None:
        return
    from ensemble.abstain import finish_ood

    fit_seconds = metrics["ood"].get("fit_seconds")
    metrics["ood"] = _guarded("OOD threshold and benchmark", finish_ood, fit, experiment, manifest, out_dir,
                              metrics.get("export") or {}, cache_dir=cache_dir, data_cache_dir=data_cache_dir)
    metrics["ood"].setdefault("status", "ok")
    metrics["ood"]["fit_seconds"] = fit_seconds


def write_card(out_dir: Path, metrics: dict) -> None:
    """``MODEL_CARD.md`` and ``metadata.json`` beside ``metrics.json``."""
    from ensemble.model_card import write_model_card

    try:
        write_model_card(out_dir, metrics)
    except Exception:  # the card restates metrics.json; never lose the build over it
        logger.exception("writing the model card failed")


def summary_lines(m: dict) -> list[str]:
    """Lines for ensemble.build's terminal summary: OOD, shortcut verdict, TTA."""
    lines = []
    o = m.get("ood") or {}
    if o.get("status") == "ok":
        worst = min(o["benchmark"].items(), key=lambda kv: kv[1]["auroc"])
        lines.append(f"OOD abstention: {o['score']} > {o['threshold']:.4g} abstains; test acceptance "
                     f"{o['test_accept_rate']:.1%} (target 95%), lowest AUROC {worst[1]['auroc']:.3f} ({worst[0]})")
    elif o.get("status") in ("failed", "skipped"):
        lines.append(f"OOD abstention {o['status']}: {o.get('note', '')}")
    s = m.get("shortcut") or {}
    if s.get("status") == "ok":
        verdict = "LIKELY USING SHORTCUTS" if s["flagged"] else "not flagged"
        lines.append(f"shortcut audit: {verdict}: {s['reason']}")
    t = m.get("tta") or {}
    if t.get("enabled") and "test" in t:
        d = t["test"]["delta"]
        lines.append(f"TTA ({len(t['views'])} views): test macro-F1 {d['macro_f1']:+.4f}, ECE {d['ece']:+.4f}")
    return lines
