"""The tables and plots of a finished (or interrupted) search, built from its folder.

Everything is read back from disk (Tune's experiment state and each trial's
reports), so the tables can be rebuilt at any time -- after a resume, or while a
search still runs -- with ``python -m covid_ray.results results/NAME``.

Outputs in ``results/<experiment>/``: ``trials.csv`` (one row per trial),
``history.csv`` (one row per trial per epoch), ``leaderboard.md``,
``metric_per_epoch.png`` and ``param_importances.png`` (+ ``.csv``).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from covid_ray.artifacts.experiment import (
    ARM_COLUMN, HISTORY_COLUMNS, HISTORY_FILE, HISTORY_TABLE, IMPORTANCES_PLOT, IMPORTANCES_TABLE, LEADERBOARD_FILE,
    METRIC_PLOT, OPTUNA_DB, SEARCH_ARM, SEARCH_SPACE_FILE, TRIALS_FILE, TUNE_DIRNAME, best_checkpoint,
    load_experiment_json, read_history, trial_dir,
)
from covid_ray.search_space import SearchSpace
from covid_ray.searcher import RECIPE, stopped_by_scheduler, trial_arm

logger = logging.getLogger(__name__)


def _error_text(trial, tune_dir: Path) -> str:
    # Tune writes error.txt into the trial's folder (named after its id, see covid_ray.tune).
    text = ""
    for path in sorted(tune_dir.glob(f"*{trial.trial_id}*/error.txt")):
        text = path.read_text(errors="replace").strip()
    if not text and trial.status == "ERROR":
        text = "trial failed (no error file)"
    # The last line of a traceback says what went wrong; keep the table readable.
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def trial_history_rows(exp: Path, trial_id: str) -> pd.DataFrame | None:
    """The trial's own history, or None when it has none.

    ``train/<trial>/history.jsonl`` is written by the trial's Train controller as each epoch
    is reported. A checkpoint folder on disk whose epoch the file lacks (a kill between the
    checkpoint's registration and the history line) adds that epoch from the checkpoint's
    own ``metadata.json``, so a trial never loses its best checkpoint to the timing of a kill.
    """
    from covid_ray.artifacts.checkpoint import METADATA_FILE

    run = Path(trial_dir(exp, trial_id))
    rows = read_history(run / HISTORY_FILE)
    seen = {int(r["epoch"]) for r in rows if "epoch" in r}
    for meta_file in sorted(run.glob(f"checkpoint_*/{METADATA_FILE}")):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        epoch = meta.get("epoch")
        if isinstance(epoch, int) and epoch not in seen:
            rows.append({**(meta.get("metrics") or {}), "epoch": epoch, "checkpoint": str(meta_file.parent)})
            seen.add(epoch)
    return pd.DataFrame(rows).sort_values("epoch", kind="stable") if rows else None


def _history_of(trial_id: str, df: pd.DataFrame) -> pd.DataFrame:
    """One row per epoch (the last report of an epoch wins), with its checkpoint path or ""."""
    if df is None or df.empty or "epoch" not in df.columns:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    df = df.copy()
    df["trial_id"] = trial_id
    source = "checkpoint" if "checkpoint" in df.columns else "checkpoint_path"  # our history file, or Tune's results
    df["checkpoint"] = df.get(source, pd.Series([""] * len(df), index=df.index)).fillna("").astype(str)
    for col in HISTORY_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    # A restarted worker group reports some epochs again: the later report wins.
    df = df.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
    df["epoch"] = df["epoch"].astype(int)
    return df[HISTORY_COLUMNS]


def collect(exp: Path, locate: Callable[[str], str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(trials, history, meta) of the experiment in ``exp``.

    Args:
        locate: where a checkpoint path Ray reported lives, for an experiment whose
            checkpoints are in object storage (its URI); None keeps the paths and a
            trial's checkpoint only when it exists on this disk.
    """
    from ray.tune import ExperimentAnalysis

    meta = load_experiment_json(exp)
    space = yaml.safe_load((exp / SEARCH_SPACE_FILE).read_text())
    metric, mode = meta["metric"], meta["mode"]
    # The searcher's rule: a trial that ended below its budget without early stopping was stopped.
    full_fidelity = SearchSpace(path=str(exp / SEARCH_SPACE_FILE), **{
        k: v for k, v in space.items() if k in ("scheduler", "fixed")}).full_fidelity
    searched = list(space.get("space", {}))
    analysis = ExperimentAnalysis(str(exp / TUNE_DIRNAME))
    frames = analysis.trial_dataframes
    rows, histories = [], []
    for trial in analysis.trials:
        full = frames.get(trial.trial_id)
        own = trial_history_rows(exp, trial.trial_id)
        hist = _history_of(trial.trial_id, own if own is not None else full)
        if locate is not None:
            hist["checkpoint"] = [locate(c) if c else "" for c in hist["checkpoint"]]
        histories.append(hist)
        row = {"trial_id": trial.trial_id, "status": trial.status, ARM_COLUMN: trial_arm(trial.config)}
        for name in searched:
            row[f"config/{name}"] = trial.config.get(name)
        values = hist[metric].astype(float) if metric in hist else pd.Series(dtype=float)
        if len(values.dropna()):
            best_idx = values.idxmax() if mode == "max" else values.idxmin()
            row[f"best_{metric}"] = float(values[best_idx])
            row["best_epoch"] = int(hist.loc[best_idx, "epoch"])
            best_ckpt = best_checkpoint(hist, row["best_epoch"])
        else:
            row[f"best_{metric}"], row["best_epoch"], best_ckpt = math.nan, math.nan, ""
        row["epochs"] = int(hist["epoch"].max()) if len(hist) else 0
        last = full.iloc[-1] if full is not None and len(full) else {}
        last_report = own.iloc[-1] if own is not None and len(own) else last
        patience_stop = bool(last_report.get("early_stopped", False)) if len(hist) else False
        row["early_stopped"] = patience_stop
        row["stopped_early"] = trial.status == "TERMINATED" and stopped_by_scheduler(
            trial.config, row["epochs"], early_stopped=patience_stop, full_fidelity=full_fidelity)
        row["wall_time_s"] = float(last.get("time_total_s", math.nan)) if len(hist) else math.nan
        row["node_id"] = hist["node_id"].iloc[-1] if len(hist) else ""
        # In object storage it is where Ray put it; on disk only when it is still there.
        row["checkpoint"] = best_ckpt if best_ckpt and (locate is not None or Path(best_ckpt).exists()) else ""
        row["error"] = _error_text(trial, exp / TUNE_DIRNAME)
        rows.append(row)
    trials = pd.DataFrame(rows)
    if len(trials):
        trials = trials.sort_values(f"best_{metric}", ascending=(mode == "min"), na_position="last")
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(columns=HISTORY_COLUMNS)
    return trials.reset_index(drop=True), history, meta


def leaderboard_markdown(trials: pd.DataFrame, meta: dict, top: int = 10) -> str:
    metric = meta["metric"]
    tag = " (SYNTHETIC data: these numbers describe the generator, not real radiographs)" if meta.get("synthetic") else ""
    lines = [f"# Leaderboard: {meta['name']}{tag}", "", f"Dataset: `{Path(meta['data']).name}`; metric: `{metric}` ({meta['mode']}), validation split.", ""]
    shown = [c for c in trials.columns if c.startswith("config/")]
    header = ["rank", "trial", "arm", *[c.split("/", 1)[1] for c in shown], f"best {metric}", "best epoch", "epochs",
              "status"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    arms = trials[ARM_COLUMN] if ARM_COLUMN in trials.columns else pd.Series([SEARCH_ARM] * len(trials),
                                                                             index=trials.index)
    ranked = list(enumerate(trials.iterrows(), start=1))
    # The recipe always shows, even below the top rows: it is the reference every row is read against.
    rows = [(i, r) for i, (_, r) in ranked[:top]]
    rows += [(i, r) for i, (idx, r) in ranked[top:] if arms[idx] == RECIPE]
    for i, r in rows:
        arm = arms[r.name]
        cells = [str(i), r["trial_id"], f"**{arm}**" if arm == RECIPE else str(arm)]
        for c in shown:
            v = r[c]
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        best = r[f"best_{metric}"]
        status = "stopped early (ASHA)" if r["stopped_early"] else ("early stop" if r["early_stopped"] else r["status"])
        cells += [f"{best:.4f}" if pd.notna(best) else "-", str(r["best_epoch"]) if pd.notna(r["best_epoch"]) else "-", str(r["epochs"]), status]
        lines.append("| " + " | ".join(cells) + " |")
    errored = int((trials["status"] == "ERROR").sum()) if len(trials) else 0
    completed = int(((trials["status"] == "TERMINATED")).sum()) if len(trials) else 0
    wall = float(meta.get("search_wall_time_s", math.nan))
    lines += [
        "",
        f"Totals: {len(trials)} trials, {completed} completed, "
        f"{int(trials['stopped_early'].sum()) if len(trials) else 0} stopped early by ASHA, "
        f"{errored} errored; wall time {wall / 60:.1f} min.",
    ]
    recipe = trials[arms == RECIPE]
    if len(recipe):
        r = recipe.iloc[0]
        rank = int(np.flatnonzero((arms == RECIPE).to_numpy())[0]) + 1
        best = r[f"best_{metric}"]
        searched = trials[arms != RECIPE][f"best_{metric}"].astype(float)
        top_value = searched.max() if meta["mode"] == "max" else searched.min()
        verdict = ""
        if pd.notna(best) and len(searched.dropna()):
            gap = (top_value - best) if meta["mode"] == "max" else (best - top_value)
            verdict = (f" The best searched trial is {gap:+.4f} {'above' if meta['mode'] == 'max' else 'below'} it"
                       + ("." if gap > 0 else ": the search has not beaten the hand recipe on validation."))
        lines += ["", f"Reference: the hand recipe (`search_spaces/recipe.yaml`) ran as trial `{r['trial_id']}`, "
                      f"best {metric} {best:.4f} (rank {rank} of {len(trials)}).{verdict}"
                  if pd.notna(best) else f"Reference: the hand recipe ran as trial `{r['trial_id']}` ({r['status']})."]
    if errored:
        lines += ["", "Errors:"]
        for _, r in trials[trials["status"] == "ERROR"].iterrows():
            lines.append(f"- `{r['trial_id']}`: {r['error']}")
    return "\n".join(lines) + "\n"


def plot_history(history: pd.DataFrame, metric: str, out: Path, synthetic: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for trial_id, h in history.groupby("trial_id"):
        ax.plot(h["epoch"], h[metric], marker="o", ms=3, lw=1.2, label=str(trial_id))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch per trial" + (" (synthetic data)" if synthetic else ""))
    ax.grid(alpha=0.3)
    if history["trial_id"].nunique() <= 12:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def param_importances(exp: Path, study_name: str) -> pd.DataFrame | None:
    """Optuna's fANOVA importances from the persisted study (None when it cannot say)."""
    import optuna

    db = exp / OPTUNA_DB
    if not db.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}")
        imp = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, KeyError) as exc:  # too few completed trials, one param...
        logger.info("no parameter importances: %s", exc)
        return None
    return pd.DataFrame({"parameter": list(imp), "importance": list(imp.values())})


def plot_importances(imp: pd.DataFrame, out: Path, synthetic: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.4 * len(imp) + 1.5))
    ax.barh(imp["parameter"][::-1], imp["importance"][::-1], color="#4472c4")
    ax.set_xlabel("importance (Optuna fANOVA)")
    ax.set_title("Hyperparameter importances" + (" (synthetic data)" if synthetic else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_tables(exp: str | Path, locate: Callable[[str], str] | None = None) -> dict[str, Path]:
    """Write every table and plot of the experiment; returns their paths.

    ``locate``: see :func:`collect` (a storage URI experiment's tables name its checkpoints there).
    """
    exp = Path(exp)
    trials, history, meta = collect(exp, locate)
    out = {"trials": exp / TRIALS_FILE, "history": exp / HISTORY_TABLE, "leaderboard": exp / LEADERBOARD_FILE}
    trials.to_csv(out["trials"], index=False)
    history.to_csv(out["history"], index=False)
    out["leaderboard"].write_text(leaderboard_markdown(trials, meta))
    if len(history):
        out["plot"] = exp / METRIC_PLOT
        plot_history(history, meta["metric"], out["plot"], meta.get("synthetic", False))
    imp = param_importances(exp, meta["name"])
    if imp is not None and len(imp):
        imp.to_csv(exp / IMPORTANCES_TABLE, index=False)
        out["importances"] = exp / IMPORTANCES_PLOT
        plot_importances(imp, out["importances"], meta.get("synthetic", False))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m covid_ray.results results/NAME", file=sys.stderr)
        return 2
    paths = write_tables(Path(argv[0]))
    print((Path(argv[0]) / LEADERBOARD_FILE).read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
