"""The search end to end on tiny data: tables, consistency, failures, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from covid_ray.tune import SearchOptions, run_search

pytestmark = pytest.mark.slow

# mobilenet_v3_small, not the reference seed_cnn: each improving epoch writes an 18 MB
# checkpoint instead of 313 MB (seed_cnn's 25.7M-weight classifier with its Adam state), and
# these tests are about the search, not the architecture (test_train's CLI test trains seed_cnn).
TINY = {
    "metric": "val_macro_f1",
    "mode": "max",
    "num_samples": 3,
    "max_concurrent": 2,
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.9, "gpus_per_worker": 0, "max_failures": 0},
    "scheduler": {"type": "asha", "max_t": 3, "grace_period": 1, "reduction_factor": 2},
    "searcher": {"type": "optuna", "seed": 0, "n_startup_trials": 2},
    "fixed": {"image_size": 40, "epochs": 3, "model": "mobilenet_v3_small", "batch_size": 16},
    "space": {"lr": {"loguniform": [3e-4, 2e-3]}, "class_weights": {"choice": ["none", "balanced"]}},
}


def space_file(tmp_path, **patch) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **patch}))
    return path


def check_tables(exp: Path, n_trials: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False, na_values=[""])
    history = pd.read_csv(exp / "history.csv")
    assert len(trials) == n_trials
    for col in ("trial_id", "status", "config/lr", "config/class_weights", "best_val_macro_f1", "best_epoch",
                "epochs", "stopped_early", "wall_time_s", "checkpoint", "error"):
        assert col in trials.columns, col
    assert {"trial_id", "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr", "node_id",
            "worker_node_ids"} <= set(history.columns)
    assert (history.worker_node_ids.str.len() > 0).all()
    for _, t in trials[trials.status == "TERMINATED"].iterrows():
        h = history[history.trial_id == t.trial_id]
        assert t.best_val_macro_f1 == pytest.approx(h.val_macro_f1.max())
        assert t.epochs == h.epoch.max() and h.epoch.is_unique
        assert Path(t.checkpoint, "model.pt").is_file()
    for _, t in trials.iterrows():
        # Every epoch Tune received is in the trial's history too, the one Tune stopped it at
        # included (the history is written before the report that Tune's stop ends). A
        # killed driver's Tune results may lack epochs that the history kept: hence >=.
        tune_epochs = [json.loads(line).get("epoch", 0) for f in (exp / "tune").glob(f"*{t.trial_id}*/result.json")
                       for line in f.read_text().splitlines() if line.strip()]
        if tune_epochs:
            assert t.epochs >= max(tune_epochs), (t.trial_id, t.epochs, max(tune_epochs))
    for name in ("leaderboard.md", "split.csv", "data_report.json", "search_space.yaml", "metric_per_epoch.png", "optuna.db"):
        assert (exp / name).is_file(), name
    board = (exp / "leaderboard.md").read_text()
    assert f"Totals: {n_trials} trials" in board
    return trials, history


def terminated_trials(exp: Path) -> list[str]:
    """Trial ids that Tune's saved experiment state marks TERMINATED."""
    states = sorted((exp / "tune").glob("experiment_state-*.json"))
    try:
        data = json.loads(states[-1].read_text()) if states else {"trial_data": []}
    except (json.JSONDecodeError, OSError):
        return []
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


def _histories(exp: Path) -> dict[str, list[dict]]:
    """Each trial's history lines so far (``train/<trial>/history.jsonl``), by trial folder."""
    out = {}
    for path in (exp / "train").glob("*/history.jsonl"):
        try:
            out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):  # being written
            continue
    return out


