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

Under Tune, the trial driver is already a Ray actor with nothing else to do while its
run trains, so :class:`Trainer` can run Ray Train's controller in that process
(``controller_in_process``) instead of starting one more actor process for it, and
:class:`TuneReport` hands each report to Tune's session there instead of through the
queue actor that ``TuneReportCallback`` starts for every trial. One
:class:`SharedPlacementGroupCleaner` per search then frees the placement group of a trial
driver that dies mid-run, where Ray Train starts a cleaner process for every run, and
``worker_pool`` leases the run's CPU workers from the search's warm ones
(:mod:`covid_ray.worker_pool`), where Ray Train starts a new process (and its imports) for
every worker of every run.
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
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
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


def default_backend(resources_per_worker: dict[str, float]) -> str:
    """The process group's backend for workers with these resources: NCCL when they have GPUs,
    gloo otherwise (as ``TorchConfig`` picks)."""
    return "nccl" if resources_per_worker.get("GPU", 0) > 0 else "gloo"


class ProcessGroupBackend(Backend):
    """``TorchConfig``'s backend with the controller's side torch-free (env:// rendezvous on rank 0)."""

    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        from ray.train._internal.utils import get_address_and_port

        backend = backend_config.backend_for(worker_group.get_resources_per_worker())
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
    ``TorchConfig`` does (:func:`default_backend`)."""

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

    def backend_for(self, resources_per_worker: dict[str, float]) -> str:
        """The backend the workers connect with: the one given, else :func:`default_backend`."""
        return self.backend or default_backend(resources_per_worker)


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


class TuneReport(UserCallback):
    """Hand every report of rank 0 to Tune, from a controller running in the trial driver.

    ``TuneReportCallback`` does the same from a controller in its own actor, through a
    Ray queue, which is one more actor process for every trial. Here the controller runs
    in the trial driver's thread (``controller_in_process``), where Tune's session lives,
    so the report is a plain ``ray.tune.report``. Metrics and the checkpoint path are
    those ``TuneReportCallback`` sends.

    List it last among the run's callbacks: the report waits until Tune has taken the
    result, and when Tune stops the trial (ASHA, or the last epoch) it ends the thread
    from inside the report, so callbacks after it would miss that epoch.
    """

    def __init__(self):
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session

        if not _in_tune_session():  # ray.tune.report would only warn, and the reports would be lost
            raise RuntimeError("TuneReport reports to Tune: build it in a Tune trial")

    def after_report(self, run_context, metrics, checkpoint):
        import ray.tune
        from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

        row = dict(metrics[0])
        if checkpoint:
            row[CHECKPOINT_PATH_KEY] = checkpoint.path
        ray.tune.report(row)


# ------------------------------------------------------------ placement groups of dead trial drivers


class SharedPlacementGroupCleaner:
    """One Ray actor that frees the placement group of any run whose launching actor died.

    Ray keeps a placement group reserved until both the actor and the job that created it
    are gone, so a trial driver that Tune kills mid-run (ASHA stops it) would hold its
    workers' CPUs for the rest of the search. Ray Train 2.60 starts one cleaner process per
    run for this (``PlacementGroupCleaner``, which imports Ray Train: about a second of CPU
    per trial on a small machine); this one serves every trial of a search. Runs register
    ``(owner actor id, placement group)`` once their worker group has started and
    unregister when they shut down; a thread checks the owners every ``check_interval_s``.
    """

    def __init__(self, check_interval_s: float = 1.0):
        import threading

        self._groups: dict[str, object] = {}
        self._lock = threading.Lock()
        self._interval = check_interval_s
        self._rounds = 0
        self._warned: set[str] = set()
        threading.Thread(target=self._watch, name="covid-ray-pg-cleaner", daemon=True).start()

    def register(self, owner_id: str, placement_group) -> None:
        with self._lock:
            self._groups[owner_id] = placement_group

    def unregister(self, owner_id: str) -> None:
        with self._lock:
            self._groups.pop(owner_id, None)

    def registered(self) -> list[str]:
        with self._lock:
            return sorted(self._groups)

    def rounds(self) -> int:
        """Completed checks of all owners."""
        return self._rounds

    def drain(self, timeout_s: float) -> list[str]:
        """Wait until no run is registered (their owners ended or were freed); returns those left."""
        import time

        deadline = time.monotonic() + timeout_s
        while (left := self.registered()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def _watch(self) -> None:
        import time

        while True:
            time.sleep(self._interval)
            with self._lock:
                owners = list(self._groups.items())
            for owner_id, group in owners:
                try:
                    if _actor_alive(owner_id):
                        continue
                    _remove_placement_group(group)
                except Exception as e:  # noqa: BLE001 - keep watching the others; try again next round
                    if owner_id not in self._warned:
                        self._warned.add(owner_id)
                        logger.warning("could not check run owner %s or free its placement group (will retry): %s",
                                       owner_id, e)
                    continue
                with self._lock:
                    if self._groups.get(owner_id) is group:  # not a group registered since this round began
                        del self._groups[owner_id]
            self._rounds += 1


def _actor_alive(actor_id: str) -> bool:
    from ray.util.state import get_actor

    state = get_actor(actor_id, timeout=10)
    return state is not None and state.state != "DEAD"


def _remove_placement_group(group) -> None:
    from ray.util.placement_group import placement_group_table, remove_placement_group

    if placement_group_table(group).get("state", "REMOVED") != "REMOVED":
        logger.warning("freeing the placement group %s of a run whose driver died", group.id.hex())
        remove_placement_group(group)


def start_placement_group_cleaner(name: str):
    """A :class:`SharedPlacementGroupCleaner` named ``name``, on the head node, as Ray places its own.

    One per search: give each its own name (a cleaner being shut down is no use to the
    next search), and :func:`stop_placement_group_cleaner` it at the end.
    """
    return start_on_head(SharedPlacementGroupCleaner, name)


def start_on_head(cls, name: str):
    """An actor of ``cls`` named ``name``, on the head node and holding no CPU, as Ray places its own."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    return ray.remote(num_cpus=0)(cls).options(name=name, resources={HEAD_NODE_RESOURCE_NAME: 0.001}).remote()


