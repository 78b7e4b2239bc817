"""Search benchmark (issue 4): ``python -m benchmarks.tune``.

Runs the quick profile twice on the demo's synthetic data, with the same budget
(number of trials, ASHA settings, concurrency) and only the searcher changed:
Optuna TPE against random search. Reports trials per hour, the share of
trial-epochs ASHA saved against running every trial to max epochs, the fixed
overhead per trial (trial wall time minus its epochs' time), and the best
validation metric each searcher reached. Writes a section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from benchmarks.common import machine_note, markdown_table, today, write_section
from covid_ray.data.prepare import DEFAULT_SYNTHETIC_DIR, ensure_synthetic
from covid_ray.search_space import load_search_space

QUICK = Path("search_spaces") / "quick.yaml"


def summarize(exp: Path, max_epochs: int) -> dict:
    trials = pd.read_csv(exp / "trials.csv")
    history = pd.read_csv(exp / "history.csv")
    meta = json.loads((exp / "experiment.json").read_text())
    metric = meta["metric"]
    wall_h = meta["search_wall_time_s"] / 3600
    epochs_run = int(trials["epochs"].sum())
    epoch_time = history.groupby("trial_id")["epoch_time_s"].sum()
    overhead = (trials.set_index("trial_id")["wall_time_s"] - epoch_time).dropna()
    return {
        "trials": len(trials),
        "wall_min": meta["search_wall_time_s"] / 60,
        "trials_per_hour": len(trials) / wall_h,
        "epochs_run": epochs_run,
        "epochs_full": len(trials) * max_epochs,
        "asha_saved": 1 - epochs_run / (len(trials) * max_epochs),
        "stopped_early": int(trials["stopped_early"].sum()),
        "overhead_s": float(overhead.median()),
        "best": float(trials[f"best_{metric}"].max()),
        "best_model": str(trials.sort_values(f"best_{metric}", ascending=False)["config/model"].iloc[0]),
    }


def run(searcher: str, space: Path, storage: Path, data: Path, num_samples: int | None) -> Path:
    from covid_ray.tune import SearchOptions, run_search

    doc = yaml.safe_load(space.read_text())
    doc["searcher"] = {**doc.get("searcher", {}), "type": searcher}
    variant = storage / f"{searcher}.yaml"
    variant.write_text(yaml.safe_dump(doc))
    return run_search(SearchOptions(
        data=str(data), search_space=str(variant), experiment=f"bench-{searcher}",
        storage_path=str(storage), num_samples=num_samples,
    ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-space", type=Path, default=QUICK)
    parser.add_argument("--num-samples", type=int, default=None, help="override the YAML (e.g. 4 for a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the two experiment folders")
    args = parser.parse_args(argv)

    import ray

    data = ensure_synthetic(DEFAULT_SYNTHETIC_DIR)
    ss = load_search_space(args.search_space)
    storage = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    rows, results = [], {}
    try:
        for searcher in ("optuna", "random"):
            exp = run(searcher, args.search_space, storage, data, args.num_samples)
            results[searcher] = r = summarize(exp, ss.max_epochs)
            rows.append([
                "Optuna TPE + ASHA" if searcher == "optuna" else "random + ASHA",
                str(r["trials"]), f"{r['wall_min']:.1f}", f"{r['trials_per_hour']:.0f}",
                f"{r['epochs_run']}/{r['epochs_full']}", f"{100 * r['asha_saved']:.0f}%", str(r["stopped_early"]),
                f"{r['overhead_s']:.1f}", f"{r['best']:.3f} ({r['best_model']})",
            ])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep:
            shutil.rmtree(storage, ignore_errors=True)
    table = markdown_table(
        ["searcher", "trials", "wall (min)", "trials/hour", "trial-epochs run/max", "epochs saved by ASHA",
         "stopped by ASHA", "overhead/trial (s, median)", f"best {ss.metric} (model)"],
        rows,
    )
    body = (
        f"`python -m benchmarks.tune` ({today()}; {machine_note()}). The quick profile "
        f"(`{args.search_space}`: {ss.num_samples if args.num_samples is None else args.num_samples} trials, "
        f"{ss.max_epochs} epochs max, ASHA grace {ss.scheduler['grace_period']}, "
        f"{ss.max_concurrent} concurrent) on the demo's **synthetic** data, once with Optuna TPE and once "
        "with random search; everything else equal. Validation macro-F1; the test split is not used.\n\n"
        f"{table}\n\n"
        "Overhead per trial = the trial's wall time minus the time of its epochs: starting the Ray Train "
        "worker group, opening the decode cache, building the model. Each row is a single search: "
        "at this small budget a difference of a few points between the searchers is not a ranking.\n"
    )
    write_section("Search: Optuna TPE vs random, ASHA savings (issue 4)", body)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
