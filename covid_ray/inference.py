"""Load a trained model for inference and feed it exactly as it was evaluated.

Shared by ``covid_ray.predict`` (the CLI) and ``covid_ray.serve`` (the HTTP service).
A model is either

* an exported ensemble (:mod:`covid_ray.artifacts.bundle`): ``ensemble_int8.onnx`` or
  ``ensemble_fp32.onnx`` with ``preprocess.json`` beside it, or the folder holding them
  (int8 preferred: it only exists when it passed its parity gate against fp32); or
* one training checkpoint (:mod:`covid_ray.artifacts.checkpoint`): a folder with
  ``model.pt``, or the file itself.

Either way the eval preprocessing recorded with the model is applied, and nothing
else (:class:`~covid_ray.artifacts.preprocess.Preprocess`), after decoding as 8-bit
grayscale with the project's defensive decoder (:func:`covid_ray.data.io.decode_grayscale`).
The ONNX tool chain is not imported here: ONNX Runtime only when a graph is loaded.

ONNX Runtime's ``InferenceSession.run`` and a torch module in eval mode under
``inference_mode`` may both be called from several threads at once, so one loaded
model serves concurrent requests; Grad-CAM (:mod:`covid_ray.gradcam`) is not, and
keeps its own copies and lock.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from covid_ray.artifacts import bundle
from covid_ray.artifacts.bundle import FP32_FILE, INT8_FILE, OOD_OUTPUT, ModelLoadError
from covid_ray.artifacts.checkpoint import MODEL_FILE, model_file, model_from_checkpoint
from covid_ray.artifacts.experiment import ENSEMBLE_DIRNAME
from covid_ray.artifacts.preprocess import Preprocess
from covid_ray.data.layout import KAGGLE_DIRNAME, SYNTHETIC_MARKER
from covid_ray.ood import NO_OOD_NOTE, ood_fields

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One decoded image on its way to the model."""

    gray: np.ndarray  # (H, W) uint8 as decoded
    resized: np.ndarray  # (R, R) uint8
    x: torch.Tensor  # (1, C, S, S) float32