def stop_placement_group_cleaner(cleaner, timeout_s: float = 30.0) -> None:
    """Let ``cleaner`` free the groups of runs that Tune ended last, then end it."""
    try:
        left = ray.get(cleaner.drain.remote(timeout_s))
        if left:
            logger.warning("placement groups of %d runs still reserved after %.0f s: %s", len(left), timeout_s, left)
    except Exception as e:  # noqa: BLE001 - the search's results are written already
        logger.warning("placement-group cleaner lost before the end of the search: %s", e)
    ray.kill(cleaner)


class SharedCleanerCallback(ControllerCallback, WorkerGroupCallback):
    """Ray Train's ``PlacementGroupCleanerCallback``, with the search's one cleaner (named ``name``).

    Best effort, as Ray's: a cleaner that cannot be reached costs a warning, not the run.
    """

    def __init__(self, name: str):
        self.name = name
        self._cleaner = None
        self._owner = None

    def after_controller_start(self, train_run_context) -> None:
        self._owner = ray.get_runtime_context().get_actor_id()
        try:
            self._cleaner = ray.get_actor(self.name)
        except ValueError:
            logger.warning("no placement-group cleaner %r: a placement group may stay reserved if this run's "
                           "driver dies", self.name)

    def after_worker_group_start(self, worker_group) -> None:
        if self._cleaner is None:
            return
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        try:
            ray.get(self._cleaner.register.remote(self._owner, group))
        except Exception as e:  # noqa: BLE001 - raising here would make Ray retry the worker group forever
            logger.warning("could not register the placement group with cleaner %r: %s", self.name, e)

    async def before_controller_shutdown(self) -> None:
        self._unregister()

    def before_controller_abort(self) -> None:
        self._unregister()

    def _unregister(self) -> None:
        if self._cleaner is not None:
            self._cleaner.unregister.remote(self._owner)


