"""The launch side of a run (Tune's trial driver, Ray Train's controller) never loads torch."""
from __future__ import annotations

import subprocess
import sys

from covid_ray.launch import ProcessGroupBackend, ProcessGroupConfig, build_trainer

FLAT = {"data": "data", "split": "split.csv", "model": "resnet18", "image_size": 64, "epochs": 2}

# The trial driver itself (covid_ray.tune.trial_driver) in a fresh interpreter, with only
# Tune's session and the run stubbed; then what Ray ships to the Train controller: the run
# context and the controller's callbacks, as fit() would send them.
DRIVER = f"""
import sys, types, ray.cloudpickle as pickle
import ray.tune, ray.tune.integration.ray_train as tune_train
ray.tune.get_context = lambda: types.SimpleNamespace(get_trial_id=lambda: "t1")
tune_train.TuneReportCallback.__init__ = lambda self: None
import covid_ray.launch

def fit(trainer):
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
print(type(backend).__name__, context.backend_config.backend, len(callbacks),
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


def test_build_trainer_refuses_zero_workers(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="num_workers must be at least 1, got 0"):
        build_trainer(FLAT, num_workers=0, storage_path=tmp_path, name="none")


def test_backend_config_picks_nccl_for_gpus_and_matches_torchconfig_fields(tmp_path):
    cpu = build_trainer(FLAT, storage_path=tmp_path, name="cpu")
    gpu = build_trainer(FLAT, use_gpu=True, gpus_per_worker=0.5, storage_path=tmp_path, name="gpu")
    assert isinstance(cpu.backend_config, ProcessGroupConfig) and cpu.backend_config.backend == "gloo"
    assert gpu.backend_config.backend == "nccl"
    assert gpu.scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    assert gpu.backend_config.backend_cls is ProcessGroupBackend
    assert ProcessGroupBackend.share_cuda_visible_devices  # as TorchConfig's: NCCL sees its peers' GPUs
    from ray.train.torch import TorchConfig  # the config it stands in for: the same fields Ray exports

    assert set(ProcessGroupConfig().to_dict()) == set(TorchConfig().to_dict())
    assert ProcessGroupConfig().framework == TorchConfig().framework
    assert ProcessGroupConfig().backend is None  # chosen from the workers' resources, as TorchConfig does