@dataclass
class LoadedModel:
    """A model ready to predict: ``predict(x)`` maps (B, C, S, S) float32 to (B, K) probabilities."""

    kind: str  # "onnx" or "checkpoint"
    path: Path  # the model file (.onnx or model.pt)
    classes: list[str]
    preprocess: Preprocess
    synthetic: bool | None  # None when the training data can no longer be found
    meta: dict  # preprocess.json, or the checkpoint's payload without weights
    session: Any = None  # onnxruntime.InferenceSession for kind "onnx"
    module: nn.Module | None = None  # the torch model for kind "checkpoint"
    metrics: dict | None = None  # metrics.json beside an exported ensemble
    input_name: str = "images"
    notes: list[str] = field(default_factory=list)
    ood: dict | None = None  # preprocess.json's "ood", its threshold the one fitted for this graph file


    @property
    def name(self) -> str:
        return str(self.path)

    def prepare(self, gray: np.ndarray) -> Prepared:
        resized = self.preprocess.resized(gray)
        return Prepared(gray, resized, self.preprocess.tensor(resized))

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, K) float64 class probabilities in ``classes`` order."""
        return self.predict_with_ood(x)[0]

    def predict_with_ood(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, K) class probabilities and the (B,) OOD scores (None for a model without them)."""
        if self.kind == "onnx":
            arr = x.numpy() if isinstance(x, torch.Tensor) else x
            names = [self.session.get_outputs()[0].name] + ([OOD_OUTPUT] if self.ood else [])
            outs = self.session.run(names, {self.input_name: np.ascontiguousarray(arr, dtype=np.float32)})
            return outs[0].astype(np.float64), (outs[1].astype(np.float64) if self.ood else None)
        with torch.inference_mode():
            logits = self.module(torch.as_tensor(x, dtype=torch.float32))
        return torch.softmax(logits.double(), dim=1).numpy(), None

    def classify(self, x: np.ndarray | torch.Tensor) -> dict:
        """The JSON fields of the prediction for a batch of one image (``image`` is added by the caller)."""
        probs, ood = self.predict_with_ood(x)
        return self.result(probs[0], None if ood is None else float(ood[0]))

    def result(self, probs: np.ndarray, ood_score: float | None = None) -> dict:
        """The JSON fields of one prediction, with its OOD verdict (see :func:`ood_fields`)."""
        k = int(np.argmax(probs))
        row = {
            "class": self.classes[k],
            "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, probs)},
            "model": self.name,
            "synthetic": self.synthetic,
        }
        return {**row, **ood_fields(self.ood, ood_score)}

    def describe(self) -> dict:
        """What ``GET /model`` reports: classes, preprocessing, members, test metrics."""
        info: dict = {
            "model": self.name,
            "kind": self.kind,
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            "synthetic": self.synthetic,
        }
        if self.kind == "onnx":
            info["temperature"] = self.meta.get("temperature")
            # Not the checkpoint paths: a client has no use for the server's file system layout.
            info["members"] = [{k: m[k] for k in ("trial_id", "model", "weight") if k in m}
                               for m in self.meta.get("members", [])]
            info["metrics"] = metrics_summary(self.metrics) if self.metrics else None
        else:
            spec = self.meta.get("model", {})
            info["members"] = [{"model": spec.get("name"), "weight": 1.0}]
            vm = self.meta.get("metrics", {})
            keys = ("val_accuracy", "val_macro_f1", "val_balanced_accuracy", "val_loss", "val_images", "epoch")
            info["metrics"] = {"split": "val", **{k: vm[k] for k in keys if k in vm}} if vm else None
        info["ood"] = ({**self.ood, "available": True} if self.ood else
                       {"available": False, "note": NO_OOD_NOTE})
        measured = (self.metrics or {}).get("ood") or {}
        if self.ood and measured.get("status") == "ok":  # the build's test-split and OOD-set rates
            info["ood"]["measured"] = {k: measured.get(k) for k in ("test_accept_rate", "test_images", "benchmark")}
        if self.notes:
            info["notes"] = list(self.notes)
        return info


def metrics_summary(m: dict) -> dict:
    """The test-split headline numbers of ``metrics.json`` (ensemble.build's output)."""
    e = m.get("ensemble", {})
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc_macro", "ece", "nll", "covid_sensitivity")
    out = {"split": "test", "test_images": m.get("test_images"), **{k: e.get(k) for k in keys if k in e}}
    if m.get("lung_cam"):
        out["lung_cam_share_mean"] = m["lung_cam"].get("mean")
        out["lung_cam_images"] = m["lung_cam"].get("images")
    gate = m.get("export", {}).get("gate")
    if gate:
        out["int8_gate_passed"] = gate.get("passed")
    return out


# --------------------------------------------------------------------------- loading


def _onnx_session(path: Path, threads: int | None):
    import onnxruntime as ort  # imported here: a checkpoint-only run does not need it

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # notes about unused initializers are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for a damaged file
        raise ModelLoadError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None


