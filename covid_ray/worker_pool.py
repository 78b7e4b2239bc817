"""Warm Ray Train workers that a search's trials take turns in, instead of a new process per trial.

Every Ray Train run starts its workers as new Ray actors, and Ray never hands a process
that has served one actor to the next: on a 2-core machine each trial's worker spent
seconds starting a process and importing Ray Train, torch, covid-ray's loop and (with its
first optimizer) ``torch._dynamo`` before its first batch. Here one :class:`WorkerPool`
actor per search keeps finished workers alive, and each trial's run still is an ordinary
Ray Train run -- its controller, placement group, process group, checkpoints, reports and
failure handling are Ray Train's -- except that :class:`PooledWorkerGroup` leases its
workers from the pool rather than creating them, and hands them back when the run ends.

* Resources: the run's placement group is reserved exactly as before and held for the
  run, so Ray's accounting (and Tune's concurrency) is unchanged; the pooled actors
  themselves reserve nothing and are pinned to the node of the bundle they stand for.
* Only CPU workers are pooled: a GPU worker's devices are Ray's per-actor assignment
  (``CUDA_VISIBLE_DEVICES``), so GPU runs start their workers as Ray Train does. GPU
  epochs are long next to the start-up anyway.
* Isolation between runs: a worker goes back to the pool only when its training thread
  has ended and its ``torch.distributed`` process group is destroyed; Ray Train gives it a
  new train context, and the loop seeds its RNGs, builds its model, optimizer and loaders
  anew.
* A run whose driver dies mid-run (ASHA stops the trial: Tune kills the driver) leaves its
  worker training: the pool cancels that run (the loop ends at its next batch,
  :func:`cancellable`; Ray Train's "Error in training function" for it becomes one info
  line) and takes the worker back once its thread has ended. A worker that
  does not end its run within ``RECLAIM_S``, that fails its release, or that died is
  killed, and the pool starts a replacement at once so the next trial still finds a warm one.
* A worker's key is its node and its runtime environment (the run's env vars, such as
  the recovery tests' fault injection, and its ``OMP_NUM_THREADS``): a run only ever gets
  a process that Ray Train would have started the same way.
"""
from __future__ import annotations

import json
import logging
import math
import threading

import ray
from ray.exceptions import RayActorError
from ray.train.v2._internal.execution.worker_group import WorkerGroup
from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState, _shutdown_sync_actor
from ray.train.v2._internal.execution.worker_group.state import logger as ray_state_logger
from ray.train.v2._internal.execution.worker_group.worker import RayTrainWorker, Worker
from ray.train.v2._internal.util import logger as ray_train_fn_logger
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (node id, runtime env as sorted JSON)
RECLAIM_S = 30.0  # how long a cancelled run may take to end before its worker is killed instead

_cancelled = threading.Event()  # set in a pooled worker when its run's driver died


class RunCancelled(RuntimeError):
    """Raised in a pooled worker's loop when the run's driver died and the pool takes the worker back."""


class _Cancellable:
    """A data loader whose iteration raises :class:`RunCancelled` once the run is cancelled."""

    def __init__(self, loader):
        self._loader = loader

    def __iter__(self):
        for batch in self._loader:
            if _cancelled.is_set():
                raise RunCancelled("this run's driver died; the worker returns to the search's pool")
            yield batch

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):  # sampler, dataset, batch_size: the loader's own
        return getattr(self._loader, name)


def cancellable(loader):
    """``loader``, ending the loop at its next batch when the pool cancels the run (a no-op elsewhere)."""
    return _Cancellable(loader)


CANCELLED_NOTE = "run cancelled: its driver died (Tune stopped the trial); the worker returns to the search's pool"


class _CancelledRunIsNotAnError(logging.Filter):
    """Ray Train logs whatever ends a training function early as "Error in training function"
    with its traceback. A run this pool cancelled (:class:`RunCancelled`: ASHA stopped the
    trial) did not fail: its record becomes one info line, so search logs hold no traceback
    for a normal stop. Any other exception is left as Ray logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Error in training function") and f"{__name__}.{RunCancelled.__name__}: " in text:
            record.levelno, record.levelname, record.msg, record.args = logging.INFO, "INFO", CANCELLED_NOTE, ()
            record.exc_info = record.exc_text = None
        return True


def quiet_cancelled_runs() -> None:
    """Install :class:`_CancelledRunIsNotAnError` on the logger of Ray Train's worker thread (once)."""
    if not any(isinstance(f, _CancelledRunIsNotAnError) for f in ray_train_fn_logger.filters):
        ray_train_fn_logger.addFilter(_CancelledRunIsNotAnError())


