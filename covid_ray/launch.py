"""The launch side of one Ray Train run: the trainer, its process-group backend, the history callback.

Everything here runs in Tune's trial driver (or the ``covid_ray.train`` CLI) and in Ray
Train's controller, and none of it imports torch: on a 2-core machine each of those
two processes would otherwise spend seconds of every trial loading torch only to build
a config object. The workers, which train, import torch with the loop
(:mod:`covid_ray.train`).

:class:`ProcessGroupConfig` is to ``DataParallelTrainer`` what ``TorchConfig`` is to
``TorchTrainer``, minus the module-level torch import: its backend runs in the controller
and sets up ``torch.distributed`` (gloo on CPU, NCCL on GPU) in the workers with Ray's
own torch helpers, which the workers import. :func:`build_trainer` therefore builds Ray
Train's ``DataParallelTrainer`` with it; ``TorchTrainer`` is that same class with
``TorchConfig``.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from covid_ray.config import TrialConfig
from covid_ray.uri import is_file as uri_is_file
from covid_ray.uri import is_uri, read_text, write_text

logger = logging.getLogger(__name__)


def train_loop_per_worker(flat_config: dict) -> None:
    """The workers' entry point, by reference to this torch-free module (the loop imports torch)."""
    from covid_ray.train import train_loop_per_worker as loop

    loop(flat_config)


# ------------------------------------------------------------ process group (run in the workers)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _connect(backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

    _set_torch_distributed_env_vars()
    _setup_torch_process_group(backend=backend, world_rank=world_rank, world_size=world_size,
                               init_method="env://", timeout_s=timeout_s)


def _disconnect(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


class DeviceContext:
    """Around the loop in each worker: ``TorchConfig``'s (selects the worker's CUDA device)."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc) -> bool:
        return self._inner.__exit__(*exc)


class ProcessGroupBackend(Backend):
    """``TorchConfig``'s backend with the controller's side torch-free (env:// rendezvous on rank 0)."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_set_master, addr=addr, port=port)
        ray.get([
            worker_group.execute_single_async(i, _connect, backend=backend, world_rank=i,
                                              world_size=len(worker_group), timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))
        ])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        from ray._private import ray_constants
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S

        futures = worker_group.execute_async(_disconnect, destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logger.warning("torch process group shutdown timed out after %s seconds", timeout_s)


@dataclass
class ProcessGroupConfig(BackendConfig):
    """``torch.distributed`` for the workers: ``backend`` ``gloo`` or ``nccl``; None picks as
    ``TorchConfig`` does (NCCL when the workers have GPUs)."""

    backend: str | None = None
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return DeviceContext

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


# ------------------------------------------------------------------ history (run in the controller)


class HistoryCallback(UserCallback):
    """Record every report of rank 0 as a JSON line, with its checkpoint (runs in the Train controller).

    Ray Train V2 keeps only the metrics attached to checkpoints, and Tune's own result
    files can lose the epochs reported just before its driver was killed; this file is
    written as each report arrives, so it keeps every epoch and every checkpoint path,
    including the epochs a restarted worker group trains again (readers keep the last
    report of an epoch). A local path is appended to; a URI (object stores cannot
    append) is rewritten whole, a few kB.
    """

    def __init__(self, where: str):
        self.where = where
        self.lines: list[str] | None = None

    def after_report(self, run_context, metrics, checkpoint):
        row = dict(metrics[0])
        row["checkpoint"] = checkpoint.path if checkpoint else ""
        line = json.dumps(row, default=str) + "\n"
        if not is_uri(self.where):
            with open(self.where, "a") as f:
                f.write(line)
            return
        if self.lines is None:  # a restarted controller continues the file it finds
            self.lines = read_text(self.where).splitlines(keepends=True) if uri_is_file(self.where) else []
        self.lines.append(line)
        write_text(self.where, "".join(self.lines))


def history_callback(where: str | Path):
    """A Ray Train callback that writes each epoch's metrics to ``where`` (JSON lines; a path or a URI)."""
    if not is_uri(where):
        Path(where).parent.mkdir(parents=True, exist_ok=True)
    return HistoryCallback(str(where))


# ------------------------------------------------------------------------------ the trainer


class Trainer(DataParallelTrainer):
    """Ray Train's data-parallel trainer, less Ray Data's per-run actor when the run has no Ray Datasets.

    Ray Train 2.60 starts a ``DatasetManager`` actor (a process importing Ray Data) for
    every run, datasets or not. The loop reads its images with torch's DataLoader, so
    that process would only add to every trial's start-up on a small machine.
    """

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]


def build_trainer(
    flat_config: dict,
    *,
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float | None = None,
    storage_path: str | Path,
    name: str,
    max_failures: int = 1,
    callbacks: list | None = None,
    worker_env: dict[str, str] | None = None,
):
    """A Ray Train trainer for one configuration (validated here, before any worker starts)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    cfg = TrialConfig.from_flat(flat_config)
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1.0 if gpus_per_worker is None else gpus_per_worker
    return Trainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_flat(),
        backend_config=ProcessGroupConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()) if "://" not in str(storage_path) else str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=cfg.optim.metric, checkpoint_score_order="max"
            ),
            callbacks=callbacks,
            # Ray Train's per-report INFO lines drown the loop's own progress line.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
    )


def best_of(result, metric: str) -> tuple[dict, str | None]:
    """Metrics and checkpoint path of a Ray Train result's best epoch."""
    best = None
    if result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get(metric, float("-inf")))
    if best is None:
        return dict(result.metrics or {}), None
    return dict(best[1]), best[0].path
