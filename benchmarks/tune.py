"""Search benchmark: ``python -m benchmarks.tune [--seeds 0,1,2] [--num-samples N]``.

Runs the quick profile (``search_spaces/quick.yaml``, with its warm start and the recipe
trial) on the demo's synthetic data once per searcher and seed, with only the sampler
changed: Optuna TPE against Optuna's random sampler (the same study, the same ASHA, the same
signals). Reports, per searcher, the mean over seeds of the best validation metric, trials
per hour, the share of trial-epochs ASHA saved, and what the study recorded (COMPLETE,
PRUNED, FAIL) -- and the per-trial fixed cost with its breakdown by phase, measured from
timestamps:

* Tune start -> trial driver running: Tune's placement and the trial-driver actor (a new
  process, or one reused from an earlier trial);
* trial driver -> training loop entered: the trainer's ``fit()``: the Train controller
  process, the worker group (a new process importing torch, the gloo group), the train
  function's imports;
* loop entered -> first epoch: manifest, decode cache, model and optimizer;
* between epochs: checkpoint writes and reports (outside the epochs' own time);
* last epoch -> trial complete: the last report reaching Tune, worker and controller shutdown.

Fixed cost = the trial's wall time from Tune's start to its completion minus the time of
its epochs. Writes a section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from ray.tune import Callback

from benchmarks.common import machine_note, markdown_table, today, write_section
from covid_ray.artifacts.experiment import (
    ARM_COLUMN, OPTUNA_DB, RECIPE_ARM, TUNE_DIRNAME, load_experiment_json, read_trials,
)
from covid_ray.data.prepare import DEFAULT_SYNTHETIC_DIR, ensure_synthetic
from covid_ray.search_space import load_search_space

QUICK = Path("search_spaces") / "quick.yaml"
SECTION = "Search: Optuna TPE vs random, ASHA savings, per-trial fixed cost (`python -m benchmarks.tune`)"
PHASES = ("tune_to_driver", "driver_to_loop", "loop_to_epoch1", "between_epochs", "last_to_complete")
PHASE_NAMES = {
    "tune_to_driver": "Tune start -> trial driver running (actor placed, process started or reused)",
    "driver_to_loop": "trial driver -> training loop entered (`fit()`: controller, placement group, a warm worker "
                      "leased from the search's pool or a new one started, gloo)",
    "loop_to_epoch1": "loop entered -> first epoch (manifest, decode cache, model, optimizer)",
    "between_epochs": "between epochs (checkpoint writes and reports)",
    "last_to_complete": "last epoch -> trial complete (last report, shutdown, the worker handed back)",
}


class TrialClock(Callback):
    """Wall-clock time at which Tune starts and completes each trial (written as JSON lines)."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, trial, event: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"trial_id": trial.trial_id, "event": event, "t": time.time()}) + "\n")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._write(trial, "start")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, "complete")


def phases(exp: Path, clock: Path) -> pd.DataFrame:
    """Per-trial phases (seconds) from the clock, Tune's results and the loop's own timestamps."""
    from ray.tune import ExperimentAnalysis

    events = pd.read_json(clock, lines=True)
    start = events[events.event == "start"].groupby("trial_id")["t"].last()  # a restarted trial: its last start
    end = events[events.event == "complete"].groupby("trial_id")["t"].last()
    rows = []
    for tid, df in ExperimentAnalysis(str(exp / TUNE_DIRNAME)).trial_dataframes.items():
        if tid not in start or tid not in end or df is None or df.empty or "loop_started_at" not in df:
            continue
        df = df.drop_duplicates("epoch", keep="last")
        first, last = df.iloc[0], df.iloc[-1]
        epochs = float(df["epoch_time_s"].sum())
        driver = float(first["timestamp"] - first["time_total_s"])  # the function trainable's start
        last_end = float(last["epoch_started_at"] + last["epoch_time_s"])
        rows.append({
            "trial_id": tid,
            "tune_to_driver": driver - start[tid],
            "driver_to_loop": float(first["loop_started_at"]) - driver,
            "loop_to_epoch1": float(first["epoch_started_at"] - first["loop_started_at"]),
            "between_epochs": (last_end - float(first["epoch_started_at"])) - epochs,
            "last_to_complete": end[tid] - last_end,
            "epochs_s": epochs,
            "wall_s": end[tid] - start[tid],
        })
    out = pd.DataFrame(rows)
    if len(out):
        out["fixed_s"] = out["wall_s"] - out["epochs_s"]
    return out


def study_states(exp: Path, name: str) -> dict[str, int]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{exp / OPTUNA_DB}")
    counts: dict[str, int] = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def summarize(exp: Path, max_epochs: int, clock: Path) -> dict:
    trials = read_trials(exp)
    meta = load_experiment_json(exp)
    metric = f"best_{meta['metric']}"
    searched = trials[trials[ARM_COLUMN] != RECIPE_ARM]
    recipe = trials[trials[ARM_COLUMN] == RECIPE_ARM]
    wall_h = meta["search_wall_time_s"] / 3600
    epochs_run = int(searched["epochs"].sum())
    ph = phases(exp, clock)
    best_row = searched.sort_values(metric, ascending=False).iloc[0]
    return {
        "trials": len(searched),
        "wall_min": meta["search_wall_time_s"] / 60,
        "trials_per_hour": len(trials) / wall_h,
        "epochs_run": epochs_run,
        "epochs_full": len(searched) * max_epochs,
        "asha_saved": 1 - epochs_run / (len(searched) * max_epochs),
        "stopped_early": int(searched["stopped_early"].sum()),
        "best": float(best_row[metric]),
        "best_model": str(best_row["config/model"]),
        "best_arm": str(best_row[ARM_COLUMN]),
        "recipe": float(recipe[metric].iloc[0]) if len(recipe) else float("nan"),
        "study": study_states(exp, meta["name"]),
        "phases": ph,
    }