def _warm_up() -> None:
    """What every run's worker imports or triggers before its first batch, done once per process."""
    import importlib

    import torch

    for module in ("ray.train.torch", "covid_ray.train"):  # Ray's torch helpers; the loop, engine, models
        importlib.import_module(module)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([p])  # the first optimizer step imports torch._dynamo (torch._disable_dynamo)
    p.sum().backward()
    opt.step()


class PooledWorker(RayTrainWorker):
    """Ray Train's worker actor, warmed up at start and reset between runs."""

    def __init__(self):
        super().__init__()
        quiet_cancelled_runs()
        _warm_up()

    def init_train_context(self, *args, **kwargs):
        """Ray Train's, plus what its train context shares by default across every run of a process.

        ``TrainContext``'s checkpoint-upload thread pool and report condition are class-level
        defaults, created once per process; the first run's end shuts that pool down, so
        each run here gets its own.
        """
        from concurrent.futures import ThreadPoolExecutor

        from ray.train.v2._internal.execution.context import MAX_CHECKPOINT_UPLOAD_THREADS, get_train_context

        _cancelled.clear()
        super().init_train_context(*args, **kwargs)
        context = get_train_context()
        context.checkpoint_upload_threadpool = ThreadPoolExecutor(max_workers=MAX_CHECKPOINT_UPLOAD_THREADS)
        context.report_order_condition = threading.Condition()

    def cancel_run(self) -> None:
        """End the current run at its next batch (its driver died), and unblock a pending report."""
        _cancelled.set()
        try:
            self.clear_result_queue()
        except Exception:  # noqa: BLE001 - no run started here
            pass

    def release(self) -> bool:
        """End this worker's part in a run; True when it is fit to serve another.

        Called after Ray Train's own shutdown hooks (the backend's process-group shutdown,
        the worker callbacks). Not fit: the training thread still runs (the run was
        aborted), or the process group cannot be destroyed.
        """
        from ray.train.v2._internal.execution.context import get_train_context

        try:
            context = get_train_context()
        except Exception:  # noqa: BLE001 - no run ever reached this worker
            context = None
        if context is not None and context.execution_context.training_thread_runner.is_running():
            return False
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self._callbacks = []
        import gc

        gc.collect()
        return True


def worker_key(node_id: str, runtime_env: dict) -> Key:
    return node_id, json.dumps(runtime_env, sort_keys=True, default=str)


def pooled_runtime_env(runtime_env: dict, resources_per_worker: dict[str, float]) -> dict:
    """``runtime_env`` plus the ``OMP_NUM_THREADS`` Ray would give a worker holding these CPUs.

    Ray sets it from the CPUs an actor reserves (their floor, at least 1); a pooled actor
    reserves none (its run's placement group holds them), so it is set here, as Ray would.
    """
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    env_vars.setdefault("OMP_NUM_THREADS", str(max(math.floor(resources_per_worker.get("CPU", 1)), 1)))
    env["env_vars"] = env_vars
    return env


def poolable(resources_per_worker: dict[str, float]) -> bool:
    """Workers with these resources can be pooled: CPU only (see the module doc)."""
    return all(name == "CPU" or amount == 0 for name, amount in resources_per_worker.items())


