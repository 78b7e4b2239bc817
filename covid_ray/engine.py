"""Training, free of Ray: one run's set-up, one epoch's step, and the math under them.

:func:`setup_run` turns a validated :class:`~covid_ray.config.TrialConfig` into a
:class:`TrainingRun` (data, model, loss, optimizer, LR schedule, presets, early
stopping); :func:`run_epoch` trains one epoch, evaluates the whole validation split and
steps early stopping and the schedule. The Ray Train worker loop (:mod:`covid_ray.train`)
adds only what Ray adds (DDP preparation, the gather, the report, the checkpoint); the
benchmark's plain loop and the benchmarks' stand-in searches call the same two
functions, so "Ray vs plain" measures Ray alone and what is measured is what is trained.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from covid_ray.config import OptimConfig, TrialConfig
from covid_ray.data.datasets import load_splits, make_loader
from covid_ray.data.scan import find_dataset_root
from covid_ray.data.split import manifest_classes, read_manifest
from covid_ray.data.transforms import EvalPreset, TrainPreset, resize_for
from covid_ray.metrics import validation_summary
from covid_ray.models import create_model, trainable_parameters


def class_weight_vector(
    counts: np.ndarray,
    mode: str | list[float],
    class_names: list[str],
    multipliers: dict[str, float] | None = None,
) -> np.ndarray:
    """Loss weight per class.

    Args:
        counts: training images per class.
        mode: ``none`` (all 1), ``balanced`` (N / (K * n_c), scikit-learn's rule),
            ``sqrt_balanced`` (its square root: milder), or an explicit list.
        multipliers: extra factor per class name (the search tunes e.g. COVID's).

    Raises:
        ValueError: a list of the wrong length, a class with no training images under a
            balanced mode, or a multiplier for an unknown class.
    """
    k = len(class_names)
    counts = np.asarray(counts, dtype=np.float64)
    if isinstance(mode, str):
        if mode == "none":
            w = np.ones(k)
        elif mode in ("balanced", "sqrt_balanced"):
            if (counts == 0).any():
                empty = [c for c, n in zip(class_names, counts) if n == 0]
                raise ValueError(f"class_weights={mode!r} needs training images of every class; none for {empty}")
            w = counts.sum() / (k * counts)
            if mode == "sqrt_balanced":
                w = np.sqrt(w)
        else:
            raise ValueError(f"unknown class_weights mode {mode!r}")
    else:
        w = np.asarray(mode, dtype=np.float64)
        if w.shape != (k,):
            raise ValueError(f"class_weights list has {len(w)} entries, expected {k} ({class_names})")
    for name, factor in (multipliers or {}).items():
        if name not in class_names:
            raise ValueError(f"class multiplier for unknown class {name!r}; classes are {class_names}")
        w[class_names.index(name)] *= factor
    return w


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA (with a GradScaler), bf16 on CPU when asked, else nothing."""
    if amp == "off":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    loader,
    preset,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    scaler: torch.amp.GradScaler | None = None,
    amp: str = "auto",
    generator: torch.Generator | None = None,
    channels_last: bool = False,
) -> tuple[float, int]:
    """One pass over ``loader``; returns (mean training loss, images seen)."""
    model.train()
    total, seen = 0.0, 0
    for images, labels, _ in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = preset(images, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            loss = criterion(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += float(loss.detach()) * len(labels)
        seen += len(labels)
    return total / max(seen, 1), seen


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader, preset, device: torch.device, *, amp: str = "auto", channels_last: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits for every batch of ``loader``: (dataset indices, logits float32, labels)."""
    model.eval()
    idx, out, ys = [], [], []
    for images, labels, index in loader:
        x = preset(images.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            logits = model(x)
        out.append(logits.float().cpu().numpy())
        idx.append(index.numpy())
        ys.append(labels.numpy())
    if not out:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(idx), np.concatenate(out), np.concatenate(ys)


def dedupe_by_index(index: np.ndarray, logits: np.ndarray, labels: np.ndarray):
    """Keep one row per dataset index, sorted by index.

    ``DistributedSampler`` pads the last shard by repeating samples, so gathered
    predictions can hold an image twice; this drops the repeats.
    """
    order = np.argsort(index, kind="stable")
    index, logits, labels = index[order], logits[order], labels[order]
    keep = np.ones(len(index), dtype=bool)
    keep[1:] = index[1:] != index[:-1]
    return index[keep], logits[keep], labels[keep]


def cross_entropy_np(logits: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean cross-entropy of numpy logits (the reported ``val_loss``)."""
    if len(labels) == 0:
        return float("nan")
    return float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, preset) -> None:
    """Exact BatchNorm running statistics (cumulative average) over ``loader``'s images.

    After a short run, architectures built with a small BN momentum still hold running
    statistics near their initial values and predict one class in eval mode; one
    cumulative pass (momentum None) fixes that without more training. Each layer's
    momentum is restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for images, _, _ in loader:
        model(preset(images))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without improving the (maximized) metric; 0 disables.

    Plain data, so it goes into a checkpoint and resumes exactly.
    """

    patience: int = 5
    best: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record ``value``; True when it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"patience": self.patience, "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.patience = int(state["patience"])
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


# --------------------------------------------------------------------------- one run


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer an ``OptimConfig`` names (Adam, AdamW, or SGD with Nesterov momentum)."""
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=optim.lr, weight_decay=optim.weight_decay, momentum=optim.momentum, nesterov=True)


@dataclass
class TrainingRun:
    """One configuration ready to train: data, model, loss, optimizer, schedule, presets, early stopping.

    Built by :func:`setup_run` and advanced by :func:`run_epoch`; plain objects, so the
    Ray Train worker loop (:mod:`covid_ray.train`) and the benchmark's plain loop run the
    same set-up and the same epochs, and differ only in what Ray adds.
    """

    cfg: TrialConfig
    classes: list[str]
    device: torch.device
    train_loader: Any
    val_loader: Any
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    early: EarlyStopping
    train_preset: Any
    eval_preset: Any
    train_images: int
    val_images: int

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cuda"

    def train_state(self) -> dict:
        """What a checkpoint needs besides the weights to resume exactly (``train_state.pt``)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "early_stopping": self.early.state_dict(),
        }

    def restore(self, payload: dict, state: dict | None) -> int:
        """Load a checkpoint's weights (and its training state when given); returns its epoch."""
        module = self.model.module if hasattr(self.model, "module") else self.model  # unwrap DDP
        module.load_state_dict(payload["state_dict"])
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.early.load_state_dict(state["early_stopping"])
        return int(payload["epoch"])


def setup_run(
    cfg: TrialConfig,
    *,
    device: torch.device,
    world_size: int = 1,
    prepare_loader: Callable | None = None,
    prepare_model: Callable | None = None,
) -> TrainingRun:
    """Everything :func:`run_epoch` needs, from a validated config.

    Args:
        device: where the model and the batches go.
        world_size: data-parallel workers (a split smaller than one batch per worker keeps
            its last, partial batch; otherwise it is dropped: a 1-image BatchNorm batch).
        prepare_loader, prepare_model: what a distributed runner wraps them with
            (Ray Train's ``prepare_data_loader``/``prepare_model``); identity by default.

    Raises:
        ValueError: the train or val split is empty.
    """
    torch.manual_seed(cfg.optim.seed)  # identical initial weights on every worker
    manifest = read_manifest(cfg.data.split)
    classes = manifest_classes(manifest)
    data = load_splits(find_dataset_root(cfg.data.data), manifest, classes, resize_for(cfg.data.image_size),
                       cache_dir=cfg.data.cache_dir)
    train_set, val_set = data.datasets["train"], data.datasets["val"]
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError(f"{cfg.data.split}: the train and val splits must both hold images")
    batch = cfg.optim.batch_size
    prepare_loader = prepare_loader or (lambda loader: loader)
    train_loader = prepare_loader(make_loader(
        train_set, batch_size=batch, shuffle=True, num_workers=cfg.data.loader_workers,
        seed=cfg.optim.seed, drop_last=len(train_set) > batch * world_size,
    ))
    val_loader = prepare_loader(make_loader(val_set, batch_size=max(batch, 64), shuffle=False,
                                            num_workers=cfg.data.loader_workers))
    model = create_model(
        cfg.model.model, len(classes), pretrained=cfg.model.pretrained, in_chans=cfg.model.in_chans,
        freeze_backbone=cfg.model.freeze_backbone, bn_momentum=cfg.model.bn_momentum,
    )
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    model = prepare_model(model) if prepare_model else model.to(device)
    counts = np.bincount(train_set.labels.numpy(), minlength=len(classes))
    weights = class_weight_vector(counts, cfg.optim.class_weights, classes, cfg.optim.class_mult)
    optimizer = build_optimizer(trainable_parameters(model), cfg.optim)
    return TrainingRun(
        cfg=cfg, classes=classes, device=device, train_loader=train_loader, val_loader=val_loader, model=model,
        criterion=nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device)),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=cfg.optim.lr_factor, patience=cfg.optim.lr_patience),
        scaler=torch.amp.GradScaler("cuda") if cuda and cfg.optim.amp != "off" else None,
        early=EarlyStopping(patience=cfg.optim.early_stop_patience),
        train_preset=TrainPreset(image_size=cfg.data.image_size, in_chans=cfg.model.in_chans,
                                 augment=cfg.data.augment()),
        eval_preset=EvalPreset(image_size=cfg.data.image_size, in_chans=cfg.model.in_chans),
        train_images=len(train_set), val_images=len(val_set),
    )


