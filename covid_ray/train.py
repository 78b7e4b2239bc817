"""One training run under Ray Train: the per-worker loop and its CLI (the trainer: :mod:`covid_ray.launch`).

``python -m covid_ray.train --data DIR --model NAME ...`` trains one configuration
with data-parallel workers (gloo on CPU, NCCL on GPU) and prints one JSON object as
its last line of stdout: the best validation metrics and the best checkpoint. Each
search trial (``covid_ray.tune``) runs the same :func:`train_loop_per_worker`.

The math lives in :mod:`covid_ray.engine`; this file only wires it to Ray: data
loaders get a ``DistributedSampler``, validation predictions are gathered from every
worker so metrics cover the whole validation split, rank 0 writes a checkpoint when
the metric improves (beside the next epoch, in Ray Train's upload thread), every epoch
is reported, and a restarted run resumes from the checkpoint Ray hands it (model,
optimizer, scheduler, scaler, epoch, early stopping).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from covid_ray.artifacts.checkpoint import encode_checkpoint, load_checkpoint, load_train_state, write_checkpoint_files
from covid_ray.artifacts.experiment import HISTORY_FILE, read_history
from covid_ray.config import AMP_MODES, OPTIMIZERS, TrialConfig, flat_defaults
from covid_ray.engine import TrainingRun, run_epoch, setup_run
from covid_ray.launch import best_of, build_trainer, history_callback
from covid_ray.worker_pool import cancellable

logger = logging.getLogger(__name__)


def _gather(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Concatenate each array over all workers (identity with one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return arrays
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, arrays)
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(len(arrays)))


def _mean_over_workers(total: float, count: int, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return total / max(count, 1)
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def _quiet_report_log() -> None:
    """Drop Ray Train's INFO line per report (the whole metrics dict, every epoch).

    Ray Train V2 logs it under a logger named after its source file, outside the
    ``ray`` hierarchy that ``LoggingConfig(log_level=...)`` sets, so it is silenced here.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: nothing to silence
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _resume(run: TrainingRun, rank: int) -> int:
    """The epoch to start from: that of the checkpoint Ray hands a restarted run, else 0."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as folder:
        epoch = run.restore(load_checkpoint(folder), load_train_state(folder))
    if rank == 0:
        print(f"[covid-ray] resumed from the checkpoint of epoch {epoch}", flush=True)
    return epoch


def _report(run: TrainingRun, metrics: dict, *, with_checkpoint: bool) -> None:
    """Report the epoch to Ray Train; with a self-describing checkpoint of this epoch when asked.

    A checkpoint is large (``seed_cnn``'s weights and Adam state are 312 MB), and a slow
    disk took seconds per improving epoch to take it. On a local (or mounted) storage
    path, the checkpoint is encoded in memory here, a snapshot taken before the next
    epoch changes the weights, and Ray Train's upload thread writes it into the run's own
    folder and renames it into place while the next epoch trains
    (``CheckpointUploadMode.ASYNC``): it is written once, never seen partial, and Ray
    reports the epoch once it is there. An object store gets Ray's own upload from a
    local temporary folder, before the next epoch: uploaded beside it, the two-node S3
    recovery test (``tests/test_storage.py``) restarted its killed trial from scratch.
    """
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    cfg = run.cfg
    files = encode_checkpoint(run.model, classes=run.classes, image_size=cfg.data.image_size, metrics=metrics,
                              epoch=int(metrics["epoch"]), config=cfg.to_flat(), train_state=run.train_state())
    storage = ray.train.get_context().get_storage()
    if not _is_local_filesystem(storage.storage_filesystem):
        with tempfile.TemporaryDirectory() as tmp:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(
                str(write_checkpoint_files(tmp, files))))
        return  # uploaded already
    staging = Path(storage.experiment_fs_path, f".checkpoint-{uuid.uuid4().hex}")
    staging.mkdir()

    def upload(checkpoint, checkpoint_dir_name: str):  # in Ray Train's upload thread
        try:
            write_checkpoint_files(staging, files)
            destination = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
            os.replace(staging, destination)  # same folder, same filesystem: atomic, no copy
            return ray.train.Checkpoint(path=destination, filesystem=storage.storage_filesystem)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when renamed

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC, checkpoint_upload_fn=upload,
                     delete_local_checkpoint_after_upload=False)  # upload() leaves nothing behind


def _is_local_filesystem(filesystem) -> bool:
    import pyarrow.fs

    return isinstance(filesystem, pyarrow.fs.LocalFileSystem)


def _checkpoint_registered(epoch: int) -> bool:
    """Whether Ray Train's controller has registered the run's checkpoint of ``epoch``.

    The controller writes its checkpoint bookkeeping to the run's storage as it registers
    a checkpoint; a restarted worker group resumes from what it names.
    """
    import ray.train

    storage = ray.train.get_context().get_storage()
    try:
        with storage.storage_filesystem.open_input_stream(storage.checkpoint_manager_snapshot_path) as f:
            state = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):  # not written yet, or being written
        return False
    return any((r.get("metrics") or {}).get("epoch") == epoch for r in state.get("checkpoint_results", []))


def _fault_hook(rank: int, epoch: int, best_epoch: int) -> None:
    """Fault injection for the recovery tests: a hard crash of one rank after an epoch.

    The crash comes once Ray Train's controller has registered the best epoch's checkpoint
    (which it does only once the checkpoint is written), so the marker's
    ``last_checkpoint_epoch`` names a checkpoint that exists and that the restarted worker
    group resumes from, whatever the timing of the checkpoint's background upload (rank 0
    writes it; any rank may be the one that crashes).
    """
    fail_at = os.environ.get("COVID_RAY_FAIL_AT_EPOCH")
    if fail_at and rank == int(os.environ.get("COVID_RAY_FAIL_RANK", "0")) and epoch == int(fail_at):
        deadline = time.monotonic() + 120
        while best_epoch >= 1 and not _checkpoint_registered(best_epoch) and time.monotonic() < deadline:
            time.sleep(0.1)
        marker = Path(os.environ.get("COVID_RAY_FAIL_MARKER", ""))
        if marker.name and not marker.exists():
            marker.write_text(json.dumps({"killed_at_epoch": epoch, "last_checkpoint_epoch": best_epoch}))
            os._exit(1)  # as from an OOM kill or a lost node


def train_loop_per_worker(flat_config: dict) -> None:
    """Ray Train worker entry point; reads everything from ``flat_config``.

    The set-up and each epoch are :mod:`covid_ray.engine`'s; this adds what Ray adds:
    DDP preparation of the loaders and the model, the gather of validation predictions
    over workers, the resume from Ray's checkpoint, the report, the checkpoint on rank 0
    when the metric improves, and the fault hook of the recovery tests.
    """
    loop_started_at = time.time()  # wall clock, for the start-up breakdown of benchmarks.tune
    import ray
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    cfg = TrialConfig.from_flat(flat_config)
    ctx = ray.train.get_context()
    rank, device = ctx.get_world_rank(), ray.train.torch.get_device()
    run = setup_run(
        cfg, device=device, world_size=ctx.get_world_size(),
        # cancellable: a pooled worker whose run's driver died ends the run at the next batch
        prepare_loader=lambda loader: cancellable(ray.train.torch.prepare_data_loader(loader, move_to_device=False)),
        prepare_model=ray.train.torch.prepare_model,
    )
    start_epoch = resumed_from = _resume(run, rank)
    node_id = ray.get_runtime_context().get_node_id()
    # Every worker's node, so the tables show where a multi-node trial really ran.
    worker_node_ids = ",".join(sorted(set(_gather((np.array([node_id]),))[0].tolist())))
    metric = cfg.optim.metric
    for epoch in range(start_epoch, cfg.optim.epochs):
        step = run_epoch(run, epoch, rank=rank, gather=_gather,
                         mean=lambda total, count: _mean_over_workers(total, count, device))
        metrics = {**step.metrics, "node_id": node_id, "worker_node_ids": worker_node_ids,
                   "world_size": ctx.get_world_size(), "resumed_from_epoch": resumed_from,
                   "loop_started_at": loop_started_at, "worker_pid": os.getpid()}
        if rank == 0:
            print(
                f"[covid-ray] epoch {epoch + 1}/{cfg.optim.epochs} train_loss {metrics['train_loss']:.4f} "
                f"val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.4f} "
                f"{metric} {metrics[metric]:.4f}{' *' if step.improved else ''} ({metrics['epoch_time_s']:.1f}s)",
                flush=True,
            )
        _report(run, metrics, with_checkpoint=step.improved and rank == 0)
        if run.early.should_stop:
            if rank == 0:
                print(f"[covid-ray] early stop: no {metric} gain for {run.early.bad_epochs} epochs", flush=True)
            break
        _fault_hook(rank, epoch + 1, run.early.best_epoch)


# --------------------------------------------------------------------------- CLI


# The training keys the CLI exposes; their defaults and types are the config dataclasses'.
CLI_KEYS = ("image_size", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "class_weights", "pretrained",
            "freeze_backbone", "in_chans", "amp", "early_stop_patience", "lr_patience", "seed")
CLI_HELP = {
    "batch_size": "per worker",
    "class_weights": "none | balanced | sqrt_balanced | w1,w2,...",
    "pretrained": "imagenet (torchvision's weights: cache, else a download with a timeout), none, or a weights file",
    "early_stop_patience": "epochs without improvement before stopping (0: never)",
}
CLI_CHOICES = {"optimizer": OPTIMIZERS, "amp": AMP_MODES, "in_chans": (1, 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covid_ray.train", description="Train one configuration with Ray Train (DDP).")
    p.add_argument("--data", required=True, help="dataset root (Kaggle layout or ImageFolder)")
    p.add_argument("--split", default=None, help="split manifest; default: made (or reused) for --data")
    p.add_argument("--model", required=True, help="registered model name (see covid_ray.models.list_models)")
    defaults = flat_defaults()
    for key in CLI_KEYS:
        flag, default, help_text = "--" + key.replace("_", "-"), defaults[key], CLI_HELP.get(key)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help_text)
        else:
            kind = str if default is None or key == "class_weights" else type(default)
            p.add_argument(flag, type=kind, default=default, choices=CLI_CHOICES.get(key),
                           help=f"{help_text + '; ' if help_text else ''}default {default}")
    p.add_argument("--num-workers", type=int, default=1, help="DDP workers")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--max-failures", type=int, default=1, help="worker failures to recover from")
    p.add_argument("--storage-path", default="results/train",
                   help="where Ray Train writes checkpoints: a path, or a URI such as s3://bucket/prefix")
    p.add_argument("--name", default=None, help="run name (default: <model>-<time>)")
    p.add_argument("--cache-dir", default=None, help="decode cache folder (default: $COVID_RAY_CACHE or ~/.cache/covid_ray)")
    p.add_argument("--address", default=None, help="join a running Ray cluster (auto or HOST:PORT)")
    return p


def _class_weights_arg(text: str) -> str | list[float]:
    if "," in text:
        try:
            return [float(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"--class-weights: expected numbers like 1,2,1,3, got {text!r}") from None
    return text


def config_from_args(args: argparse.Namespace, split: Path) -> dict:
    return {
        "data": str(Path(args.data).resolve()),
        "split": str(split.resolve()),
        "cache_dir": str(Path(args.cache_dir).resolve()) if args.cache_dir else None,
        "model": args.model,
        **{key: getattr(args, key) for key in CLI_KEYS},
        "class_weights": _class_weights_arg(args.class_weights),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from covid_ray.data.prepare import ensure_split
    from covid_ray.models import list_models
    from covid_ray.ray_setup import check_resources, init_ray
    from covid_ray.uri import check_uri, is_uri, join, mirror_dir

    try:
        if is_uri(args.storage_path):
            args.storage_path = check_uri(args.storage_path)
        if args.model not in list_models():
            raise ValueError(f"unknown model {args.model!r}; choose one of {list_models()}")
        split = ensure_split(args.data, args.split)
        flat = config_from_args(args, split)
        TrialConfig.from_flat(flat)  # fail here, not inside a worker
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray

    init_ray(args.address)
    try:
        check_resources(
            workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=1.0 if args.use_gpu else 0.0, driver_cpus=0.0,
        )
        name = args.name or f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = join(args.storage_path, name) if is_uri(args.storage_path) else str(Path(args.storage_path, name).resolve())
        # The driver writes the history: next to the checkpoints, or in a URI's local mirror.
        history = (mirror_dir(run_dir) if is_uri(run_dir) else Path(run_dir)) / HISTORY_FILE
        trainer = build_trainer(
            flat, num_workers=args.num_workers, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker,
            storage_path=args.storage_path, name=name, max_failures=args.max_failures,
            callbacks=[history_callback(history)],
        )
        result = trainer.fit()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        ray.shutdown()
        return 2
    metrics, checkpoint = best_of(result, flat.get("metric", "val_macro_f1"))
    if checkpoint and is_uri(run_dir):  # Ray reports the path inside the bucket
        checkpoint = f"{run_dir.split('://', 1)[0]}://{checkpoint}"
    error = str(result.error) if result.error else None
    ray.shutdown()
    summary = {
        "best_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "checkpoint": checkpoint,
        "run": run_dir,
        "history": str(history),
        "epochs_run": len(read_history(history)),
        "error": error,
    }
    print(json.dumps(summary, default=str))
    return 0 if checkpoint and not error else 1


if __name__ == "__main__":
    sys.exit(main())