class WorkerPool:
    """The search's warm workers: idle ones by key, leased ones by the actor that runs their run.

    A thread checks every ``check_interval_s`` that each lessee is alive; the runs of one
    that died are cancelled and their workers taken back (or killed and replaced).
    """

    def __init__(self, check_interval_s: float = 1.0):
        self._idle: dict[Key, list] = {}
        self._leased: dict[str, list[tuple[Key, object]]] = {}
        self._reclaiming: dict[Key, int] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._interval = check_interval_s
        self._started = 0
        self._reused = 0
        self._replaced = 0
        self._reclaimed = 0
        threading.Thread(target=self._watch, name="covid-ray-worker-pool", daemon=True).start()

    # -- called by the runs

    def lease(self, owner_id: str, keys: list[Key]) -> list:
        """One worker for each key (an idle one, else a new one), leased to ``owner_id``.

        A worker being taken back from a dead run is waited for (it ends within seconds),
        rather than starting a new process beside it.
        """
        import time

        with self._lock:
            out = []
            for key in keys:
                deadline = time.monotonic() + RECLAIM_S + 5
                while not self._idle.get(key) and self._reclaiming.get(key) and time.monotonic() < deadline:
                    self._changed.wait(timeout=0.5)
                idle = self._idle.get(key) or []
                if idle:
                    actor = idle.pop(0)
                    self._reused += 1
                else:
                    actor = self._start(key)
                out.append(actor)
                self._leased.setdefault(owner_id, []).append((key, actor))
            return out

    def give_back(self, owner_id: str, fit: list, unfit: list) -> None:
        """End ``owner_id``'s lease of these workers: ``fit`` ones go idle, ``unfit`` ones are replaced."""
        fit_ids = {a._actor_id for a in fit}
        unfit_ids = {a._actor_id for a in unfit}
        with self._lock:
            kept = []
            for key, actor in self._leased.pop(owner_id, []):
                if actor._actor_id in fit_ids:
                    self._idle.setdefault(key, []).append(actor)
                    self._changed.notify_all()
                elif actor._actor_id in unfit_ids:
                    self._replace(key, actor)
                else:
                    kept.append((key, actor))
            if kept:
                self._leased[owner_id] = kept

    def prestart(self, keys: list[Key]) -> None:
        """Start idle workers for these keys now, ahead of the runs that will lease them."""
        with self._lock:
            for key in keys:
                self._idle.setdefault(key, []).append(self._start(key))

    def stats(self) -> dict:
        """Workers started, leases served by a warm worker, workers replaced, and the counts now."""
        with self._lock:
            return {"started": self._started, "reused": self._reused, "replaced": self._replaced,
                    "reclaimed": self._reclaimed,
                    "idle": sum(map(len, self._idle.values())), "leased": sum(map(len, self._leased.values()))}

    # -- internal

    def _start(self, key: Key):
        node_id, env = key
        self._started += 1
        return ray.remote(PooledWorker).options(
            num_cpus=0, runtime_env=json.loads(env),
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote()

    def _replace(self, key: Key, actor) -> None:
        ray.kill(actor)
        self._replaced += 1
        if _node_alive(key[0]):
            self._idle.setdefault(key, []).append(self._start(key))
        self._changed.notify_all()

    def _reclaim(self, leases: list[tuple[Key, object]]) -> None:
        """Cancel the runs of a dead lessee; each worker goes idle once its thread ended, else is replaced."""
        import time

        for key, actor in leases:
            fit = False
            try:
                ray.get(actor.cancel_run.remote(), timeout=10)
                deadline = time.monotonic() + RECLAIM_S
                while not fit and time.monotonic() < deadline:
                    fit = bool(ray.get(actor.release.remote(), timeout=RECLAIM_S))
                    if not fit:
                        time.sleep(0.1)
            except Exception as e:  # noqa: BLE001 - dead or stuck: replaced below
                logger.warning("could not take back a worker of a dead run: %s", e)
            with self._lock:
                self._reclaiming[key] -= 1
                if fit:
                    self._idle.setdefault(key, []).append(actor)
                    self._reclaimed += 1
                    self._changed.notify_all()
                else:
                    self._replace(key, actor)

    def _watch(self) -> None:
        import time

        from covid_ray.launch import _actor_alive

        while True:
            time.sleep(self._interval)
            with self._lock:
                owners = list(self._leased)
            for owner_id in owners:
                try:
                    if _actor_alive(owner_id):
                        continue
                except Exception as e:  # noqa: BLE001 - try again next round
                    logger.warning("could not check run owner %s: %s", owner_id, e)
                    continue
                with self._lock:
                    leases = self._leased.pop(owner_id, [])
                    for key, _ in leases:
                        self._reclaiming[key] = self._reclaiming.get(key, 0) + 1
                threading.Thread(target=self._reclaim, args=(leases,), name="covid-ray-worker-reclaim",
                                 daemon=True).start()


def _node_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def start_worker_pool(name: str):
    """A :class:`WorkerPool` named ``name`` on the head node (one per search; :func:`stop_worker_pool` it)."""
    from covid_ray.launch import start_on_head

    return start_on_head(WorkerPool, name)


def stop_worker_pool(pool) -> None:
    """End the pool and, with it, every worker it started (the pool owns them)."""
    ray.kill(pool)


# ------------------------------------------------------------------- the run's side (controller)


class PooledState(WorkerGroupState):
    """A worker group's state whose shutdown hands pooled workers back instead of killing them."""

    def shutdown(self):
        group = self._group
        pooled = [w for w in self.workers if w.actor._actor_id in group._pooled_ids]
        others = [w for w in self.workers if w.actor._actor_id not in group._pooled_ids]
        # Ray's own line, in the run's controller log, as Ray Train's shutdown writes it.
        ray_state_logger.debug(f"Shutting down {len(self.workers)} workers.")
        ray.wait([w.actor.shutdown.remote() for w in self.workers], num_returns=len(self.workers), timeout=5)
        fit, unfit = [], []
        refs = [w.actor.release.remote() for w in pooled]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10) if refs else ([], [])
        for worker, ref in zip(pooled, refs):
            ok = False
            if ref in ready:
                try:
                    ok = bool(ray.get(ref))
                except RayActorError:
                    ok = False
            (fit if ok else unfit).append(worker.actor)
        for worker in others:
            ray.kill(worker.actor)
        if pooled:
            try:
                ray.get(group._pool().give_back.remote(group._owner_id, fit, unfit), timeout=30)
            except Exception as e:  # noqa: BLE001 - the pool kills what its dead lessees held
                logger.warning("could not hand %d workers back to pool %r: %s", len(pooled), group.pool_name, e)
        _shutdown_sync_actor(self.sync_actor)
        self.placement_group_handle.shutdown()


