"""The search's warm workers (covid_ray.worker_pool): reused only when a run ended cleanly, with
the same results as a new process, and replaced when the run's driver dies mid-run."""
from __future__ import annotations

import json
import logging
import time

import pytest

from covid_ray.worker_pool import (
    CANCELLED_NOTE,
    RunCancelled,
    poolable,
    pooled_runtime_env,
    quiet_cancelled_runs,
    worker_key,
)


def test_only_cpu_workers_are_pooled_with_the_threads_ray_would_give_them():
    assert poolable({"CPU": 0.9}) and poolable({"CPU": 2.0, "GPU": 0.0})
    assert not poolable({"CPU": 1.0, "GPU": 0.5})  # a GPU is Ray's per-actor assignment
    assert pooled_runtime_env({}, {"CPU": 0.9})["env_vars"] == {"OMP_NUM_THREADS": "1"}
    assert pooled_runtime_env({"env_vars": {"A": "1"}}, {"CPU": 3.5})["env_vars"] == {"A": "1", "OMP_NUM_THREADS": "3"}
    assert pooled_runtime_env({"env_vars": {"OMP_NUM_THREADS": "2"}}, {"CPU": 1})["env_vars"]["OMP_NUM_THREADS"] == "2"
    # The key is the node and the whole environment, whatever the order it was written in.
    assert worker_key("n", {"env_vars": {"A": "1", "B": "2"}}) == worker_key("n", {"env_vars": {"B": "2", "A": "1"}})
    assert worker_key("n", {"env_vars": {"A": "1"}}) != worker_key("n", {"env_vars": {"A": "2"}})
    assert worker_key("n", {}) != worker_key("m", {})


def test_a_cancelled_run_is_one_info_line_and_other_errors_keep_their_traceback(caplog):
    """Through Ray Train's own function that logs a training function's exception."""
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    quiet_cancelled_runs()
    quiet_cancelled_runs()  # once only
    name = "ray.train.v2._internal.util"
    assert sum(type(f).__name__ == "_CancelledRunIsNotAnError" for f in logging.getLogger(name).filters) == 1
    with caplog.at_level(logging.INFO, logger=name):
        for exc in (RunCancelled("driver died"), ValueError("a real failure")):
            try:
                raise exc
            except Exception as e:  # noqa: BLE001 - what Ray's thread runner catches
                construct_user_exception_with_traceback(e)
    (cancelled, failed) = [r for r in caplog.records if r.name == name]
    assert (cancelled.levelname, cancelled.getMessage()) == ("INFO", CANCELLED_NOTE)
    assert failed.levelname == "ERROR" and "Traceback" in failed.getMessage()
    assert "ValueError: a real failure" in failed.getMessage()


@pytest.mark.slow
def test_a_finished_runs_worker_serves_the_next_run_alike_and_a_killed_drivers_is_replaced(
        easy_split, tmp_path, ray_session):
    from covid_ray.worker_pool import start_worker_pool, stop_worker_pool

    ray = ray_session
    root, split = easy_split
    pool = start_worker_pool("test-pool")
    flat = {"data": str(root), "split": str(split), "model": "mobilenet_v3_small", "image_size": 40, "epochs": 2,
            "batch_size": 16, "cache_dir": str(tmp_path / "cache"), "seed": 3}

    @ray.remote(num_cpus=0.05)
    class Driver:  # a trial driver: the run's controller in this actor, its worker from the pool
        def fit(self, config: dict, name: str, **options) -> list[dict]:
            from covid_ray.launch import build_trainer, history_callback

            history = tmp_path / name / "history.jsonl"
            result = build_trainer(config, storage_path=tmp_path / "train", name=name, cpus_per_worker=0.9,
                                   callbacks=[history_callback(history)], controller_in_process=True,
                                   worker_pool="test-pool", **options).fit()
            if result.error:
                raise result.error
            return [json.loads(line) for line in history.read_text().splitlines()]

    def wait_for(condition, what: str, timeout_s: float = 120):
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    first = ray.get(Driver.remote().fit.remote(flat, "first"))
    second = ray.get(Driver.remote().fit.remote(flat, "second"))  # the same configuration, another driver
    assert len(first) == len(second) == 2
    assert first[0]["worker_pid"] == second[0]["worker_pid"]  # the same process served both runs
    # ... and trained them alike: a reused worker starts from nothing the last run left.
    for a, b in zip(first, second):
        for key in ("train_loss", "val_loss", "val_macro_f1"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (key, a[key], b[key])
    stats = ray.get(pool.stats.remote())
    assert stats["started"] == 1 and stats["reused"] == 1 and stats["idle"] == 1 and stats["leased"] == 0, stats

    # A driver killed mid-run (as Tune kills a trial ASHA stops) leaves its worker training: the
    # pool cancels that run, whose loop ends at its next batch, and takes the worker back.
    driver = Driver.remote()
    killed = driver.fit.remote({**flat, "epochs": 50}, "killed")
    wait_for(lambda: (tmp_path / "killed" / "history.jsonl").is_file(), "the killed run's first epoch")
    pid = json.loads((tmp_path / "killed" / "history.jsonl").read_text().splitlines()[0])["worker_pid"]
    assert pid == first[0]["worker_pid"]
    ray.kill(driver)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(killed)
    wait_for(lambda: ray.get(pool.stats.remote())["reclaimed"] == 1, "the dead driver's worker taken back")
    third = ray.get(Driver.remote().fit.remote(flat, "third"))
    assert third[0]["worker_pid"] == pid  # the cancelled run's worker, which then trained as a new one would
    assert [r["train_loss"] for r in third] == pytest.approx([r["train_loss"] for r in first], rel=1e-6)
    stats = ray.get(pool.stats.remote())
    assert stats["started"] == 1 and stats["reused"] == 3 and stats["replaced"] == 0 and stats["leased"] == 0, stats

    # A worker that dies (here: the recovery tests' crash after epoch 1) is replaced by a new one.
    crash = {"COVID_RAY_FAIL_AT_EPOCH": "1", "COVID_RAY_FAIL_RANK": "0",
             "COVID_RAY_FAIL_MARKER": str(tmp_path / "crashed.json")}

    with pytest.raises(ray.exceptions.RayTaskError, match="(?s)worker.*died|died.*worker"):
        ray.get(Driver.remote().fit.remote(flat, "crashed", worker_env=crash, max_failures=0))
    assert (tmp_path / "crashed.json").is_file()
    wait_for(lambda: ray.get(pool.stats.remote())["replaced"] == 1, "the dead worker replaced")
    stats = ray.get(pool.stats.remote())
    assert stats["started"] == 3 and stats["leased"] == 0, stats  # the crashed worker and its replacement
    stop_worker_pool(pool)
