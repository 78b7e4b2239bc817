"""Self-describing, pickle-free checkpoints.

A checkpoint folder holds ``model.pt``: the weights plus everything needed to rebuild
and run the model without any training config (model name and constructor args,
class names in output order, image size, working resolution, channel handling and
normalization, the metrics it was chosen on). Resuming training also needs
``train_state.pt`` (optimizer, LR scheduler, grad scaler, epoch, early stopping).
Both hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)``: loading a checkpoint never runs pickled code.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from covid_ray.data.transforms import normalization_for, resize_for
from covid_ray.models import create_model, model_spec

FORMAT = "covid-ray-checkpoint/1"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


def _plain(value: Any) -> Any:
    """Plain Python copy (NaN kept as float) so ``weights_only`` loading accepts it.

    Exact types only: ``np.float64`` subclasses ``float`` and ``np.str_`` subclasses
    ``str``, yet torch pickles them as numpy objects that a weights-only load refuses.
    """
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if hasattr(value, "item"):
        return value.item()
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: metadata.json must be strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def preprocess_spec(image_size: int, in_chans: int) -> dict:
    mean, std = normalization_for(in_chans)
    return {
        "image_size": int(image_size),
        "resize": resize_for(image_size),
        "crop": "center",
        "in_chans": int(in_chans),
        "channel_handling": (
            "grayscale input; first conv adapted to 1 channel"
            if in_chans == 1
            else "grayscale replicated to 3 channels"
        ),
        "mean": list(mean),
        "std": list(std),
        "value_range": "uint8 / 255 before normalization",
    }


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    *,
    classes: list[str],
    image_size: int,
    metrics: dict[str, float],
    epoch: int,
    config: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.pt`` (and ``train_state.pt`` when given) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    spec = model_spec(module)
    payload = {
        "format": FORMAT,
        "model": spec,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "classes": list(classes),
        "preprocess": preprocess_spec(image_size, spec["in_chans"]),
        "metrics": _plain(metrics),
        "epoch": int(epoch),
        "config": _plain(config or {}),
    }
    torch.save(payload, folder / MODEL_FILE)
    if train_state is not None:
        torch.save(train_state, folder / STATE_FILE)
    meta = {k: payload[k] for k in ("format", "model", "classes", "preprocess", "metrics", "epoch")}
    (folder / "metadata.json").write_text(json.dumps(_json_safe(meta), indent=2, allow_nan=False) + "\n")
    return folder


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file: what an exported ensemble records for each member's ``model.pt``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict:
    """Load ``model.pt`` from a checkpoint folder or file, pickle-free.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file is not a covid-ray checkpoint or is corrupt.
    """
    file = _model_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {file}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged file
        raise ValueError(f"{file}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{file}: not a covid-ray checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r})")
    return payload


def model_from_checkpoint(path_or_payload: str | Path | dict) -> tuple[nn.Module, dict]:
    """Rebuild the model (eval mode) and return it with the checkpoint payload."""
    payload = path_or_payload if isinstance(path_or_payload, dict) else load_checkpoint(path_or_payload)
    spec = dict(payload["model"])
    model = create_model(spec.pop("name"), spec.pop("num_classes"), **spec)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def load_train_state(folder: str | Path) -> dict | None:
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=True)

