"""The search: ``python -m covid_ray.tune``.

Ray Tune runs trials chosen by Optuna's TPE sampler (through ``OptunaSearch``, its
study persisted in SQLite beside the experiment) and stops weak ones early with
ASHA; :mod:`covid_ray.searcher` makes ASHA-stopped trials reach Optuna as PRUNED with
their per-epoch values, starts the study from ``searcher.start_with``, and runs the
tutorial's hand recipe (``search_spaces/recipe.yaml``) as one reference trial of every
search (``--no-recipe`` turns it off), which ASHA never stops. Each trial is a small Tune *function trainable* that launches one Ray Train
run (:func:`covid_ray.launch.build_trainer`) and forwards its per-epoch reports to
Tune -- Ray 2.60's replacement for passing a Trainer to the Tuner. Ray Train's
controller runs in the trial driver's own process, and :class:`covid_ray.launch.TuneReport`
does there what ``TuneReportCallback`` does from a controller actor, without its
queue actor. The trial driver itself holds only a sliver of a CPU; the DDP workers
hold the resources asked for with ``--workers-per-trial``/``--cpus-per-worker``/
``--gpus-per-worker`` (fractional GPUs let small models share one).

Everything lands in ``results/<experiment>/`` (see :mod:`covid_ray.results`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from covid_ray.artifacts.experiment import (
    EXPERIMENT_FILE, LAUNCH_FILE, LEADERBOARD_FILE, OPTUNA_DB, SEARCH_LOG, SEARCH_SPACE_FILE, SPLIT_FILE,
    load_experiment_json, write_experiment,
)
from covid_ray.artifacts.plain import write_json
from covid_ray.config import flat_defaults
from covid_ray.search_space import (
    SearchSpace,
    SearchSpaceError,
    check_trial_configs,
    dump_search_space,
    load_search_space,
    reference_config,
)

logger = logging.getLogger(__name__)

DEFAULT_SEARCH_SPACE = Path("search_spaces") / "quick.yaml"
DEFAULT_RECIPE = Path("search_spaces") / "recipe.yaml"
# The trial driver only launches and relays; the DDP workers hold the real resources.
# tune.with_resources rejects 0 CPUs, so it gets a sliver.
DRIVER_CPUS = 0.05
FAULT_ENV = ("COVID_RAY_FAIL_AT_EPOCH", "COVID_RAY_FAIL_RANK", "COVID_RAY_FAIL_MARKER")


@dataclass(frozen=True)
class LaunchSpec:
    """How each trial's Ray Train run is launched (not searched, not in trial configs)."""

    train_storage: str
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 1
    worker_env: tuple[tuple[str, str], ...] = ()  # fault injection for the recovery tests
    cleaner: str | None = None  # the search's placement-group cleaner (covid_ray.launch), by name
    worker_pool: str | None = None  # the search's warm workers (covid_ray.worker_pool), by name


def trial_driver(config: dict, launch: LaunchSpec) -> None:
    """Tune function trainable: run one Ray Train run and relay its reports to Tune."""
    import ray.tune

    from covid_ray.artifacts.experiment import ARM_COLUMN, trial_history  # the searcher's ARM_KEY, without Optuna
    from covid_ray.launch import TuneReport, build_trainer, history_callback  # torch-free: this process never loads torch

    trial_id = ray.tune.get_context().get_trial_id()
    config = {k: v for k, v in config.items() if k != ARM_COLUMN}  # the trial's label, not a training key
    trainer = build_trainer(
        config,
        num_workers=launch.workers_per_trial,
        use_gpu=launch.gpus_per_worker > 0,
        cpus_per_worker=launch.cpus_per_worker,
        gpus_per_worker=launch.gpus_per_worker or None,
        storage_path=launch.train_storage,
        # The same name after a driver restart: Ray Train V2 then resumes the run
        # from its latest checkpoint in storage instead of starting over.
        name=trial_id,
        max_failures=launch.max_failures,
        # The history beside the trial's checkpoints: written as each epoch is reported, it
        # survives a killed driver whose Tune result files lose their last epochs.
        # TuneReport last: when Tune stops the trial it ends this thread from inside the
        # report, and the epoch's history line must be written by then.
        callbacks=[history_callback(trial_history(launch.train_storage, trial_id)), TuneReport()],
        worker_env=dict(launch.worker_env) or None,
        # Ray Train's controller runs here, in this actor with nothing else to do while
        # its run trains, instead of in one more process per trial; and the search's one
        # cleaner frees the placement group should ASHA stop the trial (kill this actor).
        controller_in_process=True,
        shared_cleaner=launch.cleaner,
        # The search's warm workers, instead of a new process (imports and all) per trial.
        worker_pool=launch.worker_pool,
    )
    trainer.fit()