# ------------------------------------------------------------------------------ the trainer


class Trainer(DataParallelTrainer):
    """Ray Train's data-parallel trainer, less the processes a trial does not need.

    Ray Train 2.60 starts a ``DatasetManager`` actor (a process importing Ray Data) for
    every run, datasets or not. The loop reads its images with torch's DataLoader, so
    that process would only add to every trial's start-up on a small machine; it is left
    out when the run has no Ray Datasets. ``controller_in_process`` runs the controller in
    this process rather than in an actor of its own, ``shared_cleaner`` hands the
    run's placement group to the search's :class:`SharedPlacementGroupCleaner` rather than
    to a cleaner process of its own, and ``worker_pool`` (with ``controller_in_process``)
    has the controller lease warm workers (:class:`covid_ray.worker_pool.PooledWorkerGroup`).
    """

    controller_in_process = False
    shared_cleaner: str | None = None  # a SharedPlacementGroupCleaner's name: instead of a cleaner process per run
    worker_pool: str | None = None  # a covid_ray.worker_pool.WorkerPool's name: warm workers instead of new ones

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [cb for cb in callbacks if not isinstance(cb, DatasetsCallback)]
        if self.shared_cleaner:
            callbacks = [SharedCleanerCallback(self.shared_cleaner) if isinstance(cb, PlacementGroupCleanerCallback) else cb
                         for cb in callbacks]
        return callbacks

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        """Ray Train's controller, as an actor of its own or (``controller_in_process``) here.

        In this process the controller is Ray's same ``TrainController``, run to its end
        on this thread's event loop. The process must be an actor (Tune's trial driver is
        one): Ray Train hands the controller's actor handle to the workers (this actor's
        here, so ``ray.train.get_all_reported_checkpoints``, which covid-ray does not call,
        would not work), and its placement-group cleaner frees the workers' resources when
        this actor dies. Ray ends the workers, which this process then owns, with it.
        """
        if not self.controller_in_process:
            return super()._initialize_and_run_controller(**controller_init_kwargs)
        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            raise RuntimeError(
                "controller_in_process needs a Ray actor to run in (such as Tune's trial driver); "
                "from a driver script, leave it False and Ray Train starts its controller actor")
        import asyncio

        from ray.train.v2._internal.execution.controller import TrainController

        controller = TrainController(**controller_init_kwargs)
        if self.worker_pool:
            from covid_ray.worker_pool import pooled_worker_group

            controller.worker_group_cls = pooled_worker_group(self.worker_pool)
        asyncio.run(controller.run())
        return controller.get_result()


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
    controller_in_process: bool = False,
    shared_cleaner: str | None = None,
    worker_pool: str | None = None,
):
    """A Ray Train trainer for one configuration (validated here, before any worker starts).

    ``controller_in_process``: run Ray Train's controller in this process, which must be a
    Ray actor (Tune's trial driver), instead of in an actor of its own. ``shared_cleaner``:
    the name of a cleaner :func:`start_placement_group_cleaner` started, which frees the
    run's placement group should this process die, instead of a cleaner process of the
    run's own. ``worker_pool`` (with ``controller_in_process``): the name of a pool
    :func:`covid_ray.worker_pool.start_worker_pool` started, whose warm workers the run
    leases instead of starting its own (CPU workers only).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    cfg = TrialConfig.from_flat(flat_config)
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1.0 if gpus_per_worker is None else gpus_per_worker
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_flat(),
        backend_config=ProcessGroupConfig(),  # its backend: default_backend(the workers' resources)
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
    trainer.controller_in_process = controller_in_process
    trainer.shared_cleaner = shared_cleaner
    trainer.worker_pool = worker_pool
    return trainer


def best_of(result, metric: str) -> tuple[dict, str | None]:
    """Metrics and checkpoint path of a Ray Train result's best epoch."""
    best = None
    if result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get(metric, float("-inf")))
    if best is None:
        return dict(result.metrics or {}), None
    return dict(best[1]), best[0].path
