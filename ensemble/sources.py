"""Where each image came from, and whether that alone predicts its class.

The Kaggle database's ``<class>.metadata.xlsx`` files give each image's ``URL``: the
collection it was taken from. Its classes come from different collections (Normal
and Viral Pneumonia largely from a pediatric one), so a model can score well by
recognising the collection. This module reads the URLs (matching ``FILE NAME`` to the
image's file name without suffix, case-insensitively), and reports

* the ensemble's test accuracy per source;
* a chi-square test of independence of class and source over every labelled image
  (``scipy.stats.chi2_contingency``, without Yates' correction) with Cramer's V;
* the test accuracy and macro-F1 of a classifier that sees only the source: the
  majority class of each source in the *training* split (the overall training
  majority for a source absent there).

With a single source (the synthetic generator writes one URL) the tests are void,
and the section says so.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

from covid_ray.metrics import confusion_matrix, confusion_metrics

logger = logging.getLogger(__name__)

METADATA_SUFFIX = ".metadata.xlsx"


def read_sources(root: str | Path, classes: list[str]) -> tuple[dict[tuple[str, str], str], list[str]]:
    """``{(class, file stem lower-case): URL}`` from the metadata files, and the problems met."""
    root, out, problems = Path(root), {}, []
    for label in classes:
        path = root / f"{label}{METADATA_SUFFIX}"
        if not path.is_file():
            problems.append(f"{path.name}: not found")
            continue
        try:
            table = pd.read_excel(path, engine="openpyxl", dtype=str)
        except Exception as exc:  # a damaged or foreign file: report it, keep going
            problems.append(f"{path.name}: unreadable ({type(exc).__name__}: {exc})")
            continue
        cols = {c.strip().upper(): c for c in table.columns}
        if "FILE NAME" not in cols or "URL" not in cols:
            problems.append(f"{path.name}: no 'FILE NAME' and 'URL' columns (has {list(table.columns)})")
            continue
        for name, url in zip(table[cols["FILE NAME"]], table[cols["URL"]]):
            if isinstance(name, str) and isinstance(url, str) and url.strip():
                out[(label, Path(name.strip()).stem.lower())] = url.strip()
    return out, problems


def manifest_sources(manifest: pd.DataFrame, root: str | Path, classes: list[str]) -> tuple[pd.Series, list[str]]:
    """The source of every manifest row ('' when unknown), and the problems met."""
    table, problems = read_sources(root, classes)
    keys = zip(manifest["label"], (Path(p).stem.lower() for p in manifest["path"]))
    return pd.Series([table.get(k, "") for k in keys], index=manifest.index), problems


def source_analysis(manifest: pd.DataFrame, root: str | Path, classes: list[str], test_pred: np.ndarray) -> dict:
    """The ``shortcut.sources`` section (see the module docstring).

    Args:
        test_pred: the ensemble's predicted class index per test row, in manifest order.
    """
    sources, problems = manifest_sources(manifest, root, classes)
    known = sources != ""
    out: dict = {"metadata_problems": problems[:10], "images_with_source": int(known.sum()), "images": len(manifest)}
    if not known.any():
        return {**out, "available": False, "note": "no image's source is named in the metadata files"}
    lookup = {c: i for i, c in enumerate(classes)}
    y = manifest["label"].map(lookup).to_numpy()
    names = sorted(sources[known].unique())
    out.update(available=True, sources=len(names))
    test = (manifest["split"] == "test").to_numpy()
    test_y, test_src = y[test], sources[test].to_numpy()
    per = []
    for name in names + ([""] if (test_src == "").any() else []):
        sel = test_src == name
        if sel.any():
            per.append({"source": name or "(unknown)", "test_images": int(sel.sum()),
                        "accuracy": float((test_pred[sel] == test_y[sel]).mean()),
                        "class_counts": {c: int((test_y[sel] == i).sum()) for i, c in enumerate(classes)}})
    out["per_source"] = per
    if len(names) == 1:
        out["note"] = (f"one source for every image ({names[0]!r}): the source cannot predict the class, and the "
                       "per-source accuracy is the overall one")
        return out
    table = pd.crosstab(sources[known], manifest.loc[known, "label"]).reindex(columns=classes, fill_value=0)
    chi2, p, dof, _ = chi2_contingency(table.to_numpy(), correction=False)  # no Yates: V is then exact
    n, r = table.to_numpy().sum(), min(table.shape) - 1
    out["independence"] = {"test": "chi-square, class x source, all labelled images", "chi2": float(chi2),
                           "dof": int(dof), "p_value": float(p),
                           "cramers_v": float(np.sqrt(chi2 / (n * r))) if r > 0 else None}
    train = (manifest["split"] == "train").to_numpy() & known.to_numpy()
    overall = int(np.bincount(y[train], minlength=len(classes)).argmax()) if train.any() else int(np.bincount(y).argmax())
    rule = {s: int(g.value_counts().idxmax()) for s, g in pd.Series(y[train]).groupby(sources.to_numpy()[train])}
    pred = np.array([rule.get(s, overall) for s in test_src])
    k = len(classes)
    stats = confusion_metrics(confusion_matrix(test_y, pred, k))
    out["source_only_classifier"] = {"fitted_on": "train", "evaluated_on": "test",
                                     "accuracy": float(stats["accuracy"]), "macro_f1": float(stats["macro_f1"])}
    return out