def trial_name(trial) -> str:
    """Short trial names and folders (Tune's default packs the whole config into them)."""
    return f"trial_{trial.trial_id}"


@dataclass
class SearchOptions:
    data: str | None
    search_space: str
    experiment: str
    num_samples: int | None = None
    max_concurrent: int | None = None
    workers_per_trial: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    address: str | None = None
    storage_path: str | None = None
    resume: bool = False
    cache_dir: str | None = None
    seed: int = 42  # the split's seed
    worker_env: dict[str, str] | None = None  # default: the COVID_RAY_FAIL_* variables of this process
    recipe: str | None = str(DEFAULT_RECIPE)  # the reference arm's one configuration; None: no reference trial
    callbacks: list = field(default_factory=list)  # extra Tune callbacks (benchmarks' clocks, dashboards)
    # The CLI's console (covid_ray.console): one progress line and a line per trial event,
    # Ray's own output in <experiment>/search.log, and Ray stopped at the end. False (the
    # library default, and --verbose) leaves Tune's tables and Ray's output as they are.
    console: bool = False
    mlflow: bool = False  # log every trial to MLflow (covid_ray.dashboards)
    time_budget_s: float | None = None  # stop the search (running trials keep their best checkpoints) after this


def experiment_dir(storage_path: str | None, experiment: str) -> Path:
    from covid_ray.storage import local_experiment_dir  # a URI's driver files live in a local mirror

    return local_experiment_dir(storage_path, experiment)


def apply_overrides(ss: SearchSpace, opts: SearchOptions) -> SearchSpace:
    """Command-line flags win over the YAML."""
    if opts.num_samples is not None:
        ss.num_samples = opts.num_samples
    if opts.max_concurrent is not None:
        ss.max_concurrent = opts.max_concurrent
    for flag in ("workers_per_trial", "cpus_per_worker", "gpus_per_worker"):
        value = getattr(opts, flag)
        if value is not None:
            ss.resources[flag] = value
    return ss


def _make_searcher(ss: SearchSpace, exp: Path, experiment: str, reference: dict | None):
    """Optuna TPE (or Optuna's random sampler) with the study in ``optuna.db``; None for a one-configuration run."""
    if not ss.space:
        return None  # Tune's default generator runs the single fixed configuration
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    from covid_ray.searcher import CovidSearch

    seed = ss.searcher.get("seed", 0)
    if ss.searcher.get("type", "optuna") == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        # multivariate: lr, weight decay and batch size interact; constant_liar: concurrent
        # trials are not all drawn at the same promising point.
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=ss.searcher.get("n_startup_trials", 4), multivariate=True, constant_liar=True,
        )
    searcher = CovidSearch(
        metric=tune_metric(ss), mode=ss.mode, sampler=sampler, study_name=experiment,
        storage=optuna.storages.RDBStorage(f"sqlite:///{exp / OPTUNA_DB}"),
        full_fidelity=ss.full_fidelity, start_with=ss.searcher.get("start_with", []), reference=reference,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=ss.max_concurrent)


def tune_metric(ss: SearchSpace) -> str:
    """What Tune, ASHA and Optuna rank trials by: the best validation value so far.

    Not the epoch's own value: the checkpoint a trial keeps is its best epoch, and a noisy
    last epoch would otherwise decide a rung.
    """
    return f"best_{ss.metric}"


def _make_scheduler(ss: SearchSpace):
    from ray.tune.schedulers import FIFOScheduler

    from covid_ray.searcher import ReferenceExemptASHA

    if ss.scheduler.get("type", "asha") == "fifo":
        return FIFOScheduler()
    return ReferenceExemptASHA(
        time_attr="epoch",  # not training_iteration: a restarted worker group re-reports epochs
        max_t=int(ss.scheduler["max_t"]),
        grace_period=int(ss.scheduler.get("grace_period", 1)),
        reduction_factor=float(ss.scheduler.get("reduction_factor", 2)),
    )


def prefetch_imagenet(ss: SearchSpace) -> dict[str, str]:
    """Fetch the ImageNet weights the search may load, once, in the driver, before any trial.

    Trials then find them in the cache; offline, the one bounded attempt happens here and
    leaves the marker that makes the trials fall back at once (see covid_ray.pretrained).
    Returns a line per architecture.
    """
    from covid_ray import pretrained
    from covid_ray.models import get_model_entry

    spec = ss.space.get("pretrained", {}).get("choice", [ss.fixed.get("pretrained")])
    if pretrained.IMAGENET not in spec:
        return {}
    models = ss.space.get("model", {}).get("choice", [ss.fixed.get("model", "seed_cnn")])
    status = {}
    for name in models:
        path, why = pretrained.fetch_imagenet(get_model_entry(name))
        status[name] = f"ImageNet weights in {path}" if path else why
    return status


