"""Storage URIs: a search, its recovery and its ensemble on S3 (a local moto server)."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

BUCKET = "covid-ray-test"


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields the environment that points pyarrow and boto3 at it."""
    pytest.importorskip("moto.server", reason="moto is a [dev] dependency")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    yield env
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A fresh bucket; this process (and what it starts) talks to the server; mirrors under tmp_path."""
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("COVID_RAY_MIRROR", str(tmp_path / "mirror"))
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def keys(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    # pyarrow also writes "folder/" marker objects; only the files count here
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/"))


# --------------------------------------------------------------------------- fast


def test_join_and_mirror_keep_the_scheme(monkeypatch, tmp_path):
    from covid_ray.uri import join, mirror_dir

    monkeypatch.setenv("COVID_RAY_MIRROR", str(tmp_path))
    assert join("s3://b/runs/", "exp", "/train") == "s3://b/runs/exp/train"
    assert join("/shared/runs", "exp") == "/shared/runs/exp"
    assert mirror_dir("s3://b/runs/../exp") == tmp_path / "s3" / "b" / "runs" / "exp"


def test_query_strings_and_unknown_schemes_are_refused_with_the_value():
    from covid_ray.uri import check_uri

    with pytest.raises(ValueError, match=r"s3://b/x\?endpoint_override=h:9000: query parameters .*AWS_ENDPOINT_URL"):
        check_uri("s3://b/x?endpoint_override=h:9000")
    with pytest.raises(ValueError, match=r"nosuch://b/x: not a storage URI covid-ray can use \(schemes: s3, gs"):
        check_uri("nosuch://b/x")
    assert check_uri("s3://b/x/") == "s3://b/x"


def test_manifest_fetch_and_upload_round_trip(s3, easy_split, tmp_path):
    from covid_ray.data.split import read_manifest
    from covid_ray.uri import download_file, fetch, upload_dir

    _, split = easy_split
    local = tmp_path / "exp"
    (local / "train" / "ckpt").mkdir(parents=True)
    shutil.copy(split, local / "split.csv")
    (local / "train" / "ckpt" / "model.pt").write_bytes(b"\x00weights")
    uri = f"s3://{BUCKET}/runs/exp"
    upload_dir(local, uri)
    assert keys(s3) == ["runs/exp/split.csv", "runs/exp/train/ckpt/model.pt"]

    pd.testing.assert_frame_equal(read_manifest(f"{uri}/split.csv"), read_manifest(split))
    with pytest.raises(FileNotFoundError, match=f"split manifest not found: {uri}/nope.csv"):
        read_manifest(f"{uri}/nope.csv")

    got = fetch(f"{uri}/train/ckpt")
    assert (got / "model.pt").read_bytes() == b"\x00weights"
    s3.delete_object(Bucket=BUCKET, Key="runs/exp/train/ckpt/model.pt")
    assert fetch(f"{uri}/train/ckpt") == got  # written once, downloaded once
    with pytest.raises(FileNotFoundError, match="not found: s3://"):
        fetch(f"{uri}/train/other")
    assert not list(got.parent.glob(".*"))  # no half-written download left behind

    assert download_file(f"{uri}/split.csv", tmp_path / "copy.csv")
    assert (tmp_path / "copy.csv").read_bytes() == split.read_bytes()
    assert not download_file(f"{uri}/missing.csv", tmp_path / "missing.csv")


def test_search_on_a_missing_bucket_fails_before_the_scan_naming_it(s3, easy_split, capsys):
    from covid_ray.tune import main

    root, _ = easy_split
    assert main(["--data", str(root), "--experiment", "e", "--storage-path", "s3://no-such-bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "error: --storage-path s3://no-such-bucket/runs: cannot use s3://no-such-bucket/runs/e from this machine" in err
    assert "Check that the bucket exists" in err


def test_uri_experiment_exists_and_resume_checks(s3, tmp_path):
    from covid_ray.storage import ExperimentStorage

    store = ExperimentStorage.create(f"s3://{BUCKET}/runs", "e")
    assert store.local == tmp_path / "mirror" / "s3" / BUCKET / "runs" / "e"
    assert store.train_storage == f"s3://{BUCKET}/runs/e/train"
    with pytest.raises(FileNotFoundError, match=f"nothing to resume: no experiment at s3://{BUCKET}/runs/e"):
        store.before_prepare(resume=True)
    store.before_prepare(resume=False)  # a new search: the bucket is writable
    store.local.mkdir(parents=True, exist_ok=True)
    (store.local / "experiment.json").write_text("{}")
    store.push()
    assert keys(s3) == ["runs/e/experiment.json"]
    with pytest.raises(FileExistsError, match=f"an experiment already exists at s3://{BUCKET}/runs/e; pass --resume"):
        store.before_prepare(resume=False)
    shutil.rmtree(store.local)
    store.before_prepare(resume=True)  # a new head node: the driver files come back
    assert (store.local / "experiment.json").read_text() == "{}"


def test_ensemble_build_names_a_uri_without_an_experiment(s3, capsys):
    from ensemble.build import main

    assert main(["--results-dir", f"s3://{BUCKET}/runs/none", "--top", "2"]) == 2
    assert f"no experiment at s3://{BUCKET}/runs/none (experiment.json is missing)" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_single_run_cli_writes_its_checkpoint_to_s3(s3, easy_split, tmp_path):
    from benchmarks.common import last_json
    from covid_ray.artifacts.checkpoint import load_checkpoint
    from covid_ray.uri import fetch

    root, split = easy_split
    cmd = [sys.executable, "-m", "covid_ray.train", "--data", str(root), "--split", str(split),
           "--model", "mobilenet_v3_small", "--image-size", "32", "--epochs", "2", "--batch-size", "16",
           "--num-workers", "1", "--name", "one",
           "--storage-path", f"s3://{BUCKET}/single", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = last_json(proc.stdout)
    assert out["run"] == f"s3://{BUCKET}/single/one" and out["epochs_run"] == 2
    assert out["checkpoint"].startswith(f"s3://{BUCKET}/single/one/")
    assert out["checkpoint"].removeprefix(f"s3://{BUCKET}/") + "/model.pt" in keys(s3, "single/one/")
    assert load_checkpoint(fetch(out["checkpoint"]))["classes"] == ["COVID", "Normal"]
    assert Path(out["history"]).is_file() and str(tmp_path / "mirror") in out["history"]


# mobilenet_v3_small: 18 MB per checkpoint through the local S3 server, not seed_cnn's 313 MB.
SPACE = {
    "metric": "val_macro_f1", "mode": "max", "num_samples": 1, "max_concurrent": 1,
    "resources": {"workers_per_trial": 2, "cpus_per_worker": 0.9, "gpus_per_worker": 0, "max_failures": 1},
    "scheduler": {"type": "fifo"}, "searcher": {"type": "optuna", "seed": 0},  # the study is on S3 too
    "fixed": {"image_size": 40, "epochs": 3, "model": "mobilenet_v3_small", "batch_size": 16},
    "space": {"lr": {"loguniform": [3.0e-4, 2.0e-3]}},
}


@pytest.mark.slow
def test_two_node_search_on_s3_recovers_resumes_and_ensembles(s3, easy_split, tmp_path):
    """The cluster path of cluster/README.md with S3 as the only shared storage.

    Two nodes with one CPU each, so every trial's two DDP workers span both; a worker
    is killed after epoch 2 and its trial resumes from the checkpoint on S3. Then the
    head's local mirror is deleted (a new head node), ``--resume`` finds the study on
    S3, and ``ensemble.build --results-dir s3://…`` builds from S3 and uploads back.
    """
    from benchmarks.cluster import LocalCluster  # after the fixture set the S3 environment

    root, _ = easy_split
    uri = f"s3://{BUCKET}/runs"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    marker = tmp_path / "killed.json"
    fault = {"COVID_RAY_FAIL_AT_EPOCH": "2", "COVID_RAY_FAIL_RANK": "1", "COVID_RAY_FAIL_MARKER": str(marker)}
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(2)
        cmd = [sys.executable, "-m", "covid_ray.tune", "--address", cluster.address, "--data", str(root),
               "--search-space", str(space), "--experiment", "s3exp", "--storage-path", uri,
               "--cache-dir", str(tmp_path / "cache"), "--no-recipe"]  # storage, not the recipe arm
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**cluster.env, **fault}, timeout=420)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "read and write checked from all 2 nodes" in proc.stdout  # the probe went through S3

        stored = keys(s3, "runs/s3exp/")
        for name in ("experiment.json", "split.csv", "optuna.db", "trials.csv", "history.csv", "leaderboard.md"):
            assert f"runs/s3exp/{name}" in stored, stored
        trials = pd.read_csv(s3.get_object(Bucket=BUCKET, Key="runs/s3exp/trials.csv")["Body"], keep_default_na=False)
        history = pd.read_csv(s3.get_object(Bucket=BUCKET, Key="runs/s3exp/history.csv")["Body"])
        assert list(trials.status) == ["TERMINATED"]
        for _, t in trials.iterrows():
            assert t.checkpoint.startswith(f"{uri}/s3exp/train/"), t.checkpoint
            assert t.checkpoint.removeprefix(f"s3://{BUCKET}/") + "/model.pt" in stored
            assert list(history[history.trial_id == t.trial_id].epoch) == [1, 2, 3]
        assert (history.world_size == 2).all()
        killed = json.loads(marker.read_text())
        assert killed["killed_at_epoch"] == 2
        resumed = [pd.read_csv(p) for p in (tmp_path / "mirror").rglob("tune/trial_*/progress.csv")]
        assert sum(p.resumed_from_epoch.max() > 0 for p in resumed) == 1  # restarted from S3, not from scratch

        # a new head node: no local mirror; --resume downloads the study and the Tune state
        shutil.rmtree(tmp_path / "mirror")
        proc = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=cluster.env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        again = pd.read_csv(s3.get_object(Bucket=BUCKET, Key="runs/s3exp/trials.csv")["Body"], keep_default_na=False)
        assert sorted(again.trial_id) == sorted(trials.trial_id) and list(again.status) == ["TERMINATED"]

    shutil.rmtree(tmp_path / "mirror")
    proc = subprocess.run(
        [sys.executable, "-m", "ensemble.build", "--results-dir", f"{uri}/s3exp", "--top", "2", "--export", "onnx",
         "--n-boot", "50", "--latency-repeats", "0", "--lung-cam-images", "0", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"uploaded ensemble/ to {uri}/s3exp/ensemble" in proc.stdout
    stored = keys(s3, "runs/s3exp/ensemble/")
    for name in ("metrics.json", "report.md", "ensemble_fp32.onnx", "preprocess.json"):
        assert f"runs/s3exp/ensemble/{name}" in stored, stored
    metrics = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/s3exp/ensemble/metrics.json")["Body"].read())
    assert metrics["members_used"] == 1 and metrics["test_images"] > 0
    # only the member's checkpoint was downloaded, nothing else of train/
    local = tmp_path / "mirror" / "s3" / BUCKET / "runs" / "s3exp"
    assert len(list(local.rglob("model.pt"))) == 1 and not (local / "tune").exists()
