"""The search on a Ray cluster simulated on this machine: nodes, storage, failures, security.

Each node is its own ``ray start`` process (``benchmarks.cluster.LocalCluster``) with
token authentication on, and the search joins the cluster from a separate process
with ``--address``, as ``ray job submit`` would run it on a real head node.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from benchmarks.cluster import LocalCluster
from benchmarks.common import last_json

pytestmark = pytest.mark.slow

# 2 DDP workers of 0.9 CPU per trial. With 1 CPU per node a node fits one worker
# (plus a 0.05-CPU trial driver), so every trial spans both nodes.
SPACE = {
    "metric": "val_macro_f1", "mode": "max", "num_samples": 2, "max_concurrent": 1,
    "resources": {"workers_per_trial": 2, "cpus_per_worker": 0.9, "gpus_per_worker": 0, "max_failures": 1},
    "scheduler": {"type": "fifo"}, "searcher": {"type": "random", "seed": 0},
    "fixed": {"image_size": 40, "epochs": 2, "model": "mobilenet_v3_small", "batch_size": 16},
    "space": {"lr": {"loguniform": [3.0e-4, 2.0e-3]}},
}


def write_space(tmp_path: Path, **patch) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**SPACE, **patch}))
    return path


def search_cmd(cluster: LocalCluster, data: Path, space: Path, storage: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "covid_ray.tune", "--address", cluster.address, "--data", str(data),
            "--search-space", str(space), "--experiment", name, "--storage-path", str(storage),
            "--cache-dir", str(storage / "cache"), "--no-recipe"]  # the cluster's behaviour, not the recipe arm


def run(cmd: list[str], cluster: LocalCluster, env: dict | None = None, timeout: float = 420):
    return subprocess.run(cmd, capture_output=True, text=True, env={**cluster.env, **(env or {})}, timeout=timeout)


def tune_progress(exp: Path, trial_id: str) -> pd.DataFrame:
    """Every report Tune received for a trial, restarts included (its progress.csv)."""
    return pd.read_csv(exp / "tune" / f"trial_{trial_id}" / "progress.csv")


def _new_checkpoint_on(train_dir: Path, node_id: str, last_epoch: int, max_age_s: float = 1.0) -> bool:
    """Whether a trial whose workers run on ``node_id`` wrote a checkpoint in the last
    ``max_age_s`` seconds, at epoch <= ``last_epoch``.

    Read from the checkpoint's own ``metadata.json`` (its metrics name the workers'
    nodes), which the rank-0 worker writes straight to the storage path; Tune's
    ``progress.csv`` reaches the storage path only when Tune syncs its state.
    """
    for meta in train_dir.glob("*/checkpoint_*/metadata.json"):
        try:
            age = time.time() - meta.stat().st_mtime
            info = json.loads(meta.read_text())
        except (OSError, ValueError):  # being written
            continue
        if age <= max_age_s and info["epoch"] <= last_epoch and node_id in str(info["metrics"].get("worker_node_ids")):
            return True
    return False


@pytest.fixture(scope="module")
def two_nodes():
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(2)
        yield cluster


def test_search_spans_two_nodes_and_a_killed_worker_resumes_from_its_checkpoint(easy_split, tmp_path, two_nodes):
    root, _ = easy_split
    marker = tmp_path / "killed.json"
    # Rank 1 (on the other node than rank 0) dies after epoch 2 of the first trial. Not
    # after epoch 1: the Train controller collects reports by polling, so a worker that
    # dies right after reporting can take that report (and its checkpoint) with it, and
    # then no checkpoint would have been registered yet to restart from.
    fault = {"COVID_RAY_FAIL_AT_EPOCH": "2", "COVID_RAY_FAIL_RANK": "1", "COVID_RAY_FAIL_MARKER": str(marker)}
    # One trial: its first worker group and the one restarted from the checkpoint span both nodes.
    space = write_space(tmp_path, num_samples=1, fixed={**SPACE["fixed"], "epochs": 3})
    proc = run(search_cmd(two_nodes, root, space, tmp_path / "results", "multi"), two_nodes, fault)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "read and write checked from all 2 nodes" in proc.stdout  # the storage check ran on both
    exp = tmp_path / "results" / "multi"
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False)
    history = pd.read_csv(exp / "history.csv")
    assert list(trials.status) == ["TERMINATED"]
    for _, t in trials.iterrows():
        assert list(history[history.trial_id == t.trial_id].epoch) == [1, 2, 3]  # nothing lost, nothing twice
        assert Path(t.checkpoint, "model.pt").is_file()
    assert (history.world_size == 2).all()

    # the trial's two workers ran on two different nodes, before the kill and after (each epoch
    # gathers every worker's node), and history's rank 0 on one of them
    alive = set(two_nodes.alive_nodes())
    assert all(len(set(ids.split(","))) == 2 for ids in history.worker_node_ids), history.worker_node_ids
    assert set(history.node_id) <= alive

    # the killed worker: its trial restarted from its last checkpoint, not from scratch
    killed = json.loads(marker.read_text())
    assert killed["killed_at_epoch"] == 2
    resumed = {tid: tune_progress(exp, tid) for tid in trials.trial_id}
    resumed = {tid: p for tid, p in resumed.items() if p.resumed_from_epoch.max() > 0}
    assert len(resumed) == 1, resumed
    (progress,) = resumed.values()
    assert 1 <= progress.resumed_from_epoch.iloc[-1] <= killed["last_checkpoint_epoch"]
    assert progress.epoch.iloc[-1] == 3 and progress.epoch.min() == 1


def test_storage_a_node_cannot_see_fails_fast(easy_split, tmp_path, two_nodes):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (root) to give one node a private /tmp view")
    root, _ = easy_split
    storage = tmp_path / "results"
    storage.mkdir()
    before = set(two_nodes.alive_nodes())
    # a third node where the storage path is an empty tmpfs: the same path, another disk
    node = two_nodes.add_node(num_cpus=0, hide=storage)
    try:
        (stranger,) = set(two_nodes.wait_for_nodes(3)) - before
        t0 = time.time()
        proc = run(search_cmd(two_nodes, root, write_space(tmp_path), storage, "local-only"), two_nodes)
        elapsed = time.time() - t0
    finally:
        two_nodes.kill_node(node)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr
    assert f"the experiment folder {storage / 'local-only'} (under --storage-path) is not readable" in err
    assert f"node {stranger}" in err and "does not see the probe file" in err
    assert "s3://" in err and "NFS" in err
    assert sum(f"node {n}" in err for n in before) == 0  # only the node that cannot see it is named
    assert not (storage / "local-only" / "tune").exists()  # failed before any trial started
    assert elapsed < 90


def test_killed_node_trials_are_retried_on_the_remaining_node(easy_split, tmp_path):
    root, _ = easy_split
    # 2 CPUs per node: each node holds exactly one trial's 2 workers, so with 2 trials at
    # once one of them runs on the node that is killed; the head alone fits one trial.
    # 10 epochs: room for a kill after the first checkpoint with epochs still to run (a
    # mobilenet_v3_small epoch at 40 px takes about a second here).
    space = write_space(tmp_path, max_concurrent=2, fixed={**SPACE["fixed"], "epochs": 10, "early_stop_patience": 0})
    exp = tmp_path / "results" / "nodeloss"
    with LocalCluster(fast_failure_detection=True) as cluster:
        cluster.start_head(num_cpus=2)
        (head_id,) = cluster.wait_for_nodes(1)
        doomed = cluster.add_node(num_cpus=2)
        (doomed_id,) = set(cluster.wait_for_nodes(2)) - {head_id}
        log = open(tmp_path / "search.log", "w")
        proc = subprocess.Popen(search_cmd(cluster, root, space, tmp_path / "results", "nodeloss"),
                                stdout=log, stderr=subprocess.STDOUT, env=cluster.env)
        # Kill the second node while a trial's workers run there with at least 7 of 10 epochs
        # to go: just after that trial's first checkpoint, once the Train controller has had
        # time to register it (it polls the workers every 0.5 s). Then something must be
        # recovered, and the search cannot end before Ray has noticed the loss.
        deadline = time.time() + 300
        while not _new_checkpoint_on(exp / "train", doomed_id, last_epoch=3):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "search.log").read_text()[-4000:]
            time.sleep(0.2)
        time.sleep(2.0)
        killed_at = time.time()
        cluster.kill_node(doomed)
        proc.wait(timeout=420)
        tail = (tmp_path / "search.log").read_text()[-4000:]
        assert proc.returncode == 0, tail
        survivors = cluster.wait_for_nodes(1, timeout=30)  # the GCS declares it dead within ~3 s
    assert survivors == [head_id]
    trials = pd.read_csv(exp / "trials.csv", keep_default_na=False)
    history = pd.read_csv(exp / "history.csv")
    assert list(trials.status) == ["TERMINATED"] * 2, tail
    for _, t in trials.iterrows():
        h = history[history.trial_id == t.trial_id]
        assert list(h.epoch) == list(range(1, 11)), h
        assert Path(t.checkpoint, "model.pt").is_file()
        # nothing reported after the kill can come from the dead node
        progress = tune_progress(exp, t.trial_id)
        assert set(progress[progress.timestamp > killed_at].node_id) <= {survivors[0]}, progress
    # The trial that had workers on the killed node resumed from its checkpoint (epoch >= 1)
    # on the head. (The other one too, if its trial driver happened to run there.)
    resumed = [tid for tid in trials.trial_id if tune_progress(exp, tid).resumed_from_epoch.max() >= 1]
    assert resumed, history


def test_embedded_ray_keeps_dashboard_on_loopback_and_token_auth_on(tmp_path):
    """``init_ray()`` with no address, in a clean process: Ray's defaults must hold."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    rt = Path(tempfile.mkdtemp(prefix="crs-", dir="/tmp"))  # short: Ray's socket paths (107 bytes)
    env.update(HOME=str(home), RAY_TMPDIR=str(rt))
    code = r"""
import json, socket, urllib.error, urllib.request
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from covid_ray.ray_setup import init_ray

init_ray(num_cpus=1)
url = ray._private.worker.get_dashboard_url()
host, port = url.rsplit(":", 1)

def status(headers):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/jobs/", headers=headers)
    for _ in range(60):
        try:
            return urllib.request.urlopen(req, timeout=5).status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            import time; time.sleep(0.5)

token = open(__import__("pathlib").Path.home() / ".ray" / "auth_token").read().strip()
node_ip = ray.util.get_node_ip_address()
try:
    socket.create_connection((node_ip, int(port)), timeout=3).close()
    outside = "open"
except OSError:
    outside = "refused"
print(json.dumps({
    "dashboard": url, "token_mode": get_authentication_mode() == AuthenticationMode.TOKEN,
    "no_token": status({}), "wrong_token": status({"Authorization": "Bearer nope"}),
    "token": status({"Authorization": f"Bearer {token}"}), "node_ip": node_ip, "outside": outside,
}))
ray.shutdown()
"""
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    finally:
        shutil.rmtree(rt, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = last_json(proc.stdout)
    assert got["dashboard"].startswith("127.0.0.1:")
    assert got["token_mode"] is True
    assert (home / ".ray" / "auth_token").is_file()  # generated for this new local cluster
    assert (got["no_token"], got["wrong_token"], got["token"]) == (401, 403, 200)
    if not got["node_ip"].startswith("127."):
        assert got["outside"] == "refused"  # the dashboard/jobs port is not on the machine's address


def test_pull_rewrites_checkpoint_paths_into_the_copy(tmp_path):
    """A URI experiment downloaded for ensemble.build: its tables point into the copy."""
    from covid_ray.storage import pull_experiment

    remote = tmp_path / "bucket" / "exp"
    for trial, epoch in (("t1", 2), ("t2", 1)):
        ckpt = remote / "train" / trial / f"checkpoint_{epoch}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.pt").write_text("weights")
    (remote / "experiment.json").write_text("{}")
    uri = f"file://{remote}"
    # As written at the end of a URI search: trial checkpoints filled in as URIs, history
    # with the pyarrow paths Ray reported, and one trial left empty (not on local disk).
    pd.DataFrame({"trial_id": ["t1", "t2"], "best_epoch": [2.0, 1.0],
                  "checkpoint": [f"{uri}/train/t1/checkpoint_2", ""]}).to_csv(remote / "trials.csv", index=False)
    pd.DataFrame({"trial_id": ["t1", "t1", "t2", "t2"], "epoch": [1, 2, 1, 2],
                  "checkpoint": [f"{remote}/train/t1/checkpoint_1", f"{remote}/train/t1/checkpoint_2",
                                 f"{remote}/train/t2/checkpoint_1", ""]}).to_csv(remote / "history.csv", index=False)
    dest = pull_experiment(uri, tmp_path / "copy")
    trials = pd.read_csv(dest / "trials.csv", keep_default_na=False)
    history = pd.read_csv(dest / "history.csv", keep_default_na=False)
    assert list(trials.checkpoint) == [str(dest / "train/t1/checkpoint_2"), str(dest / "train/t2/checkpoint_1")]
    assert all(Path(c, "model.pt").is_file() for c in trials.checkpoint)
    assert list(history.checkpoint)[:3] == [str(dest / f"train/{t}") for t in
                                            ("t1/checkpoint_1", "t1/checkpoint_2", "t2/checkpoint_1")]
    with pytest.raises(FileNotFoundError, match="no experiment at"):
        pull_experiment(f"file://{tmp_path / 'nothing'}", tmp_path / "copy2")