def prebuild_cache(ss: SearchSpace, root: Path, split: Path, cache_dir: str | None) -> None:
    """Decode the images at the profile's working resolution once, here, before any trial.

    Otherwise the first trials would wait on each other's lock while one of them decodes
    every image; with it built, each trial only opens the memory map.
    """
    if "image_size" in ss.space:
        return  # searched: each size is decoded by the first trial that asks for it
    from covid_ray.data.cache import build_cache
    from covid_ray.data.split import read_manifest
    from covid_ray.data.transforms import resize_for

    size = int(ss.fixed.get("image_size", flat_defaults()["image_size"]))
    build_cache(root, read_manifest(split), resize_for(size), cache_dir=cache_dir, progress=True)


def load_reference(ss: SearchSpace, recipe: str | None) -> dict | None:
    """The reference trial's config for this profile, or None (no recipe, or a one-configuration run)."""
    if recipe is None or not ss.space:
        return None
    return reference_config(load_search_space(recipe), ss)


def prepare_experiment(opts: SearchOptions) -> tuple[Path, SearchSpace, dict]:
    """Resolve the data, the split and the search space; write them into the experiment folder.

    Raises:
        FileExistsError: the experiment exists and ``--resume`` was not given.
        FileNotFoundError: ``--resume`` on an experiment that does not exist.
    """
    from covid_ray.data.prepare import DEFAULT_SYNTHETIC_DIR, ensure_synthetic, is_synthetic, split_dataset
    from covid_ray.data.scan import find_dataset_root
    from covid_ray.data.split import manifest_classes, read_manifest

    exp = experiment_dir(opts.storage_path, opts.experiment)
    meta_file = exp / EXPERIMENT_FILE
    if opts.resume:
        if not meta_file.is_file():
            raise FileNotFoundError(f"nothing to resume: {meta_file} does not exist")
        meta = load_experiment_json(exp)
        ss = apply_overrides(load_search_space(exp / SEARCH_SPACE_FILE), opts)
        return exp, ss, meta
    if exp.exists() and any(exp.iterdir()):
        raise FileExistsError(
            f"experiment {opts.experiment!r} already exists at {exp}; pass --resume to continue it, "
            f"or choose another --experiment name"
        )
    ss = apply_overrides(load_search_space(opts.search_space), opts)
    reference = load_reference(ss, opts.recipe)
    check_trial_configs(ss, reference)  # a bad value fails here, once, not inside every trial
    if opts.data is None:
        data = ensure_synthetic(DEFAULT_SYNTHETIC_DIR)
        print(f"no --data given: using the synthetic dataset in {data} (numbers from it are synthetic)")
    else:
        data = Path(opts.data)
    root = find_dataset_root(data).resolve()
    exp.mkdir(parents=True, exist_ok=True)
    result = split_dataset(root, exp / SPLIT_FILE, seed=opts.seed, progress=True)
    print(result.summary)
    if not result.usable:
        raise FileNotFoundError(result.summary)
    dump_search_space(ss, exp / SEARCH_SPACE_FILE)
    for name, line in prefetch_imagenet(ss).items():
        print(f"{name}: {line}")
    prebuild_cache(ss, root, exp / SPLIT_FILE, opts.cache_dir)
    meta = {
        "name": opts.experiment,
        "data": str(root),
        "split": SPLIT_FILE,
        "synthetic": is_synthetic(root),
        "metric": ss.metric,
        "mode": ss.mode,
        "classes": manifest_classes(read_manifest(exp / SPLIT_FILE)),
        "search_space_source": str(opts.search_space),
        "recipe": None if reference is None else {"source": str(opts.recipe), "config": reference},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_experiment(exp, meta)
    return exp, ss, meta


def run_search(opts: SearchOptions) -> Path:
    """Run (or resume) a search and write its tables. Returns the experiment folder."""
    from covid_ray.storage import ExperimentStorage

    store = ExperimentStorage.create(opts.storage_path, opts.experiment)
    store.before_prepare(resume=opts.resume)
    exp, ss, meta = prepare_experiment(opts)
    extra = list(opts.callbacks)
    if opts.mlflow:
        from covid_ray.dashboards import mlflow_callback

        extra.append(mlflow_callback(exp, meta["name"], store.train_storage, ss.metric))
    reference = (meta.get("recipe") or {}).get("config")
    if opts.console:
        from covid_ray.console import SearchConsole

        extra.append(SearchConsole(total=ss.num_samples + (reference is not None), metric=tune_metric(ss),
                                   full_fidelity=ss.full_fidelity, max_epochs=ss.max_epochs,
                                   concurrency=ss.max_concurrent))
    from covid_ray.console import capture_output

    with capture_output(exp / SEARCH_LOG, enabled=opts.console) as out:
        _run_tuner(opts, store, exp, ss, meta, reference, extra, out)
        if opts.console:
            import ray

            ray.shutdown()  # inside the capture: its own messages go to the log too
    return exp


def _run_tuner(opts, store, exp: Path, ss: SearchSpace, meta: dict, reference: dict | None, callbacks: list,
               out) -> None:
    from ray import tune

    from covid_ray.dashboards import optuna_dashboard_command, tensorboard_command
    from covid_ray.ray_setup import check_resources, init_ray
    from covid_ray.results import write_tables
    from covid_ray.storage import check_storage

    dashboard = init_ray(opts.address)
    if opts.console:
        print(f"Ray dashboard: http://{dashboard}" if dashboard else "Ray dashboard: not running", file=out)
        print(f"Ray's own output: {exp / SEARCH_LOG}", file=out)
        print(f"TensorBoard: {tensorboard_command(exp)}; Optuna Dashboard: {optuna_dashboard_command(exp)}", file=out)
    nodes = check_storage(store.root, data=meta["data"])  # every node must see the experiment folder and the data
    if opts.console and nodes:
        print(f"storage {store.root}: read and write checked from all {nodes} nodes", file=out)
    res = ss.resources
    check_resources(
        workers=int(res["workers_per_trial"]), cpus_per_worker=float(res["cpus_per_worker"]),
        gpus_per_worker=float(res["gpus_per_worker"]), driver_cpus=DRIVER_CPUS, concurrent=ss.max_concurrent,
    )
    from covid_ray.launch import start_placement_group_cleaner, stop_placement_group_cleaner
    from covid_ray.worker_pool import stop_worker_pool

    cleaner_name = f"covid-ray-pg-cleaner-{uuid.uuid4().hex[:12]}"  # this search's, resumed or not
    cleaner = start_placement_group_cleaner(cleaner_name)
    pool_name = f"covid-ray-worker-pool-{uuid.uuid4().hex[:12]}"
    launch = LaunchSpec(
        train_storage=store.train_storage,
        workers_per_trial=int(res["workers_per_trial"]),
        cpus_per_worker=float(res["cpus_per_worker"]),
        gpus_per_worker=float(res["gpus_per_worker"]),
        max_failures=int(res.get("max_failures", 1)),
        worker_env=tuple(sorted((opts.worker_env if opts.worker_env is not None else {
            k: os.environ[k] for k in FAULT_ENV if k in os.environ
        }).items())),
        cleaner=cleaner_name,
        worker_pool=pool_name,
    )
    pool = start_pool(launch, ss.max_concurrent)
    write_json(exp / LAUNCH_FILE, {k: v for k, v in asdict(launch).items()
                                   if k not in ("cleaner", "worker_pool")})  # not this run's actors
    store.push()
    trainable = tune.with_resources(tune.with_parameters(trial_driver, launch=launch), {"CPU": DRIVER_CPUS})
    tune_dir = store.tune_dir
    t0 = time.time()
    if opts.resume and tune.Tuner.can_restore(tune_dir):
        print(f"resuming the search in {store.root}", file=out)
        tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        fixed = {"data": meta["data"], "split": store.worker_split(exp / meta["split"]), "cache_dir": opts.cache_dir}
        param_space = {**ss.param_space(), **{k: v for k, v in fixed.items() if v is not None}}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=tune_metric(ss), mode=ss.mode, num_samples=ss.num_samples + (reference is not None),
                search_alg=_make_searcher(ss, exp, opts.experiment, reference), scheduler=_make_scheduler(ss),
                trial_name_creator=trial_name, trial_dirname_creator=trial_name, time_budget_s=opts.time_budget_s,
                # Not reuse_actors: a trial driver that ASHA stops is still blocked in
                # the trainer's fit(), so Tune cannot reset it within its 2 s and fails the
                # *next* trial ("Could not re-use actor"); a new process per trial it is.
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name="tune", storage_path=store.root, callbacks=[*store.tune_callbacks(), *callbacks],
                verbose=0 if opts.console else None,  # the console replaces Tune's tables
                # A trial that fails is recorded and the search goes on. Ray Train retries
                # a lost worker; one Tune retry restarts a trial whose driver (and Train
                # controller) died with its node -- Train resumes it from its checkpoint.
                failure_config=tune.FailureConfig(max_failures=min(launch.max_failures, 1), fail_fast=False),
            ),
        )
    tuner.fit()
    elapsed = time.time() - t0
    stop_placement_group_cleaner(cleaner)  # frees what Tune's last stops left; not the search's time
    stop_worker_pool(pool)
    wall = elapsed + float(meta.get("search_wall_time_s", 0.0)) if opts.resume else elapsed
    meta["search_wall_time_s"] = wall
    write_experiment(exp, meta)
    store.pull_tune_state()
    write_tables(exp, store.checkpoint_location())  # a URI's tables name the checkpoints there
    store.push()


