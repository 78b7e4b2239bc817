"""One Ray Train run: the CLI, DDP on 2 CPU workers, gathered metrics, recovery."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.common import last_json
from covid_ray.artifacts.checkpoint import load_checkpoint, model_from_checkpoint
from covid_ray.data.datasets import load_splits, make_loader
from covid_ray.data.scan import find_dataset_root
from covid_ray.data.split import read_manifest
from covid_ray.data.transforms import EvalPreset, resize_for
from covid_ray.engine import predict_logits
from covid_ray.metrics import validation_summary

pytestmark = pytest.mark.slow

BASE = {"model": "mobilenet_v3_small", "image_size": 40, "batch_size": 16, "lr": 1e-3, "seed": 0}


def _flat(root, split, tmp_path, **kw):
    return {"data": str(root), "split": str(split), "cache_dir": str(tmp_path / "cache"), **BASE, **kw}


def test_cli_two_workers_beats_chance_and_metrics_are_the_whole_split(easy_split, tmp_path):
    root, split = easy_split
    cmd = [
        sys.executable, "-m", "covid_ray.train", "--data", str(root), "--split", str(split),
        "--model", "seed_cnn", "--image-size", "40", "--epochs", "3", "--batch-size", "16",
        "--lr", "1e-3", "--num-workers", "2", "--storage-path", str(tmp_path / "runs"),
        "--cache-dir", str(tmp_path / "cache"),
    ]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = last_json(proc.stdout)
    assert "[covid-ray] epoch 3/3" in proc.stdout + proc.stderr  # the loop's own progress line
    assert "Reporting training result" not in proc.stdout + proc.stderr  # Ray Train's per-report dump is silenced
    best = last["best_metrics"]
    assert best["val_accuracy"] >= 0.75 and best["val_macro_f1"] >= 0.7  # chance is 0.5
    assert best["world_size"] == 2
    assert "epoch 1/3" in proc.stdout + proc.stderr

    # Gathered metrics = single-process metrics of the same checkpoint on the whole val split.
    payload = load_checkpoint(last["checkpoint"])
    model, _ = model_from_checkpoint(payload)
    df = read_manifest(split)
    data = load_splits(find_dataset_root(root), df, payload["classes"], resize_for(40), cache_dir=tmp_path / "cache")
    loader = make_loader(data.datasets["val"], batch_size=7, shuffle=False)
    _, logits, labels = predict_logits(model, loader, EvalPreset(image_size=40), torch.device("cpu"))
    single = validation_summary(labels, logits, payload["classes"])
    assert len(labels) == (df.split == "val").sum() == payload["metrics"]["val_images"]
    for key in ("val_accuracy", "val_macro_f1", "val_balanced_accuracy"):
        assert single[key] == pytest.approx(payload["metrics"][key], abs=1e-9)
        assert best[key] == pytest.approx(payload["metrics"][key], abs=1e-9)


def test_cli_rejects_bad_arguments_before_starting_ray(easy_split, tmp_path):
    root, split = easy_split
    base = [sys.executable, "-m", "covid_ray.train", "--data", str(root), "--split", str(split)]
    proc = subprocess.run(base + ["--model", "vgg99"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown model 'vgg99'" in proc.stderr and "resnet18" in proc.stderr
    proc = subprocess.run(
        base[:-2] + ["--split", str(tmp_path / "missing.csv"), "--model", "resnet18"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "missing.csv" in proc.stderr


def _modules_probe(where):
    """A controller callback writing, at each report, whether torch is loaded in the controller's process."""
    from ray.train.v2.api.callback import UserCallback

    class Probe(UserCallback):  # a local class: Ray ships it by value (the controller cannot import tests)
        def after_report(self, run_context, metrics, checkpoint):
            import sys

            with open(where, "a") as f:
                f.write(f"{'torch' in sys.modules}\n")

    return Probe()


def test_killed_worker_resumes_from_its_checkpoint(easy_split, tmp_path, ray_session):
    from covid_ray.artifacts.experiment import read_history
    from covid_ray.launch import best_of, build_trainer, history_callback

    root, split = easy_split
    marker = tmp_path / "killed.json"
    trainer = build_trainer(
        _flat(root, split, tmp_path, epochs=4, early_stop_patience=0),
        num_workers=2, storage_path=tmp_path / "runs", name="recover", max_failures=1,
        callbacks=[history_callback(tmp_path / "history.jsonl"), _modules_probe(tmp_path / "controller.txt")],
        worker_env={"COVID_RAY_FAIL_AT_EPOCH": "2", "COVID_RAY_FAIL_RANK": "1", "COVID_RAY_FAIL_MARKER": str(marker)},
    )
    result = trainer.fit()
    assert result.error is None
    killed = json.loads(marker.read_text())
    assert killed["killed_at_epoch"] == 2
    history = read_history(tmp_path / "history.jsonl")
    resumed = killed["last_checkpoint_epoch"]
    assert 1 <= resumed <= 2
    # The restarted worker group continues right after the checkpointed epoch and finishes.
    # (The killed group's last report may or may not reach the controller before the kill.)
    after = [h for h in history if h["resumed_from_epoch"] > 0]
    assert after and all(h["resumed_from_epoch"] == resumed for h in after)
    assert [h["epoch"] for h in after] == list(range(resumed + 1, 5))
    assert all(h["resumed_from_epoch"] == 0 for h in history[: len(history) - len(after)])
    metrics, path = best_of(result, "val_macro_f1")
    assert path and load_checkpoint(path)["epoch"] == metrics["epoch"]
    # Checkpoints are written beside the run and renamed into place: complete, no staging left.
    run_dir = tmp_path / "runs" / "recover"
    assert not list(run_dir.glob(".checkpoint-*"))
    checkpoints = [folder for folder in run_dir.glob("checkpoint_*") if folder.is_dir()]
    assert checkpoints
    for folder in checkpoints:
        assert {p.name for p in folder.iterdir()} == {"model.pt", "train_state.pt", "metadata.json"}
    # The processes a run starts: no Ray Data manager (no Ray Datasets here) and no preemption
    # watcher (the embedded Ray is one machine), each a process per trial otherwise.
    from ray.util.state import list_actors

    started = {a.class_name for a in list_actors(limit=1000)}
    assert "TrainController" in started and "RayTrainWorker" in started
    assert not started & {"DatasetManager", "PreemptionWatcher"}, started
    # The controller, which only launches and relays, never loaded torch (covid_ray.launch).
    probes = (tmp_path / "controller.txt").read_text().split()
    assert probes and set(probes) == {"False"}, probes


def test_without_failures_left_the_error_is_reported(easy_split, tmp_path, ray_session):
    from covid_ray.launch import build_trainer

    root, split = easy_split
    trainer = build_trainer(
        _flat(root, split, tmp_path, epochs=3),
        num_workers=1, storage_path=tmp_path / "runs", name="nofail", max_failures=0,
        worker_env={"COVID_RAY_FAIL_AT_EPOCH": "1", "COVID_RAY_FAIL_RANK": "0",
                    "COVID_RAY_FAIL_MARKER": str(tmp_path / "k.json")},
    )
    with pytest.raises(Exception, match="(?i)died|exit|fail"):
        trainer.fit()
