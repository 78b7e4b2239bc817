"""The search as a person and their dashboards see it: a short console, Ray's output in a log,
MLflow runs, TensorBoard scalars, and an Optuna study whose states match the tables."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

SPACE = {
    "metric": "val_macro_f1", "mode": "max", "num_samples": 4, "max_concurrent": 1,
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 0.9, "gpus_per_worker": 0, "max_failures": 0},
    "scheduler": {"type": "asha", "max_t": 3, "grace_period": 1, "reduction_factor": 2},
    "searcher": {"type": "optuna", "seed": 0, "n_startup_trials": 2},
    "fixed": {"image_size": 40, "epochs": 3, "model": "mobilenet_v3_small", "batch_size": 16},
    "space": {"lr": {"loguniform": [1e-5, 2e-3]}, "class_weights": {"choice": ["none", "balanced"]}},
}


def tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    """Scalar values by tag in the TFRecord event files under ``folder`` (no TensorBoard needed)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


@pytest.fixture(scope="module")
def console_search(easy_split, tmp_path_factory):
    """One tiny search through the CLI (not a terminal), with MLflow and one failing trial.

    Without the recipe trial, so that the trial whose worker dies (the first to reach epoch
    2, one trial at a time) is a sampled one and the study records a FAIL; the recipe's
    console line is covered in test_console.py.
    """
    root, _ = easy_split
    tmp = tmp_path_factory.mktemp("console")
    space = tmp / "tiny.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    env = {**os.environ, "COVID_RAY_FAIL_AT_EPOCH": "2", "COVID_RAY_FAIL_RANK": "0",
           "COVID_RAY_FAIL_MARKER": str(tmp / "one-failure.json"), "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "covid_ray.tune", "--data", str(root), "--search-space", str(space),
         "--experiment", "console", "--storage-path", str(tmp / "results"), "--cache-dir", str(tmp / "cache"),
         "--mlflow", "--no-recipe"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, tmp / "results" / "console"


def test_the_console_is_short_plain_and_ends_with_the_leaderboard(console_search):
    proc, exp = console_search
    out = proc.stdout
    assert "\r" not in out and "\x1b[" not in out  # not a terminal: plain lines
    assert not any(ch in out for ch in "╭╰│─")  # none of Tune's boxed tables
    lines = out.splitlines()
    assert len(lines) < 90, out
    assert any(line.startswith("Ray dashboard: http://127.0.0.1:") for line in lines)
    assert sum(" started" in line for line in lines) == 4
    assert any(" epoch 1/3 val_macro_f1 " in line for line in lines)
    assert any(" FAILED" in line for line in lines)  # the trial whose worker died
    final = [line for line in lines if line.startswith("[4/4 done")]
    assert final and "1 failed" in final[-1] and "best val_macro_f1" in final[-1]
    assert "# Leaderboard: console" in out and f"tables: {exp}/trials.csv" in out
    # Ray's own output is not lost: it is in the experiment's log.
    log = (exp / "search.log").read_text()
    assert "PooledWorker" in log and "[covid-ray] epoch 1/3" in log
    assert "RunCancelled" not in log  # a trial ASHA stopped is not logged as a failed training function


def test_mlflow_has_one_run_per_trial_with_its_epochs_and_best_checkpoint(console_search):
    from mlflow.tracking import MlflowClient

    _, exp = console_search
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((exp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("console")
    runs = client.search_runs([experiment.experiment_id])
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False)
    history = pd.read_csv(exp / "history.csv")
    assert len(runs) == len(trials) == 4
    by_trial = {r.data.params["lr"]: r for r in runs}
    for t in trials.to_dict("records"):
        run = by_trial[str(t["config/lr"])]
        assert run.data.tags["arm"] == t["arm"]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1"))
        epochs = sorted(history[history.trial_id == t["trial_id"]].epoch.tolist())
        if t["status"] == "ERROR" or t["stopped_early"] in (True, "True"):
            # Tune saw the epochs up to the failure or the stop; the trial's own history can
            # hold one more (trained before the stop reached the worker).
            assert steps and set(steps) <= set(epochs) and len(epochs) - len(steps) <= 1
        else:
            assert steps == epochs
        names = {a.path for a in client.list_artifacts(run.info.run_id, "best_checkpoint")}
        if t["checkpoint"]:
            assert names == {"best_checkpoint/model.pt", "best_checkpoint/metadata.json"}
        assert run.info.status == ("FAILED" if t["status"] == "ERROR" else "FINISHED")


def test_tensorboard_holds_every_trials_scalars(console_search):
    _, exp = console_search
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False)
    for trial_id in trials.trial_id:
        (folder,) = (exp / "tune").glob(f"*{trial_id}*")
        scalars = tensorboard_scalars(folder)
        assert len(scalars["ray/tune/val_macro_f1"]) >= 1, sorted(scalars)
        assert "ray/tune/best_val_macro_f1" in scalars


def test_the_optuna_study_records_pruned_complete_and_failed_trials_as_the_tables_say(console_search):
    _, exp = console_search
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False)
    study = optuna.load_study(study_name="console", storage=f"sqlite:///{exp / 'optuna.db'}")
    by_lr = {round(t.params["lr"], 12): t for t in study.trials}
    assert len(study.trials) == 4
    assert {t.state for t in study.trials} >= {optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE}
    for t in trials.to_dict("records"):
        st = by_lr[round(float(t["config/lr"]), 12)]
        if t["status"] == "ERROR":
            assert st.state == optuna.trial.TrialState.FAIL
        elif t["stopped_early"] in (True, "True"):
            assert st.state == optuna.trial.TrialState.PRUNED
            # pruned at the epoch ASHA stopped it (its history may hold one more epoch, see above)
            assert t["epochs"] - 1 <= max(st.intermediate_values) <= t["epochs"]
        else:
            assert st.state == optuna.trial.TrialState.COMPLETE
            assert st.value == pytest.approx(float(t["best_val_macro_f1"]))
    assert json.loads((exp / "experiment.json").read_text())["recipe"] is None