def start_pool(launch: LaunchSpec, concurrent: int):
    """The search's :class:`covid_ray.worker_pool.WorkerPool`, with the first trials' workers started.

    They start beside the search's own set-up, on this node, in the runtime environment
    the trials' workers get (CPU workers only: GPU runs start their own).
    """
    import ray
    from ray.train.v2._internal.execution.worker_group import WorkerGroup

    from covid_ray.worker_pool import poolable, pooled_runtime_env, start_worker_pool, worker_key

    pool = start_worker_pool(launch.worker_pool)
    resources = {"CPU": launch.cpus_per_worker, "GPU": launch.gpus_per_worker}
    if poolable(resources):
        custom = {"env_vars": dict(launch.worker_env)} if launch.worker_env else {}
        env = pooled_runtime_env(WorkerGroup._get_worker_runtime_env(custom_runtime_env=custom), resources)
        key = worker_key(ray.get_runtime_context().get_node_id(), env)
        pool.prestart.remote([key] * (concurrent * launch.workers_per_trial))
    return pool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covid_ray.tune", description="Search architectures and hyperparameters with Ray Tune + Optuna + ASHA.")
    p.add_argument("--data", default=None, help="dataset root; default: the synthetic dataset (generated when missing)")
    p.add_argument("--search-space", default=str(DEFAULT_SEARCH_SPACE), help="YAML in search_spaces/ (default: quick.yaml)")
    p.add_argument("--experiment", default="demo", help="name; results go to results/NAME/")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--workers-per-trial", type=int, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--gpus-per-worker", type=float, default=None, help="fractions let small models share a GPU")
    p.add_argument("--address", default=None, help="join a Ray cluster (auto or HOST:PORT); default: start Ray here")
    p.add_argument("--storage-path", default=None, help="root for the experiment folder (default: results/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    p.add_argument("--cache-dir", default=None, help="decode cache (default: $COVID_RAY_CACHE or ~/.cache/covid_ray)")
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE),
                   help="the hand recipe run as one reference trial of the search (default: search_spaces/recipe.yaml)")
    p.add_argument("--no-recipe", action="store_true", help="run the search without the reference recipe trial")
    p.add_argument("--mlflow", action="store_true",
                   help="log every trial to MLflow: results/NAME/mlruns, or $MLFLOW_TRACKING_URI (needs covid-ray[mlflow])")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="Tune's full tables and Ray's own output on the console (default: a progress line and one "
                        "line per trial event; Ray's output goes to results/NAME/search.log)")
    return p


def main(argv: list[str] | None = None) -> int:
    from covid_ray.tracking import MlflowUnavailableError

    args = build_parser().parse_args(argv)
    # With the console, progress bars and the console's lines say what INFO lines would.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Tune's TensorBoard logger renames "val_recall/Viral Pneumonia" (a space) with an INFO line per result.
    logging.getLogger("tensorboardX.summary").setLevel(logging.WARNING)
    opts = SearchOptions(
        data=args.data, search_space=args.search_space, experiment=args.experiment,
        num_samples=args.num_samples, max_concurrent=args.max_concurrent,
        workers_per_trial=args.workers_per_trial, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, address=args.address, storage_path=args.storage_path,
        resume=args.resume, cache_dir=str(Path(args.cache_dir).resolve()) if args.cache_dir else None,
        seed=args.split_seed, recipe=None if args.no_recipe else args.recipe,
        console=not args.verbose, mlflow=args.mlflow,
    )
    try:
        exp = run_search(opts)
    except (SearchSpaceError, FileExistsError, FileNotFoundError, ValueError, MlflowUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    print()
    print((exp / LEADERBOARD_FILE).read_text())
    print(f"tables: {exp}/trials.csv, history.csv, leaderboard.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