def test_driver_killed_mid_search_resumes_without_rerunning_or_losing_a_running_trials_checkpoint(easy_split, tmp_path):
    """The driver dies once one trial has finished and while another runs on after its best (only)
    checkpoint: ``--resume`` runs the finished trial no more, resumes the running one from that
    checkpoint and keeps its early history, and runs the rest of the search."""
    root, _ = easy_split
    # Two trials at once, from the warm start: "done" (1 epoch) finishes first; "flat" (lr 1e-9
    # and frozen BatchNorm statistics, so epoch 1 is its best epoch and nothing improves after
    # it) is still running when the driver is killed. A second short one follows "done": running,
    # finished or not yet suggested at the kill, the resumed search must end with all three.
    done, flat = {"lr": 1e-3, "epochs": 1}, {"lr": 1e-9, "epochs": 30}
    space = space_file(tmp_path, num_samples=3, scheduler={"type": "fifo"},
                       resources={**TINY["resources"], "max_failures": 1},
                       fixed={**{k: v for k, v in TINY["fixed"].items() if k != "epochs"},
                              "bn_momentum": 0.0, "early_stop_patience": 0},
                       space={"lr": {"choice": [1e-9, 1e-3]}, "epochs": {"choice": [1, 30]},
                              "class_weights": {"choice": ["none"]}},
                       searcher={**TINY["searcher"], "start_with": [done, flat, done]})
    cmd = [sys.executable, "-m", "covid_ray.tune", "--data", str(root), "--search-space", str(space), "--no-recipe",
           "--experiment", "resumable", "--storage-path", str(tmp_path / "results"),
           "--cache-dir", str(tmp_path / "cache")]
    exp = tmp_path / "results" / "resumable"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # Kill the driver (and the Ray it started) once Tune has recorded "done" as finished and
    # "flat" has its checkpoint and a later epoch.
    deadline, killed_at, finished = time.time() + 400, None, []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        flat_runs = [(folder, h) for folder, h in _histories(exp).items() if h and h[0]["lr"] < 1e-6]
        if not flat_runs:
            continue
        folder, lines = flat_runs[0]
        if len(lines) < 2 or not list((exp / "train" / folder).glob("checkpoint_*/model.pt")):
            continue
        finished = terminated_trials(exp)
        if finished:
            killed_at = len(lines)
            flat_checkpoints = [p.parent.name for p in (exp / "train" / folder).glob("checkpoint_*/model.pt")]
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert killed_at is not None, (tmp_path / "first.log").read_text()[-3000:]
    assert killed_at < 30 and folder not in finished  # killed while "flat" was still running
    assert len(flat_checkpoints) == 1  # epoch 1's, the only improvement
    done_ckpts = {t: sorted(p.name for p in (exp / "train" / t).glob("checkpoint_*")) for t in finished}
    assert all(done_ckpts.values()), done_ckpts

    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resuming the search" in proc.stdout
    trials, history = check_tables(exp, 3)
    assert set(trials.status) == {"TERMINATED"} and sorted(trials["config/epochs"]) == [1, 1, 30]
    # No scheduler stopped any (FIFO): the short ones trained their own budget of one epoch.
    first = (tmp_path / "first.log").read_text()
    assert not trials.stopped_early.any() and "stopped by ASHA after" not in first + proc.stdout
    for done_id, ckpts in done_ckpts.items():
        assert f"trial {done_id} finished 1 epochs" in first
        # not run again: not started by the resumed search, same checkpoints, one row per epoch
        assert f"trial {done_id} started" not in proc.stdout
        assert sorted(p.name for p in (exp / "train" / done_id).glob("checkpoint_*")) == ckpts
        assert list(history[history.trial_id == done_id].epoch) == [1]
    # the running one resumed from its checkpoint (epoch 1), which stays its best, and kept its
    # early epochs, each once
    (row,) = trials[trials["config/lr"] < 1e-6].to_dict("records")
    assert row["best_epoch"] == 1 and Path(row["checkpoint"]).name == flat_checkpoints[0]
    assert json.loads(Path(row["checkpoint"], "metadata.json").read_text())["epoch"] == 1
    progress = pd.read_csv(exp / "tune" / f"trial_{row['trial_id']}" / "progress.csv")
    assert progress.resumed_from_epoch.max() == 1, progress[["epoch", "resumed_from_epoch"]]
    h = history[history.trial_id == row["trial_id"]]
    assert list(h.epoch) == list(range(1, 31))
    assert h.loc[h.epoch == 1, "checkpoint"].item() == row["checkpoint"]


