"""Starting or joining Ray, and checking a resource request before anything is launched."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> str | None:
    """Join the cluster at ``address``, or start Ray inside this process.

    The embedded Ray keeps its dashboard on 127.0.0.1 and Ray's token authentication
    on (its default for local clusters since 2.60): an exposed, unauthenticated Ray
    dashboard or jobs port runs anyone's code.

    Returns:
        The dashboard's address (``host:port``), or None when there is none.
    """
    import ray

    if ray.is_initialized():
        return dashboard_address()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train patches print() on workers into its logger, which also echoes to the
    # console: every progress line would show twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The Train controller polls its workers every 2 s by default and takes one report
    # per poll: epochs shorter than that are stretched, and every run ends up to 2 s late.
    # A poll is an actor call per worker, paid in CPU by the controller and the worker for
    # as long as the run lasts; 4 a second keep a run's end within half a second.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # A trial's workers wait for the CPUs of the trial that ASHA just stopped, which come
    # free only once Ray Train's cleaner has noticed the dead controller: on a loaded
    # machine that took over Ray's default 60 s, and the waiting trial failed its start.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    if address:
        return ray.init(address=address, log_to_driver=True).dashboard_url or None
    # Ray Train starts a preemption watcher, one more process, with every run: it watches
    # for nodes being drained (spot instances, autoscaler) and only logs and flags what it
    # sees, which the training loop does not read. The embedded Ray is this one machine,
    # never drained; on a 2-core machine that process is part of every trial's start-up.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    _warn_if_another_ray_runs()
    context = ray.init(
        address="local",  # a new Ray here, never one left running by `ray start`
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=True,  # its agent frees Train V2 placement groups between trials
        dashboard_host="127.0.0.1",
        log_to_driver=True,
    )
    return context.dashboard_url or None


def dashboard_address() -> str | None:
    """The connected Ray's dashboard ``host:port`` (None when unknown)."""
    try:
        from ray._private.worker import get_dashboard_url  # private, hence the guard
    except ImportError:
        return None
    return get_dashboard_url() or None


def _warn_if_another_ray_runs() -> None:
    """Two Ray instances on one machine break Ray Train's placement-group cleaner.

    Inside the cluster it looks up its controller through Ray's state API without an
    address; with two instances it cannot tell which is its own, stops, and finished
    trials never give their CPUs back: the next trial's workers time out at start-up.
    """
    try:
        from ray._private.services import find_gcs_addresses  # private, hence the guard
    except ImportError:
        return
    others = sorted(find_gcs_addresses())
    if others:
        logger.warning(
            "another Ray instance is running on this machine (%s): while two run side by side, "
            "Ray Train cannot free finished trials' resources and later trials may hang at worker "
            "start-up. Stop it (ray stop) or join it with --address.", ", ".join(others)
        )


def cluster_totals() -> dict[str, float]:
    import ray

    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}


def check_resources(
    *, workers: int, cpus_per_worker: float, gpus_per_worker: float, driver_cpus: float, concurrent: int = 1
) -> None:
    """Fail fast when one trial cannot fit in the cluster.

    Raises:
        ValueError: says what was asked and what the cluster has.
    """
    totals = cluster_totals()
    need_cpu = workers * cpus_per_worker + driver_cpus
    need_gpu = workers * gpus_per_worker
    problems = []
    if workers < 1:
        problems.append(f"workers per trial must be >= 1, got {workers}")
    if cpus_per_worker <= 0:
        problems.append(f"CPUs per worker must be > 0, got {cpus_per_worker}")
    if workers > 1 and 0 < gpus_per_worker < 0.5:
        # Ray may then pack two ranks of one trial onto one GPU, and NCCL refuses a
        # process group with "Duplicate GPU detected" (ray-project/ray#48012).
        problems.append(
            f"{workers} DDP workers x {gpus_per_worker:g} GPU each could put two ranks of one trial on the same "
            "GPU, which NCCL refuses (\"Duplicate GPU detected\"); use at least 0.5 GPU per worker with more than "
            "one worker, or 1 worker per trial to share a GPU between trials"
        )
    if need_gpu > 0 and totals["GPU"] == 0:
        problems.append(f"asked for {need_gpu:g} GPUs per trial ({workers} workers x {gpus_per_worker:g}), but the cluster has no GPUs")
    elif need_gpu > totals["GPU"]:
        problems.append(f"asked for {need_gpu:g} GPUs per trial ({workers} workers x {gpus_per_worker:g}), but the cluster has {totals['GPU']:g}")
    if need_cpu > totals["CPU"]:
        problems.append(
            f"asked for {need_cpu:g} CPUs per trial ({workers} workers x {cpus_per_worker:g}"
            f"{f' + {driver_cpus:g} for the trial driver' if driver_cpus else ''}), but the cluster has {totals['CPU']:g}"
        )
    if problems:
        raise ValueError("impossible resource request: " + "; ".join(problems))
    if concurrent * need_cpu > totals["CPU"]:
        logger.info("%d concurrent trials need %g CPUs; the cluster has %g, so fewer will run at once",
                    concurrent, concurrent * need_cpu, totals["CPU"])
