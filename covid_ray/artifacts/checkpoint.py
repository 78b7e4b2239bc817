"""Self-describing, pickle-free checkpoints.

A checkpoint folder holds ``model.pt``: the weights plus everything needed to rebuild
and run the model without any training config (model name and constructor args,
class names in output order, image size, working resolution, channel handling and
normalization (:class:`~covid_ray.artifacts.preprocess.Preprocess`), the metrics it was
chosen on). Resuming training also needs ``train_state.pt`` (optimizer, LR scheduler,
grad scaler, epoch, early stopping). Both hold only tensors and plain Python values, so
they load with ``torch.load(weights_only=True)``: loading a checkpoint never runs pickled
code. ``metadata.json`` repeats the description (no weights) as strict JSON.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from covid_ray.artifacts.plain import json_text, torch_plain
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.models import create_model, model_spec

FORMAT = "covid-ray-checkpoint/1"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
METADATA_FILE = "metadata.json"


def encode_checkpoint(
    model: nn.Module,
    *,
    classes: list[str],
    image_size: int,
    metrics: dict[str, float],
    epoch: int,
    config: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """The checkpoint's files (name -> bytes): ``model.pt``, ``train_state.pt`` when given, ``metadata.json``.

    A snapshot in memory: training may go on while :func:`write_checkpoint_files` writes it.
    """
    module = model.module if hasattr(model, "module") else model  # unwrap DDP
    spec = model_spec(module)
    payload = {
        "format": FORMAT,
        "model": spec,
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "classes": list(classes),
        "preprocess": Preprocess.for_model(image_size, spec["in_chans"]).to_dict(channel_handling=True),
        "metrics": torch_plain(metrics),
        "epoch": int(epoch),
        "config": torch_plain(config or {}),
    }
    files = {MODEL_FILE: _torch_bytes(payload)}
    if train_state is not None:
        files[STATE_FILE] = _torch_bytes(train_state)
    files[METADATA_FILE] = json_text(
        {k: payload[k] for k in ("format", "model", "classes", "preprocess", "metrics", "epoch")}
    ).encode()
    return files


def _torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def write_checkpoint_files(folder: str | Path, files: dict[str, bytes]) -> Path:
    """Write :func:`encode_checkpoint`'s files into ``folder`` (created when missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)  # the GIL is released while the bytes go to disk
    return folder


def save_checkpoint(folder: str | Path, model: nn.Module, **description: Any) -> Path:
    """Write ``model.pt`` (and ``train_state.pt`` when given) into ``folder``; see :func:`encode_checkpoint`."""
    return write_checkpoint_files(folder, encode_checkpoint(model, **description))


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file: what an exported ensemble records for each member's ``model.pt``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_file(path: str | Path) -> Path:
    """``model.pt`` of a checkpoint folder, or ``path`` itself when it is the file."""
    path = Path(path)
    return path / MODEL_FILE if path.is_dir() else path


def load_checkpoint(path: str | Path) -> dict:
    """Load ``model.pt`` from a checkpoint folder or file, pickle-free.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the file is not a covid-ray checkpoint or is corrupt.
    """
    file = model_file(path)
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