def load_onnx(path: Path, *, threads: int | None = None) -> LoadedModel:
    """An exported ensemble graph and the ``preprocess.json`` beside it (see :mod:`covid_ray.artifacts.bundle`)."""
    meta = bundle.read_preprocess_json(path)
    meta_path = path.parent / bundle.PREPROCESS_FILE
    preprocess = Preprocess.from_dict(meta, source=meta_path)
    classes = meta["classes"]
    session = _onnx_session(path, threads)
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    shape = list(inp.shape)
    expected = [preprocess.in_chans, preprocess.image_size, preprocess.image_size]
    if len(shape) != 4 or [d for d in shape[1:]] != expected:
        raise ModelLoadError(f"{path}: graph input {inp.name} has shape {shape}; {meta_path} describes [batch, *{expected}]")
    if len(out.shape) != 2 or out.shape[1] != len(classes):
        raise ModelLoadError(f"{path}: graph output has shape {out.shape}, expected [batch, {len(classes)}]")
    ood = bundle.ood_section(meta, path)
    if ood is not None and OOD_OUTPUT not in {o.name for o in session.get_outputs()}:
        raise ModelLoadError(f"{path}: {meta_path.name} describes an OOD score but the graph has no "
                             f"{OOD_OUTPUT!r} output")
    metrics, notes = bundle.read_metrics(path, meta)
    synthetic = meta.get("synthetic")
    return LoadedModel(
        kind="onnx", path=path, classes=list(classes), preprocess=preprocess,
        synthetic=None if synthetic is None else bool(synthetic), meta=meta, session=session,
        metrics=metrics, input_name=inp.name, notes=notes, ood=ood,
    )


def checkpoint_synthetic(payload: dict) -> bool | None:
    """Whether the checkpoint's training data was synthetic; None when that data is gone."""
    data = (payload.get("config") or {}).get("data")
    if not data:
        return None
    root = Path(data)
    for folder in (root, root / KAGGLE_DIRNAME):
        if (folder / SYNTHETIC_MARKER).is_file():
            return True
    return False if root.is_dir() else None


def load_torch_checkpoint(path: Path) -> LoadedModel:
    """One training checkpoint (folder with ``model.pt``, or the file)."""
    try:
        module, payload = model_from_checkpoint(path)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{path}: not a usable covid-ray checkpoint ({type(exc).__name__}: {exc})") from None
    file = model_file(path)
    preprocess = Preprocess.from_dict(payload.get("preprocess", {}), source=file)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    synthetic = checkpoint_synthetic(payload)
    notes = [] if synthetic is not None else [
        f"training data {meta.get('config', {}).get('data')!r} not found: cannot tell whether it was synthetic"
    ]
    return LoadedModel(
        kind="checkpoint", path=file, classes=list(payload["classes"]), preprocess=preprocess,
        synthetic=synthetic, meta=meta, module=module.eval(), notes=notes,
    )


def resolve_model_path(path: str | Path) -> tuple[str, Path]:
    """(kind, file) for a ``--model`` argument; see the module docstring for what is accepted.

    Raises:
        ModelLoadError: nothing usable at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        for name in bundle.GRAPH_FILES:
            if (path / name).is_file():
                return "onnx", path / name
        if (path / MODEL_FILE).is_file():
            return "checkpoint", path / MODEL_FILE
        if (path / ENSEMBLE_DIRNAME).is_dir():
            return resolve_model_path(path / ENSEMBLE_DIRNAME)  # an experiment folder
        raise ModelLoadError(
            f"{path}: no {INT8_FILE}, {FP32_FILE} or {MODEL_FILE} in this folder "
            "(give an exported ensemble folder, an .onnx file, or a checkpoint)"
        )
    if not path.is_file():
        raise ModelLoadError(f"model not found: {path}")
    if path.suffix == ".onnx":
        return "onnx", path
    if path.suffix in (".pt", ".pth"):
        return "checkpoint", path
    raise ModelLoadError(f"{path}: expected an .onnx file or a checkpoint's model.pt")


def load_model(path: str | Path, *, threads: int | None = None) -> LoadedModel:
    """Load an exported ensemble or a training checkpoint (see the module docstring).

    Args:
        threads: ONNX Runtime intra-op threads (None: its default, one per core).

    Raises:
        ModelLoadError: the path is not a usable model; the message says why.
    """
    kind, file = resolve_model_path(path)
    model = load_onnx(file, threads=threads) if kind == "onnx" else load_torch_checkpoint(file)
    logger.info("loaded %s model %s (%d classes, %d px)", kind, file, len(model.classes), model.preprocess.image_size)
    return model