@dataclass
class EpochResult:
    metrics: dict[str, Any]  # validation metrics, val/train loss, lr, epoch, best so far, timing
    improved: bool  # a new best of the metric: the epoch to checkpoint


def run_epoch(
    run: TrainingRun,
    epoch: int,
    *,
    rank: int = 0,
    gather: Callable[[tuple], tuple] | None = None,
    mean: Callable[[float, int], float] | None = None,
) -> EpochResult:
    """Train one epoch, predict the whole validation split, step early stopping and the LR schedule.

    Args:
        epoch: 0-based; the metrics say ``epoch + 1``.
        rank: this worker's rank (seeds its augmentation).
        gather: concatenates (index, logits, labels) over workers (identity alone).
        mean: mean training loss over workers from this worker's (loss sum, images).

    Raises:
        ValueError: the configured metric is not among those computed.
    """
    cfg = run.cfg
    t0, started_at = time.perf_counter(), time.time()
    # Each epoch's order depends on (seed, epoch) alone, so a run resumed from a checkpoint
    # shuffles as the uninterrupted one would: DistributedSampler through set_epoch, a
    # single worker's RandomSampler through its generator.
    sampler = getattr(run.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif getattr(sampler, "generator", None) is not None:
        sampler.generator.manual_seed(cfg.optim.seed * 100_003 + epoch)
    epoch_seed = cfg.optim.seed * 100_003 + rank * 1_009 + epoch
    generator = torch.Generator().manual_seed(epoch_seed)  # the batch augmentation's draws
    torch.manual_seed(epoch_seed)  # and the rest (dropout): an epoch's randomness never depends on the ones before
    loss, seen = train_one_epoch(
        run.model, run.train_loader, run.train_preset, run.criterion, run.optimizer, run.device,
        scaler=run.scaler, amp=cfg.optim.amp, generator=generator, channels_last=run.channels_last,
    )
    train_loss = mean(loss * seen, seen) if mean else loss
    outputs = predict_logits(run.model, run.val_loader, run.eval_preset, run.device, amp=cfg.optim.amp,
                             channels_last=run.channels_last)
    index, logits, labels = dedupe_by_index(*(gather(outputs) if gather else outputs))
    metrics: dict[str, Any] = validation_summary(labels, logits, run.classes)
    metrics["val_loss"] = cross_entropy_np(logits, labels)
    metric = cfg.optim.metric
    if metric not in metrics:
        raise ValueError(f"metric {metric!r} is not reported; choose one of {sorted(metrics)}")
    value = metrics[metric]
    improved = run.early.step(value if math.isfinite(value) else float("-inf"), epoch + 1)
    run.scheduler.step(value)
    metrics.update(
        epoch=epoch + 1,
        train_loss=train_loss,
        lr=run.optimizer.param_groups[0]["lr"],
        val_images=int(len(labels)),
        epoch_time_s=time.perf_counter() - t0,
        epoch_started_at=started_at,  # wall clock, for the start-up breakdown of benchmarks.tune
        early_stopped=run.early.should_stop,
        **{f"best_{metric}": run.early.best, "best_epoch": run.early.best_epoch},
    )
    return EpochResult(metrics, improved)
