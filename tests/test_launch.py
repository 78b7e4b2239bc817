"""The launch side of a run (Tune's trial driver, Ray Train's controller) never loads torch."""
from __future__ import annotations

import subprocess
import sys

from covid_ray.launch import ProcessGroupBackend, ProcessGroupConfig, build_trainer, default_backend

FLAT = {"data": "data", "split": "split.csv", "model": "resnet18", "image_size": 64, "epochs": 2}

# The trial driver itself (covid_ray.tune.trial_driver) in a fresh interpreter, with only
# Tune's session and the run stubbed; then what Ray ships to a Train controller actor (the
# path of covid_ray.train's CLI; a trial runs its controller in the driver): the run
# context and the controller's callbacks, as fit() would send them.
DRIVER = f"""
import sys, types, ray.cloudpickle as pickle
import ray.tune
ray.tune.get_context = lambda: types.SimpleNamespace(get_trial_id=lambda: "t1")
import covid_ray.launch
covid_ray.launch.TuneReport.__init__ = lambda self: None  # no Tune session here

def fit(trainer):
    assert trainer.controller_in_process  # the controller runs in this process: no torch here either
    payload = pickle.dumps((trainer.train_run_context, trainer._create_default_callbacks()))
    open(sys.argv[1] + "/controller.pkl", "wb").write(payload)

covid_ray.launch.Trainer.fit = fit
from covid_ray.tune import LaunchSpec, trial_driver
trial_driver({{**{FLAT!r}, "arm": "search"}}, LaunchSpec(train_storage=sys.argv[1], workers_per_trial=2))
print(sorted(m for m in ("torch", "torchvision", "sklearn") if m in sys.modules))
"""
CONTROLLER = """
import sys, ray.cloudpickle as pickle
context, callbacks = pickle.loads(open(sys.argv[1] + "/controller.pkl", "rb").read())
backend = context.backend_config.backend_cls()
chosen = context.backend_config.backend_for(context.scaling_config.resources_per_worker)  # as on_start picks
print(type(backend).__name__, chosen, len(callbacks),
      sorted(m for m in ("torch", "torchvision", "sklearn") if m in sys.modules))
"""


def _run(code: str, folder) -> str:
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_trial_driver_and_controller_never_import_torch(tmp_path):
    assert _run(DRIVER, tmp_path) == "[]"
    name, backend, n_callbacks, loaded = _run(CONTROLLER, tmp_path).split(" ", 3)
    assert (name, backend, loaded) == ("ProcessGroupBackend", "gloo", "[]")
    assert int(n_callbacks) >= 4  # Ray's own and the history: all unpickled


def test_controller_in_process_needs_an_actor(tmp_path):
    import pytest
    import ray

    trainer = build_trainer(FLAT, storage_path=tmp_path, name="here", controller_in_process=True)
    assert not ray.is_initialized()  # this test process is no Ray actor (and the check starts no Ray)
    with pytest.raises(RuntimeError, match="controller_in_process needs a Ray actor to run in"):
        trainer._initialize_and_run_controller()
    assert not ray.is_initialized()
    assert not build_trainer(FLAT, storage_path=tmp_path, name="actor").controller_in_process  # the default


def test_tune_report_refuses_to_run_outside_a_trial():
    import pytest

    from covid_ray.launch import TuneReport

    with pytest.raises(RuntimeError, match="TuneReport reports to Tune: build it in a Tune trial"):
        TuneReport()


def test_build_trainer_refuses_zero_workers(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="num_workers must be at least 1, got 0"):
        build_trainer(FLAT, num_workers=0, storage_path=tmp_path, name="none")


def test_backend_config_picks_nccl_for_gpus_and_matches_torchconfig_fields(tmp_path):
    cpu = build_trainer(FLAT, storage_path=tmp_path, name="cpu")
    gpu = build_trainer(FLAT, use_gpu=True, gpus_per_worker=0.5, storage_path=tmp_path, name="gpu")
    # One choice, in the backend, from the workers' resources (as TorchConfig's): none made here.
    assert isinstance(cpu.backend_config, ProcessGroupConfig) and cpu.backend_config.backend is None
    assert gpu.backend_config.backend is None
    assert default_backend(cpu.scaling_config.resources_per_worker) == "gloo"
    assert gpu.backend_config.backend_for(gpu.scaling_config.resources_per_worker) == "nccl"
    assert ProcessGroupConfig(backend="gloo").backend_for({"GPU": 1.0}) == "gloo"  # a given one is kept
    assert gpu.scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    assert gpu.backend_config.backend_cls is ProcessGroupBackend
    assert ProcessGroupBackend.share_cuda_visible_devices  # as TorchConfig's: NCCL sees its peers' GPUs
    from ray.train.torch import TorchConfig  # the config it stands in for: the same fields Ray exports

    assert set(ProcessGroupConfig().to_dict()) == set(TorchConfig().to_dict())
    assert ProcessGroupConfig().framework == TorchConfig().framework
    assert ProcessGroupConfig().backend is None  # chosen from the workers' resources, as TorchConfig does


def test_shared_cleaner_frees_the_placement_group_of_a_dead_owner_and_no_other(ray_session):
    import time

    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from covid_ray.launch import start_placement_group_cleaner, stop_placement_group_cleaner

    ray = ray_session
    cleaner = start_placement_group_cleaner("test-cleaner")

    @ray.remote(num_cpus=0)
    class Owner:  # a trial driver: reserves its workers' resources, registers them, may die
        def reserve(self, cleaner, register: bool):
            group = placement_group([{"CPU": 0.25}])
            ray.get(group.ready())
            if register:
                ray.get(cleaner.register.remote(ray.get_runtime_context().get_actor_id(), group))
            return ray.get_runtime_context().get_actor_id(), group

    def wait_for(condition, what: str):
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    dead, alive, unregistered = Owner.remote(), Owner.remote(), Owner.remote()
    _, dead_group = ray.get(dead.reserve.remote(cleaner, True))
    alive_id, alive_group = ray.get(alive.reserve.remote(cleaner, True))
    _, lost_group = ray.get(unregistered.reserve.remote(cleaner, False))
    ray.kill(dead)
    ray.kill(unregistered)
    wait_for(lambda: ray.get(cleaner.registered.remote()) == [alive_id], "the dead owner's entry")
    assert placement_group_table(dead_group)["state"] == "REMOVED"
    after = ray.get(cleaner.rounds.remote())
    wait_for(lambda: ray.get(cleaner.rounds.remote()) >= after + 2, "two more rounds of checks")
    assert placement_group_table(alive_group)["state"] == "CREATED"  # its owner lives
    # Not registered: Ray keeps a dead actor's placement group while the job lives.
    assert placement_group_table(lost_group)["state"] == "CREATED"
    remove_placement_group(lost_group)

    # The end of a search: the cleaner frees what Tune's last stops left, then ends.
    ray.kill(alive)
    stop_placement_group_cleaner(cleaner, timeout_s=60)
    assert placement_group_table(alive_group)["state"] == "REMOVED"
    from ray.util.state import list_actors

    wait_for(lambda: not [a for a in list_actors(filters=[("name", "=", "test-cleaner")]) if a.state != "DEAD"],
             "the cleaner's end")