def run(searcher: str, seed: int, storage: Path, data: Path, num_samples: int | None, clock: Path) -> Path:
    from covid_ray.tune import SearchOptions, run_search

    doc = yaml.safe_load(QUICK.read_text())
    doc["searcher"] = {**doc.get("searcher", {}), "type": searcher, "seed": seed}
    variant = storage / f"{searcher}-{seed}.yaml"
    variant.write_text(yaml.safe_dump(doc))
    return run_search(SearchOptions(
        data=str(data), search_space=str(variant), experiment=f"bench-{searcher}-{seed}",
        storage_path=str(storage), num_samples=num_samples, callbacks=[TrialClock(str(clock))],
    ))


def _mean(values) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def report(results: dict[str, list[dict]], ss, seeds: list[int], num_samples: int | None) -> str:
    label = {"optuna": "Optuna TPE + ASHA", "random": "Optuna random + ASHA"}
    rows = []
    for searcher, runs in results.items():
        states: dict[str, int] = {}
        for r in runs:
            for k, v in r["study"].items():
                states[k] = states.get(k, 0) + v
        rows.append([
            label[searcher], str(len(runs)), f"{_mean(r['trials'] for r in runs):.0f}",
            f"{_mean(r['wall_min'] for r in runs):.1f}", f"{_mean(r['trials_per_hour'] for r in runs):.0f}",
            f"{_mean(100 * r['asha_saved'] for r in runs):.0f}%",
            f"**{_mean(r['best'] for r in runs):.3f}** ({', '.join(format(r['best'], '.3f') for r in runs)})",
            f"{_mean(r['recipe'] for r in runs):.3f}",
            ", ".join(f"{k} {v}" for k, v in sorted(states.items())),
        ])
    table = markdown_table(
        ["searcher", "seeds", "sampled trials", "wall (min)", "trials/hour", "epochs saved by ASHA",
         f"best searched {ss.metric}, mean (per seed)", "recipe trial (mean)", "study states (all seeds)"], rows)
    ph = pd.concat([r["phases"] for runs in results.values() for r in runs], ignore_index=True)
    phase_rows = [[PHASE_NAMES[p], f"{ph[p].median():.2f}", f"{ph[p].mean():.2f}"] for p in PHASES]
    phase_rows.append(["**fixed cost per trial** (wall minus epochs)", f"**{ph['fixed_s'].median():.2f}**",
                       f"{ph['fixed_s'].mean():.2f}"])
    phase_rows.append(["(epochs per trial, for scale)", f"{ph['epochs_s'].median():.2f}", f"{ph['epochs_s'].mean():.2f}"])
    phase_table = markdown_table(["phase of a trial", "median s", "mean s"], phase_rows)
    n = ss.num_samples if num_samples is None else num_samples
    return (
        f"Command: `python -m benchmarks.tune --seeds {','.join(map(str, seeds))}` &nbsp; Date: {today()}\n"
        f"Machine: {machine_note()}.\n\n"
        f"The quick profile (`{QUICK}`: {n} sampled trials plus the recipe trial, {ss.max_epochs} epochs max, "
        f"ASHA grace {ss.scheduler['grace_period']} and reduction factor {ss.scheduler.get('reduction_factor', 2)}, "
        f"{ss.max_concurrent} concurrent, warm start `searcher.start_with`) on the demo's **synthetic** data; "
        "only the sampler differs. Validation metric; the test split is not used.\n\n"
        f"{table}\n\n"
        "The study states are what Optuna recorded: trials ASHA stopped arrive as PRUNED with their per-epoch "
        "values, not as COMPLETE with a low-epoch score (`covid_ray.searcher`).\n\n"
        f"Per-trial fixed cost, all {len(ph)} trials of all runs:\n\n{phase_table}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="searcher seeds (default 0,1,2)")
    parser.add_argument("--searchers", default="optuna,random")
    parser.add_argument("--num-samples", type=int, default=None, help="override the YAML (e.g. 4 for a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the experiment folders")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)

    import ray

    seeds = [int(s) for s in args.seeds.split(",")]
    data = ensure_synthetic(DEFAULT_SYNTHETIC_DIR)
    ss = load_search_space(QUICK)
    storage = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    results: dict[str, list[dict]] = {s: [] for s in args.searchers.split(",")}
    try:
        for seed in seeds:
            for searcher in results:  # alternate, so background load falls on both alike
                clock = storage / f"clock-{searcher}-{seed}.jsonl"
                exp = run(searcher, seed, storage, data, args.num_samples, clock)
                ray.shutdown()  # a fresh Ray per search: no warm processes carried from one to the next
                results[searcher].append(summarize(exp, ss.max_epochs, clock))
                print(searcher, seed, {k: v for k, v in results[searcher][-1].items() if k != "phases"}, flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(storage, ignore_errors=True)
    body = report(results, ss, seeds, args.num_samples)
    if not args.no_write:
        write_section(SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
