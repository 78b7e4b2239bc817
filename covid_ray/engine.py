"""The math of training, free of Ray: one epoch, evaluation, class weights, early stopping.

The Ray Train worker loop (:mod:`covid_ray.train`) and the benchmark's plain PyTorch
loop both call these functions, so what is measured is what is trained.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


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