class PooledWorkerGroup(WorkerGroup):
    """Ray Train's worker group with its CPU workers leased from a :class:`WorkerPool` (``pool_name``)."""

    pool_name: str = ""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pooled_ids: set = set()
        self._owner_id = ray.get_runtime_context().get_actor_id()

    def _pool(self):
        return ray.get_actor(self.pool_name)

    def _create_workers(self, num_workers, placement_group, resources_per_worker, placement_group_bundle_indices=None,
                        starting_world_rank=0, world_size=None, replica_group_size=None):
        args = (num_workers, placement_group, resources_per_worker, placement_group_bundle_indices,
                starting_world_rank, world_size, replica_group_size)
        if not poolable(resources_per_worker) or self._owner_id is None:
            return super()._create_workers(*args)
        from ray.util.placement_group import placement_group_table

        indices = list(range(num_workers)) if placement_group_bundle_indices is None else placement_group_bundle_indices
        nodes = placement_group_table(placement_group)["bundles_to_node_id"]
        env = pooled_runtime_env(
            self._get_worker_runtime_env(custom_runtime_env=self._train_run_context.run_config.worker_runtime_env),
            resources_per_worker)
        try:
            pool = self._pool()
            actors = ray.get(pool.lease.remote(self._owner_id, [worker_key(nodes[i], env) for i in indices]))
        except Exception as e:  # noqa: BLE001 - no pool: the run starts its workers as Ray Train does
            logger.warning("worker pool %r unavailable, starting new workers: %s", self.pool_name, e)
            return super()._create_workers(*args)
        try:
            metadatas = ray.get([a.get_metadata.remote() for a in actors])
        except RayActorError as e:
            logger.warning("a pooled worker died before its run, starting new workers: %s", e)
            pool.give_back.remote(self._owner_id, [], actors)
            return super()._create_workers(*args)
        self._pooled_ids.update(a._actor_id for a in actors)
        workers = [Worker(a, meta, resources_per_worker, placement_group_bundle_index=i)
                   for i, a, meta in zip(indices, actors, metadatas)]
        return WorkerGroup._assign_worker_ranks(workers, starting_world_rank, world_size, replica_group_size)

    def _start(self):
        super()._start()
        state = self._worker_group_state
        pooled = PooledState(start_time=state.start_time, placement_group_handle=state.placement_group_handle,
                             workers=state.workers, sync_actor=state.sync_actor)
        object.__setattr__(pooled, "_group", self)
        self._worker_group_state = pooled


def pooled_worker_group(pool_name: str) -> type[PooledWorkerGroup]:
    """The worker-group class for Ray Train's controller that leases from pool ``pool_name``."""
    return type("PooledWorkerGroup", (PooledWorkerGroup,), {"pool_name": pool_name})
