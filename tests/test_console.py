"""The search console's lines, driven by hand with stand-in trials (no Ray cluster), and the resource checks."""
from __future__ import annotations

import io
import os
import sys

import pytest

from covid_ray import console as console_module
from covid_ray.console import SearchConsole, capture_output


class FakeTrial:
    def __init__(self, trial_id, config, local_path=None):
        self.trial_id, self.config, self.local_path = trial_id, config, local_path
        self.status, self.last_result = "RUNNING", {}


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def screen(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(console_module, "_CONSOLE", stream)
    return stream


def make_console():
    return SearchConsole(total=4, metric="best_val_macro_f1", full_fidelity=8, max_epochs=8, concurrency=2)


def result(epoch, value, best, **extra):
    return {"epoch": epoch, "val_macro_f1": value, "best_val_macro_f1": best, **extra}


def test_trial_events_and_progress_as_plain_lines(screen, tmp_path):
    c = make_console()
    recipe = FakeTrial("r1", {"model": "seed_cnn", "lr": 1e-3, "batch_size": 32, "arm": "recipe", "epochs": 8})
    t2 = FakeTrial("t2", {"model": "resnet18", "lr": 3.2e-4, "class_weights": "sqrt_balanced", "arm": "warm_start"})
    t3 = FakeTrial("t3", {"model": "resnet18", "lr": 1e-4, "arm": "search"})
    t4 = FakeTrial("t4", {"model": "seed_cnn", "lr": 5e-5, "arm": "search"}, local_path=str(tmp_path))
    for t in (recipe, t2, t3, t4):
        c.on_trial_start(0, [], t)
    c.on_trial_result(0, [], t2, result(1, 0.41, 0.41))
    c.on_trial_result(0, [], t2, result(2, 0.38, 0.41))
    t2.last_result = result(8, 0.7, 0.72)
    c.on_trial_complete(0, [], t2)
    t3.last_result = result(4, 0.2, 0.3)
    c.on_trial_complete(0, [], t3)  # ended below full fidelity without early stopping: ASHA
    recipe.last_result = result(6, 0.16, 0.2, early_stopped=True)
    c.on_trial_result(0, [], recipe, recipe.last_result)
    c.on_trial_complete(0, [], recipe)
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: worker died\n")
    c.on_trial_error(0, [], t4)

    out = screen.getvalue()
    assert "\r" not in out and "\x1b" not in out
    lines = out.splitlines()
    assert "trial r1 started (the hand recipe, the reference): model seed_cnn, lr 0.001, batch_size 32" in lines
    assert "trial t2 started (warm start): model resnet18, lr 0.00032, class_weights sqrt_balanced" in lines
    assert "trial t2 epoch 2/8 val_macro_f1 0.3800 (best 0.4100)" in lines  # the profile's 8 epochs
    assert "trial t2 finished 8 epochs: best val_macro_f1 0.4100" in lines
    assert any(line.startswith("trial t3 stopped by ASHA after epoch 4") for line in lines)
    assert any(line.startswith("trial r1 early-stopped at epoch 6: best val_macro_f1 0.2000") for line in lines)
    assert "trial t4 FAILED: RuntimeError: worker died" in lines
    final = [line for line in lines if line.startswith("[4/4 done")][-1]
    assert "2 finished, 1 stopped by ASHA, 1 failed; 0 running" in final
    assert "best val_macro_f1 0.4100 (t2)" in final


def test_on_a_terminal_the_progress_line_is_redrawn_in_place(monkeypatch):
    stream = Terminal()
    monkeypatch.setattr(console_module, "_CONSOLE", stream)
    c = make_console()
    t = FakeTrial("t1", {"model": "resnet18", "lr": 1e-3})
    c.on_trial_start(0, [], t)
    c.on_trial_result(0, [], t, result(1, 0.5, 0.5))
    out = stream.getvalue()
    assert "\r\x1b[K[0/4 done" in out  # redrawn, not appended
    assert out.count("\n") == 2  # the two event lines; the progress line has no newline of its own


def test_a_resumed_search_counts_trials_that_ended_before_the_restart(screen):
    c = make_console()
    done, failed, running = FakeTrial("a", {}), FakeTrial("b", {}), FakeTrial("c", {})
    done.status, done.last_result = "TERMINATED", result(8, 0.6, 0.66)
    failed.status = "ERROR"
    c.on_step_end(0, [done, failed, running])
    assert "[2/4 done: 1 finished, 0 stopped by ASHA, 1 failed" in c.progress_line()
    assert "0.6600 (a)" in c.progress_line()


def test_capture_output_sends_fds_to_the_log_and_keeps_a_console(tmp_path):
    log = tmp_path / "search.log"
    saved = os.dup(1)
    with capture_output(log) as out:
        os.write(1, b"from C: core_worker.cc noise\n")
        os.write(2, b"raylet warning\n")
        print("python print", file=sys.__stdout__, flush=True)  # fd 1 (pytest swaps sys.stdout)
        out.write("for the person\n")
        import logging

        logging.getLogger("covid_ray.tune").warning("something to see")
    os.close(saved)
    text = log.read_text()
    assert "core_worker.cc noise" in text and "raylet warning" in text and "python print" in text
    assert "for the person" not in text
    assert console_module._CONSOLE is None
    os.write(1, b"after\n")  # fd 1 is back where it was
    assert "after" not in log.read_text()


def test_duplicate_gpu_and_impossible_requests_are_refused_with_reasons(monkeypatch):
    from covid_ray import ray_setup

    monkeypatch.setattr(ray_setup, "cluster_totals", lambda: {"CPU": 16.0, "GPU": 2.0})
    with pytest.raises(ValueError, match=r"2 DDP workers x 0.25 GPU each .*\(\"Duplicate GPU detected\"\)"):
        ray_setup.check_resources(workers=2, cpus_per_worker=1, gpus_per_worker=0.25, driver_cpus=0.05)
    ray_setup.check_resources(workers=2, cpus_per_worker=1, gpus_per_worker=0.5, driver_cpus=0.05)
    ray_setup.check_resources(workers=1, cpus_per_worker=1, gpus_per_worker=0.25, driver_cpus=0.05)
    with pytest.raises(ValueError, match=r"asked for 4 GPUs per trial \(2 workers x 2\), but the cluster has 2"):
        ray_setup.check_resources(workers=2, cpus_per_worker=1, gpus_per_worker=2, driver_cpus=0.05)