def test_search_writes_consistent_tables_and_records_a_failing_trial(easy_split, tmp_path, ray_session):
    root, _ = easy_split
    marker = tmp_path / "one-failure.json"
    exp = run_search(SearchOptions(
        data=str(root), search_space=str(space_file(tmp_path)), experiment="tiny",
        storage_path=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"),
        # The first worker to reach epoch 2 dies; with max_failures 0 its trial errors.
        worker_env={"COVID_RAY_FAIL_AT_EPOCH": "2", "COVID_RAY_FAIL_RANK": "0", "COVID_RAY_FAIL_MARKER": str(marker)},
    ))
    trials, history = check_tables(exp, 4)  # 3 sampled trials and the hand recipe
    assert marker.exists()
    assert list(trials.status).count("ERROR") == 1 and list(trials.status).count("TERMINATED") == 3
    (recipe,) = trials[trials.arm == "recipe"].to_dict("records")
    assert recipe["config/lr"] == 1e-3 and recipe["config/class_weights"] == "none"  # recipe.yaml's values
    board = (exp / "leaderboard.md").read_text()
    assert f"| {recipe['trial_id']} | **recipe** |" in board
    assert f"Reference: the hand recipe (`search_spaces/recipe.yaml`) ran as trial `{recipe['trial_id']}`" in board
    failed = trials[trials.status == "ERROR"].iloc[0]
    assert failed.error  # the reason is recorded
    assert "1 errored" in board
    meta = json.loads((exp / "experiment.json").read_text())
    assert meta["classes"] == ["COVID", "Normal"] and meta["synthetic"] is False
    # Ray Train's controller ran inside each trial driver, reports reached Tune without a
    # queue actor, one cleaner served the search, and every trial trained on a worker of the
    # search's pool: no per-trial process of those kinds was started.
    from ray.util.state import list_actors

    started = {}
    for cls in ("RayTrainWorker", "PooledWorker", "WorkerPool", "TrainController", "_QueueActor",
                "PlacementGroupCleaner", "SharedPlacementGroupCleaner"):
        started[cls] = list_actors(filters=[("class_name", "=", cls)], limit=1000, raise_on_missing_output=False)
    count = {cls: len(actors) for cls, actors in started.items()}
    assert count["SharedPlacementGroupCleaner"] == count["WorkerPool"] == 1, count
    assert count["RayTrainWorker"] == count["TrainController"] == count["_QueueActor"] == 0, count
    assert count["PlacementGroupCleaner"] == 0, count
    assert set(history.worker_pid) <= {a.pid for a in started["PooledWorker"]}, (history.worker_pid, count)
    # ... and the search ended with every trial's placement group freed.
    import ray

    assert {g["state"] for g in ray.util.placement_group_table().values()} <= {"REMOVED"}

    with pytest.raises(FileExistsError, match="pass --resume"):
        run_search(SearchOptions(data=str(root), search_space=str(space_file(tmp_path)), experiment="tiny",
                                 storage_path=str(tmp_path / "results")))


def test_impossible_resources_fail_fast(easy_split, tmp_path, ray_session):
    root, _ = easy_split
    opts = dict(data=str(root), search_space=str(space_file(tmp_path)), storage_path=str(tmp_path / "r"))
    with pytest.raises(ValueError, match=r"asked for 2 GPUs per trial .* but the cluster has no GPUs"):
        run_search(SearchOptions(**opts, experiment="gpu", gpus_per_worker=1, workers_per_trial=2))
    with pytest.raises(ValueError, match=r"asked for 8.05 CPUs per trial \(2 workers x 4.*the cluster has 2"):
        run_search(SearchOptions(**opts, experiment="cpu", cpus_per_worker=4, workers_per_trial=2))
